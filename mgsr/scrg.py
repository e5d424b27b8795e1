"""SCRG — sequence correction and re-generation (METHOD.md section 2). No Lightning in here.

One round on a batch of student rollouts (canonical layout):
  score     one teacher and one student forward give p_i, q_i at every response position
  pick      teacher token y^t_i = argmax p_i [ours] (or a sample); d_i = KL(p_i || q_i) [ours] (or any registered divergence);
            candidates C = {i : y^s_i != y^t_i}; single mode: j = argmax_{i in C} d_i;
            multi mode: every i in C with d_i above a fixed or per-sequence adaptive threshold (capped)
  splice    put y^t at the picked positions, keep the tokens before the last one, drop the rest
  regenerate  the student continues from the spliced prefix, re-using the KV cache of the unchanged prefix
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mgsr.generation import SamplingConfig, continue_generation, generate, model_cache, position_ids
from mgsr.losses.divergences import DIVERGENCES


@dataclass
class ScrgConfig:
    rounds: int = 1                    # 0 = plain student generation
    mode: str = "single"               # single | multi
    teacher_token: str = "argmax"      # argmax | sample  [ours: argmax]
    divergence: str = "fkl"            # any registered divergence, e.g. fkl | rkl  [ours: fkl]
    threshold_mode: str = "fixed"      # multi mode: fixed (d_i > threshold) | adaptive (d_i > q-quantile)
    threshold: float = 0.8             # nats, fixed mode
    quantile: float = 0.8              # adaptive mode
    max_corrections: int = 8           # multi mode cap per sequence
    sampler: str = "student"           # student | teacher_mix (MiniLLM: tokens from mix p + (1 - mix) q)
    mix: float = 0.2                   # teacher_mix: the teacher's share a (MiniLLM's --teacher-mixed-alpha)

    def __post_init__(self):
        checks = [
            (self.rounds >= 0, f"scrg.rounds must be >= 0, got {self.rounds}"),
            (self.mode in ("single", "multi"), f"scrg.mode must be single|multi, got {self.mode!r}"),
            (self.teacher_token in ("argmax", "sample"),
             f"scrg.teacher_token must be argmax|sample, got {self.teacher_token!r}"),
            (self.divergence in DIVERGENCES, f"scrg.divergence={self.divergence!r}: unknown divergence; choose one "
                                              f"of {', '.join(sorted(DIVERGENCES))}"),
            (self.threshold_mode in ("fixed", "adaptive"),
             f"scrg.threshold_mode must be fixed|adaptive, got {self.threshold_mode!r}"),
            (0.0 < self.quantile < 1.0, f"scrg.quantile must be in (0, 1), got {self.quantile}"),
            (self.max_corrections >= 1, f"scrg.max_corrections must be >= 1, got {self.max_corrections}"),
            (self.sampler in ("student", "teacher_mix"),
             f"scrg.sampler must be student|teacher_mix, got {self.sampler!r}"),
            (0.0 <= float(self.mix) <= 1.0, f"scrg.mix must be in [0, 1], got {self.mix}"),
            (self.sampler == "student" or self.rounds == 0,
             f"scrg.sampler=teacher_mix samples MiniLLM rollouts, which SCRG does not revise: set scrg.rounds=0 "
             f"(got {self.rounds})"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


@dataclass
class RevisionStats:
    """What one round did, per row (tensors [B]); aggregated by `summary()` for logging under scrg/."""

    position: list = field(default_factory=list)       # j / n of the first correction
    divergence: list = field(default_factory=list)     # d_j (max over corrected positions)
    changed: list = field(default_factory=list)        # fraction of response tokens that differ afterwards
    corrected: list = field(default_factory=list)      # tokens replaced by the teacher's
    unchanged: list = field(default_factory=list)      # 1 if no candidate existed (rollout kept)

    def summary(self) -> dict[str, float]:
        if not self.unchanged:
            return {}
        cat = {k: torch.cat(getattr(self, k)).float() for k in ("position", "divergence", "changed", "corrected",
                                                               "unchanged")}
        revised = cat["unchanged"] == 0
        out = {"unchanged_share": cat["unchanged"].mean().item(),
               "corrected_per_seq": cat["corrected"].mean().item()}
        if revised.any():
            out.update(position=cat["position"][revised].mean().item(),
                       divergence=cat["divergence"][revised].mean().item(),
                       changed_frac=cat["changed"][revised].mean().item())
        return out


def token_divergence(teacher_logits, student_logits, kind: str) -> torch.Tensor:
    """Per-position divergence [B, R] used to rank error candidates: any registered divergence, at its default
    parameters (mgsr.losses.divergences.DIVERGENCES)."""
    return DIVERGENCES[kind](teacher_logits, student_logits)


def score(teacher, student, seqs: dict, *, student_cache: bool = True):
    """Teacher and student logits predicting each response token, [B, R, V], and the student's KV cache."""
    ids, attn, P = seqs["input_ids"], seqs["attention_mask"], seqs["prompt_len"]
    pos = position_ids(attn)
    keep = ids.shape[1] - P + 1
    t_out = teacher(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=keep)
    s_out = student(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=keep, use_cache=student_cache)
    return t_out.logits[:, :-1].float(), s_out.logits[:, :-1].float(), model_cache(s_out) if student_cache else None


def pick_corrections(div: torch.Tensor, candidates: torch.Tensor, cfg: ScrgConfig) -> torch.Tensor:
    """Which response positions get the teacher's token. div, candidates: [B, R]; returns bool [B, R].

    single: the candidate of maximal divergence. multi/fixed: candidates with d_i > threshold.
    multi/adaptive: candidates with d_i strictly above the row's `quantile`-quantile of candidate
    divergences, and always the row's maximal candidate (the quantile of one value, or of equal values, is
    that value: a strict `>` alone would leave such rows uncorrected although they have candidates).
    Multi mode keeps at most `max_corrections` per row (the largest d_i). Rows without candidates: none.
    """
    neg = torch.finfo(div.dtype).min
    masked = torch.where(candidates, div, torch.full_like(div, neg))
    row_max = torch.zeros_like(candidates).scatter(1, masked.argmax(-1, keepdim=True), True) & candidates
    if cfg.mode == "single":
        return row_max
    if cfg.threshold_mode == "fixed":
        picked = candidates & (div > cfg.threshold)
    else:
        # per-row quantile over candidates only: NaN-out the rest, nanquantile ignores them
        vals = torch.where(candidates, div, torch.full_like(div, float("nan")))
        thr = torch.nanquantile(vals, cfg.quantile, dim=-1, keepdim=True)
        picked = candidates & ((div > thr) | row_max)
    if picked.sum(-1).max() > cfg.max_corrections:
        k = min(cfg.max_corrections, div.shape[1])
        top = torch.where(picked, div, torch.full_like(div, neg)).topk(k, dim=-1).indices
        picked = picked & torch.zeros_like(picked).scatter(1, top, True)
    return picked


@torch.no_grad()
def revise_once(teacher, student, seqs: dict, cfg: ScrgConfig, sampling: SamplingConfig, *, eos_id: int,
                pad_id: int, generator=None, stats: RevisionStats | None = None, engine=None) -> dict:
    """One SCRG round on canonical-layout `seqs`; returns the revised sequences (same layout). `engine`: None
    re-generates with the HF student (continue_generation), else with the engine's (mgsr/rollout_vllm.py)."""
    P = seqs["prompt_len"]
    resp = seqs["input_ids"][:, P:]
    resp_mask = seqs["response_mask"][:, P:]
    t_logits, s_logits, cache = score(teacher, student, seqs, student_cache=engine is None)
    if cfg.teacher_token == "argmax":
        y_t = t_logits.argmax(-1)
    else:
        flat = torch.softmax(t_logits.reshape(-1, t_logits.shape[-1]), -1)
        y_t = torch.multinomial(flat, 1, generator=generator).view(resp.shape)
    div = token_divergence(t_logits, s_logits, cfg.divergence)  # [B, R]
    candidates = resp_mask & (resp != y_t)  # response positions up to and including the student's EOS
    picked = pick_corrections(div, candidates, cfg)
    active = picked.any(-1)

    cols = torch.arange(resp.shape[1], device=resp.device)[None, :]
    first = torch.where(picked, cols, torch.full_like(cols, resp.shape[1])).min(-1).values
    last = torch.where(picked, cols, torch.full_like(cols, -1)).max(-1).values
    spliced_resp = torch.where(picked, y_t, resp)
    spliced = dict(seqs, input_ids=torch.cat([seqs["input_ids"][:, :P], spliced_resp], 1))
    keep = torch.where(active, last + 1, resp_mask.sum(-1))
    # Cache is exact up to the first changed token; later spliced tokens are fed through the model.
    cache_valid = torch.where(active, first, keep)
    regenerate = continue_generation if engine is None else engine.continue_generation
    out = regenerate(student, spliced, keep, sampling, eos_id=eos_id, pad_id=pad_id, cache=cache,
                              cache_valid=cache_valid, active=active, generator=generator)

    if stats is not None:
        n = resp_mask.sum(-1).clamp_min(1)
        new_resp, new_mask = out["input_ids"][:, P:], out["response_mask"][:, P:]
        width = max(new_resp.shape[1], resp.shape[1])
        a = torch.nn.functional.pad(torch.where(resp_mask, resp, -1), (0, width - resp.shape[1]), value=-1)
        b = torch.nn.functional.pad(torch.where(new_mask, new_resp, -1), (0, width - new_resp.shape[1]), value=-1)
        denom = torch.maximum(n, new_mask.sum(-1)).clamp_min(1)
        stats.position.append((first.float() / n).where(active, torch.zeros_like(n, dtype=torch.float)).cpu())
        stats.divergence.append(torch.where(picked, div, torch.zeros_like(div)).max(-1).values.cpu())
        stats.changed.append(((a != b).sum(-1).float() / denom).cpu())
        stats.corrected.append(picked.sum(-1).cpu())
        stats.unchanged.append((~active).long().cpu())
    return out


@torch.no_grad()
def rollout_and_revise(teacher, student, prompt_ids, prompt_mask, cfg: ScrgConfig, sampling: SamplingConfig, *,
                       eos_id: int, pad_id: int, generator=None, stats: RevisionStats | None = None,
                       engine=None) -> dict:
    """Student rollout, then `cfg.rounds` SCRG rounds. Returns the distillation sequences. `engine` (None: the
    HF student) samples the rollout and the re-generations; scoring always uses the HF teacher and student."""
    seqs = (generate if engine is None else engine.generate)(student, prompt_ids, prompt_mask, sampling, eos_id=eos_id, pad_id=pad_id, generator=generator)
    for _ in range(cfg.rounds):
        seqs = revise_once(teacher, student, seqs, cfg, sampling, eos_id=eos_id, pad_id=pad_id,
                           generator=generator, stats=stats, engine=engine)
    return seqs
