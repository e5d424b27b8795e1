"""The objectives the module composes (built by Hydra from conf/loss), each an `Objective`
(mgsr/losses/objective.py: the contract `DistillModule` calls). They hold parameters, switches and per-step state;
the math lives in the pure functions of `mgsr.losses`.

Each class's `check(**params)` raises a ValueError naming the config key to change; config validation calls it
before any model loads, the constructor calls it too (one place for each rule). A parameter left out takes the
constructor's default (`Objective.defaults()`): defaults are written once, in the signature; the YAML under
conf/loss/ repeats them only so that Hydra can override them (tests/test_objective_contract.py checks they agree).

Token-level objectives (DacKl, Divergence, Taid) also take `forward(teacher_logits, student_logits, mask)` on aligned
[B, R, V] logits and a [B, R] bool mask and return `(loss, logs)`, logs being floats for the metric group `group`;
SpanCorrelation and MiniLlm need more of the step (`losses(ctx)` passes it).
"""

from __future__ import annotations

import torch

from mgsr.generation import RESPONSE_EXTRAS
from mgsr.losses.dac_kl import (
    BANDS,
    REMAINDERS,
    FixedQuantileHead,
    QuantileHead,
    dac_kl_loss,
    shared_teacher_rows,
)
from mgsr.losses.divergences import check_divergence, divergence_loss, forward_kl, token_mean
from mgsr.losses.minillm import lm_loss, minillm_loss
from mgsr.losses.objective import LmBatch, LmContext, Objective, StepContext
from mgsr.losses.span import RELATIONS, span_correlation_loss
from mgsr.losses.taid import taid_terms, taid_update
from mgsr.spans import SpanExtractor


class DacKl(Objective):
    """DAC-KL (METHOD.md 3). head: learnable (f_sub, trained with the student) | fixed (constant l, u)."""

    group = "dac"

    # The defaults of DAC-KL: here only (check() and conf/loss/distill/dac_kl.yaml take them from this signature).
    def __init__(self, head: str = "learnable", lower: float = 0.2, upper: float = 0.8, *, top_k: int = 32,
                 hidden: int = 64, lower_range=(0.0, 0.3), upper_range=(0.7, 1.0), kappa: float = 50.0,
                 remainder: str = "merge", band: str = "mass", target_class: bool = True, beta: float = 1.0,
                 lr: float | None = None):
        super().__init__()
        self.check(head=head, lower=lower, upper=upper, lower_range=lower_range, upper_range=upper_range,
                   kappa=kappa, remainder=remainder, band=band, target_class=target_class, beta=beta)
        self.head = (QuantileHead(top_k=top_k, hidden=hidden, lower_range=tuple(lower_range),
                                  upper_range=tuple(upper_range))
                     if head == "learnable" else FixedQuantileHead(lower, upper))
        self.kw = dict(kappa=kappa, remainder=remainder, band=band, target_class=target_class, beta=beta,
                       hard=head == "fixed")
        self.lr = lr  # own learning rate for f_sub (None: the student's)

    @classmethod
    def check(cls, **params) -> None:
        """ValueError naming the key to change (config validation calls this before any model loads)."""
        p = {**cls.defaults(), **params}
        head, lower, upper, kappa, beta = p["head"], p["lower"], p["upper"], p["kappa"], p["beta"]
        band, remainder, target_class = p["band"], p["remainder"], p["target_class"]
        lower_range, upper_range = p["lower_range"], p["upper_range"]
        for key, value, allowed in (("head", head, ("learnable", "fixed")), ("band", band, BANDS),
                                    ("remainder", remainder, REMAINDERS)):
            if value not in allowed:
                raise ValueError(f"loss.distill.{key}={value!r}: choose one of {', '.join(allowed)}")
        if band == "off" and not target_class:
            raise ValueError("loss.distill: band=off with target_class=false keeps no class; enable one of them")
        if float(kappa) <= 0 or float(beta) < 0:
            raise ValueError(f"loss.distill: need kappa > 0 and beta >= 0, got kappa={kappa}, beta={beta}")
        if head == "fixed" and not 0.0 <= float(lower) < float(upper) <= 1.0:
            raise ValueError(f"loss.distill: quantiles must satisfy 0 <= lower < upper <= 1, got lower={lower}, "
                             f"upper={upper}")
        if head == "learnable":
            for key, (a, b) in (("lower_range", lower_range), ("upper_range", upper_range)):
                if not 0.0 <= float(a) < float(b) <= 1.0:
                    raise ValueError(f"loss.distill.{key}={[float(a), float(b)]}: need 0 <= low < high <= 1")
            if float(lower_range[1]) > float(upper_range[0]):
                raise ValueError("loss.distill: lower_range must lie below upper_range (lower quantile < upper)")

    def param_groups(self) -> list[dict]:
        """f_sub's parameters (the learnable head), with `lr` when the config gives f_sub its own."""
        groups = super().param_groups()
        if self.lr:
            for g in groups:
                g["lr"] = self.lr
        return groups

    def forward(self, teacher_logits, student_logits, mask):
        teacher = None
        if isinstance(self.head, QuantileHead) and self.head.shares_log_probs_with(teacher_logits, student_logits):
            # one teacher log-softmax (and top-k) on the masked tokens for f_sub's features and the loss
            teacher = shared_teacher_rows(teacher_logits, student_logits, mask, **self.kw)
            top = None if teacher.top is None else teacher.top[0]
            lower, upper = self.head.from_rows(teacher.log_probs, mask, top)
        else:
            lower, upper = self.head(teacher_logits.detach())
        out = dac_kl_loss(teacher_logits, student_logits, mask, lower, upper, teacher=teacher, **self.kw)
        logs = {"kl": out.kl, "coverage": out.coverage, "kept": out.kept, "lower_mean": out.lower_mean,
                "lower_std": out.lower_std, "upper_mean": out.upper_mean, "upper_std": out.upper_std}
        return out.loss, {k: float(v.detach()) for k, v in logs.items()}


class Divergence(Objective):
    """A token-level divergence of METHOD.md 5 (fkl, rkl, skl, jsd, tvd, sfkl, srkl, akl) or ABKD's ab."""

    group = "kd"

    def __init__(self, name: str = "fkl", **params):
        super().__init__()
        self.check(name=name, **params)
        self.name, self.params = name, params

    @classmethod
    def check(cls, **params) -> None:
        """The divergence exists and takes these parameters (mgsr.losses.divergences)."""
        params = {**cls.defaults(), **params}
        check_divergence(params.pop("name"), params)

    def forward(self, teacher_logits, student_logits, mask):
        loss = divergence_loss(self.name, teacher_logits, student_logits, mask, **self.params)
        logs = {self.name: float(loss.detach())}
        if self.name != "fkl":  # the true forward KL, for comparing runs whatever they optimise
            with torch.no_grad():
                fkl = forward_kl(teacher_logits, student_logits)
                logs["fkl"] = float((fkl * mask).sum() / mask.sum().clamp_min(1))
        return loss, logs


class Taid(Objective):
    """TAID (Shing et al., ICLR 2025; mgsr/losses/taid.py): KL(p_t || q) with p_t the detached logit-space
    interpolation of student and teacher, t raised by the authors' adaptive schedule once per optimiser step.

    The loss returned (and logged as taid/loss, taid/kl) is the true KL(p_t || q); the schedule is driven, as in
    the authors' code, by their objective, the cross-entropy -sum p_t log q (taid/ce; same gradient). t, the
    momentum, the previous loss and the micro-batch losses of the current optimiser step are buffers, so they
    are saved with the module's state_dict and a resume continues the schedule exactly. After each training
    micro-batch the module calls `after_step`, which steps the schedule (`on_train_step(step, total, accumulate)`);
    with gradient accumulation the schedule sees the mean of the step's micro-batch objectives (the authors update
    on every micro-batch).
    """

    group = "taid"

    def __init__(self, t_start: float = 0.4, t_end: float = 1.0, alpha: float = 5e-4, beta: float = 0.99,
                 adaptive: bool = True):
        super().__init__()
        self.check(t_start=t_start, t_end=t_end, alpha=alpha, beta=beta, adaptive=adaptive)
        self.hp = dict(t_start=float(t_start), t_end=float(t_end), alpha=float(alpha), beta=float(beta),
                       adaptive=bool(adaptive))
        f64 = dict(dtype=torch.float64)
        self.register_buffer("t", torch.tensor(float(t_start), **f64))
        self.register_buffer("momentum", torch.tensor(0.0, **f64))
        self.register_buffer("prev_loss", torch.tensor(float("inf"), **f64))
        self.register_buffer("pending_sum", torch.tensor(0.0, **f64))  # micro-batch objectives of this step
        self.register_buffer("pending_count", torch.tensor(0, dtype=torch.long))
        self.register_buffer("pending_step", torch.tensor(-1, dtype=torch.long))
        self._last_objective: float | None = None

    @classmethod
    def check(cls, **params) -> None:
        """ValueError naming the key to change (the authors' asserts, plus t_start <= t_end and beta < 1)."""
        p = {**cls.defaults(), **params}
        t_start, t_end, alpha, beta, adaptive = p["t_start"], p["t_end"], p["alpha"], p["beta"], p["adaptive"]
        if not 0.0 <= float(t_start) < 1.0:
            raise ValueError(f"loss.distill.t_start={t_start}: need 0 <= t_start < 1")
        if not 0.0 < float(t_end) <= 1.0 or float(t_end) < float(t_start):
            raise ValueError(f"loss.distill.t_end={t_end}: need t_start <= t_end <= 1 and t_end > 0")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"loss.distill.alpha={alpha}: need 0 <= alpha <= 1 (the step size of t)")
        if not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"loss.distill.beta={beta}: need 0 <= beta < 1 (the momentum coefficient)")
        if not isinstance(adaptive, bool):
            raise ValueError(f"loss.distill.adaptive={adaptive!r}: true or false")

    def update(self, loss: float, step: int, total: int) -> None:
        """One schedule step with objective `loss` at optimiser step `step` of `total` (mgsr.losses.taid)."""
        t, m, prev = taid_update(float(self.t), float(self.momentum), float(self.prev_loss), float(loss),
                                 int(step), int(total), **self.hp)
        self.t.fill_(t)
        self.momentum.fill_(m)
        self.prev_loss.fill_(prev)

    def after_step(self, ctx: StepContext) -> None:
        self.on_train_step(ctx.step, ctx.total_steps, ctx.accumulate)

    def on_train_step(self, step: int, total: int, accumulate: int = 1) -> None:
        """After a training micro-batch: once `accumulate` micro-batches of optimiser step `step` are in (or a new
        step begins), update t with their mean objective."""
        if self._last_objective is None:
            return
        if int(self.pending_count) > 0 and int(self.pending_step) != int(step):
            self._flush(total)  # an incomplete accumulation window (e.g. the end of an epoch)
        self.pending_sum += self._last_objective
        self.pending_count += 1
        self.pending_step.fill_(int(step))
        self._last_objective = None
        if int(self.pending_count) >= max(int(accumulate), 1):
            self._flush(total)

    def _flush(self, total: int) -> None:
        self.update(float(self.pending_sum) / int(self.pending_count), int(self.pending_step), total)
        self.pending_sum.zero_()
        self.pending_count.zero_()

    def forward(self, teacher_logits, student_logits, mask):
        t = float(self.t)
        kl, ce = taid_terms(teacher_logits, student_logits, t)
        loss, objective = token_mean(kl, mask), token_mean(ce.detach(), mask)
        self._last_objective = float(objective)
        return loss, {"t": t, "kl": float(loss.detach()), "ce": self._last_objective,
                      "momentum": float(self.momentum)}


class SpanCorrelation(Objective):
    """Span-level correlation consistency (METHOD.md 4) with NLTK span priors."""

    group = "span"

    def __init__(self, relation: str = "hadamard", chunk_size: int = 64, nltk_data: str | None = None,
                 use_nltk: bool = True, min_tokens: int = 2):
        super().__init__()
        self.check(relation=relation)
        self.relation, self.chunk_size = relation, chunk_size
        self.extractor = SpanExtractor(nltk_data, min_tokens=min_tokens, use_nltk=use_nltk)

    @classmethod
    def check(cls, **params) -> None:
        relation = {**cls.defaults(), **params}["relation"]
        if relation not in RELATIONS:
            raise ValueError(f"loss.span.relation={relation!r}: choose {' or '.join(RELATIONS)}")

    def losses(self, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        return self(ctx.teacher_logits, ctx.student_logits, ctx.mask, tokenizer=ctx.tokenizer,
                    response_ids=ctx.response_ids)

    def forward(self, teacher_logits, student_logits, mask, *, tokenizer, response_ids):
        """`response_ids` [B, R] the response tokens the spans are read from (with `tokenizer`)."""
        pair_mask = self.extractor.pair_mask(tokenizer, response_ids, mask).to(mask.device)
        out = span_correlation_loss(teacher_logits, student_logits, pair_mask, relation=self.relation,
                                    chunk_size=self.chunk_size)
        return out.loss, {"pairs": float(out.num_pairs), "relation_scale": float(out.relation_scale)}


class MiniLlm(Objective):
    """MiniLLM (Gu et al., ICLR 2024; mgsr/losses/minillm.py): policy gradient of the sequence-level reverse KL on
    teacher-mixed student rollouts, with the exact single-step term, length-normalised long-term rewards and PPO
    ratio clipping; plus their language-modelling loss (`lm_weight` x `pt_loss`) on the LM text (the gold batch, or
    `lm_data`), its extra batch (`extra_batch` / `extra_losses` -> `lm_terms`).

    It needs the rollout's behaviour log-probs (`rollout_logprobs`): `forward` takes `seqs=`, a dict with `tokens`
    [B, R], `old_logprob` [B, R] (log q_old at sampling) and `mix_logprob` [B, R] (log p_mix) aligned with the
    response columns, which `losses(ctx)` reads from the step's sequences. Defaults: their `train_minillm.py`
    arguments and GPT-2 scripts."""

    group = "minillm"
    rollout_logprobs = True

    def __init__(self, gamma: float = 0.95, length_norm: bool = True, include_current: bool = True,
                 whitening: bool = True, reward_scaling: float | None = 0.5, reward_clip: float | None = 100.0,
                 clip: float = 0.2, weight_clip: float | None = None, single_step: bool = True,
                 lm_weight: float = 1.0, kd_ratio: float | None = 0.5, lm_data: str | None = None,
                 lm_max_len: int = 512):
        super().__init__()
        self.check(gamma=gamma, reward_scaling=reward_scaling, reward_clip=reward_clip, clip=clip,
                   weight_clip=weight_clip, lm_weight=lm_weight, kd_ratio=kd_ratio, lm_max_len=lm_max_len)
        self.kw = dict(gamma=float(gamma), length_norm=bool(length_norm), include_current=bool(include_current),
                       whitening=bool(whitening), reward_scaling=reward_scaling, reward_clip=reward_clip,
                       clip=float(clip), weight_clip=weight_clip, single_step=bool(single_step))
        self.lm_weight, self.kd_ratio, self.lm_data, self.lm_max_len = float(lm_weight), kd_ratio, lm_data, lm_max_len
        self._lm_text = None  # mgsr.data.lm_text.LmText of `lm_data`, read at the first step that needs it

    @classmethod
    def check(cls, **params) -> None:
        """ValueError naming the key to change."""
        p = {**cls.defaults(), **params}
        gamma, reward_scaling, reward_clip, clip = p["gamma"], p["reward_scaling"], p["reward_clip"], p["clip"]
        weight_clip, lm_weight, kd_ratio, lm_max_len = p["weight_clip"], p["lm_weight"], p["kd_ratio"], p["lm_max_len"]
        if not 0.0 <= float(gamma) <= 1.0:
            raise ValueError(f"loss.distill.gamma={gamma}: need 0 <= gamma <= 1 (the reward discount)")
        if reward_scaling is not None and float(reward_scaling) <= 0:
            raise ValueError(f"loss.distill.reward_scaling={reward_scaling}: need > 0 (or null: no scaling)")
        if reward_clip is not None and float(reward_clip) < 0:
            raise ValueError(f"loss.distill.reward_clip={reward_clip}: need >= 0 (or null)")
        if not 0.0 < float(clip) < 1.0:
            raise ValueError(f"loss.distill.clip={clip}: need 0 < clip < 1 (the PPO ratio clip)")
        if weight_clip is not None and float(weight_clip) <= 0:
            raise ValueError(f"loss.distill.weight_clip={weight_clip}: need > 0 (or null: no cap)")
        if float(lm_weight) < 0:
            raise ValueError(f"loss.distill.lm_weight={lm_weight}: need >= 0 (0: no language-modelling loss)")
        if kd_ratio is not None and not 0.0 <= float(kd_ratio) <= 1.0:
            raise ValueError(f"loss.distill.kd_ratio={kd_ratio}: need 0 <= kd_ratio <= 1 (or null: CE only)")
        if int(lm_max_len) <= 1:
            raise ValueError(f"loss.distill.lm_max_len={lm_max_len}: need > 1")

    def losses(self, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        R = ctx.mask.shape[1]
        extra = {k: ctx.seqs[k][:, :R] for k in RESPONSE_EXTRAS if k in ctx.seqs}
        return self(ctx.teacher_logits, ctx.student_logits, ctx.mask,
                    seqs={"tokens": ctx.response_ids[:, :R], **extra})

    def forward(self, teacher_logits, student_logits, mask, *, seqs):
        if "old_logprob" not in seqs:
            raise ValueError("MiniLlm needs rollouts with recorded log-probs (old_logprob): use fresh student "
                             "rollouts every step (scrg.enabled=true, scrg.student_prob=1, no replay)")
        out = minillm_loss(teacher_logits, student_logits, seqs["tokens"], mask, seqs["old_logprob"],
                           seqs.get("mix_logprob"), **self.kw)
        logs = {"pg": out.pg, "single_step": out.single_step, "reward": out.reward, "ratio": out.ratio,
                "clip_frac": out.clip_frac, "weight": out.weight}
        return out.loss, {k: float(v.detach()) for k, v in logs.items()}

    def lm_terms(self, student_logits, targets, mask, teacher_logits=None):
        """Their `pt_loss` on LM text: (loss, logs) with logs under this group (lm_loss, lm_ce, lm_distil)."""
        loss, ce, distil = lm_loss(student_logits, targets, mask, teacher_logits, kd_ratio=self.kd_ratio)
        return loss, {"lm_loss": float(loss.detach()), "lm_ce": float(ce), "lm_distil": float(distil)}

    def extra_batch(self, ctx: StepContext) -> LmBatch | None:
        """The LM text of this step (with `lm_weight` > 0): `lm_data` (a JSONL of texts, served in order by step) or,
        by default, the gold batch (prompt + response) as plain text; with the teacher when `kd_ratio` is set."""
        if self.lm_weight <= 0:
            return None
        batch = ctx.batch
        if not self.lm_data:
            return LmBatch(batch["input_ids"], batch["attention_mask"], with_teacher=self.kd_ratio is not None)
        if self._lm_text is None:
            from mgsr.data.lm_text import LmText

            self._lm_text = LmText(self.lm_data, ctx.tokenizer, max_len=self.lm_max_len)
        ids, attn = self._lm_text.batch(ctx.step, batch["input_ids"].shape[0], pad_id=ctx.tokenizer.pad_token_id)
        device = batch["input_ids"].device
        return LmBatch(ids.to(device), attn.to(device), with_teacher=self.kd_ratio is not None)

    def extra_losses(self, lm: LmContext) -> tuple[torch.Tensor, dict]:
        """`lm_weight` x their `pt_loss` on the LM text: every real next token is a target."""
        loss, logs = self.lm_terms(lm.student_logits, lm.targets, lm.mask, lm.teacher_logits)
        return self.lm_weight * loss, logs
