"""Batched sampling with the KV cache, and continuation of ragged prefixes.

One sampler serves SCRG rollouts, SCRG re-generation, SeqKD and evaluation, so a speed-up lands
everywhere at once. Sequences use the canonical layout (see `mgsr.data.collate`): the prompt is
left-padded into columns [0, P) and the response starts at column P for every row.

Re-generation after a splice (SCRG) re-uses the KV cache of the scoring forward: rows keep different
prefix lengths, so each row's cache is shifted right until all prefixes end in the same column. Keys and
values do not depend on their column (GPT-2 adds learned positions at the input, RoPE rotates by
`position_ids`), so a shift plus the attention mask keeps them exact.

Decoding is ragged: a row that has finished leaves the model's batch (its KV cache rows are dropped), so a row
SCRG did not revise costs nothing and a step costs what its live rows cost, with the same tokens (`_decode`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.modeling_outputs import CausalLMOutputWithPast


@dataclass
class SamplingConfig:
    """How tokens are drawn. Training rollouts: temperature 1, top_k 0, top_p 1 (METHOD.md 2);
    evaluation adds `no_repeat_ngram_size=6` (METHOD.md 7)."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    no_repeat_ngram_size: int = 0
    greedy: bool = False
    max_length: int | None = None  # `generate` only: also cap prompt (its own tokens) + response per row
    compact: bool = True  # drop finished rows from the model's batch (same tokens: see `_decode`)

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.max_length is not None and self.max_length <= 0:
            raise ValueError(f"max_length must be > 0, got {self.max_length}")
        if self.temperature <= 0 and not self.greedy:
            raise ValueError(f"temperature must be > 0 (or set greedy: true), got {self.temperature}")

    def processors(self) -> LogitsProcessorList:
        procs = LogitsProcessorList()
        if self.no_repeat_ngram_size > 0:
            procs.append(NoRepeatNGramLogitsProcessor(self.no_repeat_ngram_size))
        if not self.greedy:
            if self.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k > 0:
                procs.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                procs.append(TopPLogitsWarper(self.top_p))
        return procs


# transformers renamed the forward's `past_key_values` argument and output field to `cache`; the old name warns
# on every call (a FutureWarning per decoded token) and goes in 5.40. Pick the name the installed version
# declares, once: the rename is library-wide, so the output class answers for every model.
CACHE_KW = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def model_cache(out) -> DynamicCache:
    """The KV cache a forward with `use_cache=True` returned."""
    return getattr(out, CACHE_KW)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only, so left padding and holes do not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def response_logits(model, seqs: dict, **kw) -> torch.Tensor:
    """Logits that predict each response token, [B, R, V]: position t predicts response token t (only the last
    R+1 columns are computed). The module, the baselines and the exposure-bias measurement all use this one."""
    P, ids = seqs["prompt_len"], seqs["input_ids"]
    out = model(input_ids=ids, attention_mask=seqs["attention_mask"], position_ids=position_ids(seqs["attention_mask"]),
                logits_to_keep=ids.shape[1] - P + 1, **kw)
    return out.logits[:, :-1]


def _next_token(logits, history, rows, bsz: int, cfg: SamplingConfig, procs, generator) -> torch.Tensor:
    """Draw one token for each of the `bsz` rows of the batch; `logits` [b, V] / `history` [b, L] are those of the
    rows `rows` [b] still in the model's batch. The draw is made over all `bsz` rows (a finished row gets flat
    scores and its token is discarded): torch.multinomial's noise per row does not depend on the other rows'
    probabilities, so dropping finished rows from the model's batch leaves every live row's token unchanged."""
    scores = procs(history, logits.float()) if len(procs) else logits.float()
    if scores.shape[0] != bsz:
        scores = scores.new_zeros(bsz, scores.shape[1]).index_copy_(0, rows, scores)
    if cfg.greedy:
        return scores.argmax(-1)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _record(tok, finished, budget, step: int, eos_id: int, pad_id: int, out: list, valid: list):
    """One decode step's bookkeeping: pad the drawn token of finished rows, record token and validity, and return
    (token, rows live before it, rows finished after it)."""
    live = ~finished
    tok = torch.where(live, tok, torch.full_like(tok, pad_id))
    out.append(tok)
    valid.append(live)
    return tok, live, finished | (tok == eos_id) | (budget <= step + 1)


# Compacting copies the whole KV cache (about one decode step's memory traffic), so it waits until this share of
# the model's batch has finished; with a batch of 8 or fewer every finished row leaves at once.
COMPACT_SHARE = 0.125


@torch.no_grad()
def _decode(model, logits, cache, history, attn, pos, budget, cfg, eos_id, pad_id, generator):
    """Sample until every row has emitted EOS or spent its `budget` [B] of new tokens.

    logits [B, V]: next-token logits after the prefix; history [B, L] / attn [B, L]: the prefix ids and mask
    (history feeds the n-gram ban); pos [B]: position id of the next token. Returns new tokens [B, N]
    (pad after a row finishes) and their validity mask.

    Ragged decode (`cfg.compact`): rows that finished leave the model's batch (the KV cache keeps the rows `rows`),
    so a step costs what its live rows cost; a row with budget 0 (SCRG: a row not re-generated) costs nothing.
    """
    procs = cfg.processors()
    bsz = logits.shape[0]
    finished = budget <= 0
    rows = torch.arange(bsz, device=logits.device)  # the original rows in the model's batch, in order
    compact = cfg.compact and hasattr(cache, "batch_select_indices")
    out, valid = [], []
    for step in range(int(budget.max().item()) if bsz else 0):
        tok = _next_token(logits, history, rows, bsz, cfg, procs, generator)
        tok, live, finished = _record(tok, finished, budget, step, eos_id, pad_id, out, valid)
        done = finished[rows] if len(rows) < bsz else finished  # rows outside the batch finished already
        n_done = int(done.sum())  # the one host sync of a step: it answers "all finished" and "compact now"
        if n_done == len(rows):
            break
        if len(rows) < bsz:
            tok, live = tok[rows], live[rows]
        if compact and n_done >= max(1, COMPACT_SHARE * len(rows)):
            keep = (~done).nonzero().squeeze(1)
            rows, tok, live, history, attn, pos = (x[keep] for x in (rows, tok, live, history, attn, pos))
            cache.batch_select_indices(keep)
        history, attn = torch.cat([history, tok[:, None]], dim=1), torch.cat([attn, live.long()[:, None]], dim=1)
        step_out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=pos[:, None], use_cache=True,
                         **{CACHE_KW: cache})
        cache, logits = model_cache(step_out), step_out.logits[:, -1]
        pos = pos + 1
    if not out:
        empty = torch.empty(bsz, 0, dtype=torch.long, device=logits.device)
        return empty, empty.bool()
    return torch.stack(out, 1), torch.stack(valid, 1)


def _assemble(prompt_ids, prompt_mask, responses, response_valid):
    """Canonical layout from prompts [B, P] and responses [B, R] (valid mask [B, R])."""
    input_ids = torch.cat([prompt_ids, responses], dim=1)
    attention_mask = torch.cat([prompt_mask.long(), response_valid.long()], dim=1)
    response_mask = torch.cat([torch.zeros_like(prompt_mask, dtype=torch.bool), response_valid], dim=1)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "prompt_len": prompt_ids.shape[1],
    }


@torch.no_grad()
def generate(model, prompt_ids, prompt_mask, cfg: SamplingConfig, *, eos_id: int, pad_id: int, generator=None):
    """Sample responses for left-padded prompts [B, P]; returns the canonical-layout dict.

    The response includes the EOS token; tokens after it are `pad_id` with attention/response mask 0.
    """
    prompt_mask = prompt_mask.long()
    pos = position_ids(prompt_mask)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=pos, use_cache=True)
    budget = torch.full((prompt_ids.shape[0],), cfg.max_new_tokens, device=prompt_ids.device)
    if cfg.max_length is not None:
        budget = torch.minimum(budget, cfg.max_length - prompt_mask.sum(-1))
    resp, valid = _decode(
        model, out.logits[:, -1], model_cache(out), prompt_ids, prompt_mask, pos[:, -1] + 1,
        budget, cfg, eos_id, pad_id, generator,
    )
    return _assemble(prompt_ids, prompt_mask, resp, valid)


def _shift_right(x: torch.Tensor, shift: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Per-row right shift along `dim` into `width` columns; vacated columns are zero.

    x has batch at dim 0; row b moves by shift[b] >= 0. Row b's column t takes x[b, t - shift[b]].
    """
    cols = torch.arange(width, device=x.device)
    src = cols[None, :] - shift[:, None]  # [B, W]
    ok = (src >= 0) & (src < x.shape[dim])
    src = src.clamp(0, x.shape[dim] - 1)
    view = [x.shape[0]] + [1] * (x.dim() - 1)
    view[dim] = width
    idx = src.view(view).expand(*[s if i != dim else width for i, s in enumerate(x.shape)])
    out = x.gather(dim, idx)
    return out * ok.view(view).to(out.dtype)


@torch.no_grad()
def continue_generation(model, seqs: dict, keep: torch.Tensor, cfg: SamplingConfig, *, eos_id: int, pad_id: int,
                        cache: DynamicCache | None = None, cache_valid: torch.Tensor | None = None,
                        active: torch.Tensor | None = None, generator=None) -> dict:
    """Keep the first `keep[b]` response tokens of each row and let `model` sample the rest.

    seqs: canonical layout with the already spliced responses. keep [B] >= 1: response tokens to keep.
    cache (optional): a KV cache of a forward over `seqs["input_ids"]`, exact for the first
    `P + cache_valid[b]` columns of row b (SCRG: the prefix before the first changed token). Only the
    remaining kept tokens are fed, so the unchanged prefix is never recomputed.
    active [B] bool: rows to re-generate; other rows come back unchanged.
    The response length cap is `cfg.max_new_tokens` in total (kept + new).
    """
    ids, attn, P = seqs["input_ids"], seqs["attention_mask"].long(), seqs["prompt_len"]
    bsz, device = ids.shape[0], ids.device
    active = torch.ones(bsz, dtype=torch.bool, device=device) if active is None else active
    resp_len = seqs["response_mask"][:, P:].sum(-1)
    keep = torch.where(active, keep, resp_len).clamp_min(1)
    end = P + keep  # columns [0, end) of row b are the kept prefix
    if cache is None:
        cached = torch.zeros_like(keep)
        cache = DynamicCache()
    else:
        # the last kept token is always fed: its output is the next-token distribution
        cached = torch.minimum(P + cache_valid, end - 1)

    # Right-align the cached columns of every row at column C, then the columns still to feed in a
    # block of width D, also right-aligned, so all prefixes end in the same column.
    C = int(cached.max().item())
    D = int((end - cached).max().item())
    shift = C - cached
    if C > 0:
        for layer in cache.layers:
            layer.keys = _shift_right(layer.keys[:, :, :C], shift, C, dim=2)
            layer.values = _shift_right(layer.values[:, :, :C], shift, C, dim=2)
    col = torch.arange(ids.shape[1], device=device)[None, :]
    cached_attn = _shift_right((attn * (col < cached[:, None]))[:, :C], shift, C, dim=1)
    n_feed = end - cached
    blk = torch.arange(D, device=device)[None, :]
    blk_ok = blk >= (D - n_feed)[:, None]
    src = (cached[:, None] + blk - (D - n_feed)[:, None]).clamp(0, ids.shape[1] - 1)
    block = torch.where(blk_ok, ids.gather(1, src), torch.full_like(src, pad_id))
    block_attn = blk_ok.long() * attn.gather(1, src)  # prompt padding inside the block stays masked
    prefix_attn = torch.cat([cached_attn, block_attn], dim=1)
    pos = position_ids(prefix_attn)
    out = model(input_ids=block, attention_mask=prefix_attn, position_ids=pos[:, C:], use_cache=True,
                **{CACHE_KW: cache if C > 0 else None})
    # The n-gram ban needs the whole prefix in one matrix; cheap, it is never fed to the model.
    history = torch.cat([_shift_right(ids[:, :C], shift, C, dim=1), block], dim=1)
    budget = torch.where(active, cfg.max_new_tokens - keep, torch.zeros_like(keep))
    last_tok = ids.gather(1, (end - 1)[:, None]).squeeze(1)
    budget = torch.where(last_tok == eos_id, torch.zeros_like(budget), budget)  # a kept EOS ends the row
    new, new_valid = _decode(
        model, out.logits[:, -1], model_cache(out), history, prefix_attn, pos[:, -1] + 1,
        budget, cfg, eos_id, pad_id, generator,
    )

    # Reassemble: kept response tokens, then the new ones, scattered after each row's `keep`.
    R = max(int((keep + new_valid.sum(-1)).max().item()), 1)
    resp_cols = torch.arange(R, device=device)[None, :]
    old_resp = ids[:, P:]
    if old_resp.shape[1] < R:
        old_resp = torch.cat([old_resp, old_resp.new_full((bsz, R - old_resp.shape[1]), pad_id)], 1)
    kept_ok = resp_cols < keep[:, None]
    resp = torch.where(kept_ok, old_resp[:, :R], torch.full_like(old_resp[:, :R], pad_id))
    valid = kept_ok.clone()
    if new.shape[1]:
        tgt = keep[:, None] + torch.arange(new.shape[1], device=device)[None, :]
        tgt_ok = new_valid & (tgt < R)
        tgt = torch.where(tgt_ok, tgt, torch.full_like(tgt, R))  # out-of-range writes go to a dropped column
        resp = torch.cat([resp, resp.new_full((bsz, 1), pad_id)], 1).scatter(1, tgt, new)[:, :R]
        valid = torch.cat([valid, valid.new_zeros(bsz, 1)], 1).scatter(1, tgt, tgt_ok)[:, :R]
        resp = torch.where(valid, resp, torch.full_like(resp, pad_id))
    return _assemble(ids[:, :P], attn[:, :P], resp, valid)


# Per-token extras a rollout may carry, [B, R] aligned with the response columns (MiniLLM's behaviour log-probs).
RESPONSE_EXTRAS = ("old_logprob", "mix_logprob")


@torch.no_grad()
def generate_mixed(teacher, student, prompt_ids, prompt_mask, cfg: SamplingConfig, *, mix: float = 0.2, eos_id: int,
                   pad_id: int, generator=None, vocab: int | None = None) -> dict:
    """MiniLLM's teacher-mixed sampling: each token is drawn from p_mix = mix p_teacher + (1 - mix) q_student, both
    models decoding with their own KV caches (LMOps `generate(..., mix_in_model=teacher, mix_in_alpha=0.2)`).

    Returns the canonical-layout dict plus `old_logprob` [B, R] = log q_student(y_t) at sampling time and
    `mix_logprob` [B, R] = log p_mix(y_t) (0 after a row ends). The warpers of `cfg` act on each model's logits
    before mixing (the defaults, temperature 1 / top_k 0 / top_p 1, change nothing). `vocab`: the shared vocabulary
    (both logits cut to it; default the smaller of the two). mix = 0 draws exactly the tokens `generate(student)`
    draws with the same generator; mix = 1 samples the teacher."""
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"scrg.mix must be in [0, 1], got {mix}")
    prompt_mask = prompt_mask.long()
    pos = position_ids(prompt_mask)
    s_out = student(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=pos, use_cache=True)
    t_out = teacher(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=pos, use_cache=True)
    s_cache, t_cache = model_cache(s_out), model_cache(t_out)
    s_logits, t_logits = s_out.logits[:, -1], t_out.logits[:, -1]
    V = vocab or min(s_logits.shape[-1], t_logits.shape[-1])
    bsz = prompt_ids.shape[0]
    budget = torch.full((bsz,), cfg.max_new_tokens, device=prompt_ids.device)
    if cfg.max_length is not None:
        budget = torch.minimum(budget, cfg.max_length - prompt_mask.sum(-1))
    procs = cfg.processors()
    history, attn, pos = prompt_ids, prompt_mask, pos[:, -1] + 1
    finished = budget <= 0
    out, valid, old_lp, mix_lp = [], [], [], []
    for step in range(int(budget.max().item()) if bsz else 0):
        s_scores, t_scores = s_logits[:, :V].float(), t_logits[:, :V].float()
        if len(procs):
            s_scores, t_scores = procs(history, s_scores), procs(history, t_scores)
        q = torch.softmax(s_scores, dim=-1)
        probs = q if mix == 0.0 else mix * torch.softmax(t_scores, dim=-1) + (1.0 - mix) * q
        if cfg.greedy:
            tok = probs.argmax(-1)
        else:
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        tok, live, finished = _record(tok, finished, budget, step, eos_id, pad_id, out, valid)
        safe = tok.clamp(0, V - 1)[:, None]
        zero = torch.zeros_like(tok, dtype=torch.float32)
        old_lp.append(torch.where(live, torch.log_softmax(s_scores, -1).gather(1, safe).squeeze(1), zero))
        mix_lp.append(torch.where(live, probs.gather(1, safe).squeeze(1).clamp_min(1e-38).log(), zero))
        if bool(finished.all()):
            break
        history, attn = torch.cat([history, tok[:, None]], dim=1), torch.cat([attn, live.long()[:, None]], dim=1)
        s_step = student(input_ids=tok[:, None], attention_mask=attn, position_ids=pos[:, None], use_cache=True,
                         **{CACHE_KW: s_cache})
        t_step = teacher(input_ids=tok[:, None], attention_mask=attn, position_ids=pos[:, None], use_cache=True,
                         **{CACHE_KW: t_cache})
        s_cache, s_logits = model_cache(s_step), s_step.logits[:, -1]
        t_cache, t_logits = model_cache(t_step), t_step.logits[:, -1]
        pos = pos + 1
    if not out:
        empty = torch.empty(bsz, 0, dtype=torch.long, device=prompt_ids.device)
        seqs = _assemble(prompt_ids, prompt_mask, empty, empty.bool())
        return seqs | {k: empty.float() for k in RESPONSE_EXTRAS}
    seqs = _assemble(prompt_ids, prompt_mask, torch.stack(out, 1), torch.stack(valid, 1))
    return seqs | {"old_logprob": torch.stack(old_lp, 1), "mix_logprob": torch.stack(mix_lp, 1)}
