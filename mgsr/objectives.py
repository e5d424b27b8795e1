"""Loss objects the module composes (built by Hydra from conf/loss). They hold parameters and switches;
the math lives in the pure functions of `mgsr.losses`.

Each class's static `check(**params)` raises a ValueError naming the config key to change; config validation
calls it before any model loads, the constructor calls it too (one place for each rule).

Each `forward(teacher_logits, student_logits, mask)` takes aligned [B, T, V] logits and a [B, T] response
mask and returns `(loss, logs)`, logs being floats for the metric group named by `group`.
"""

from __future__ import annotations

import torch
from torch import nn

from mgsr.losses.dac_kl import BANDS, REMAINDERS, FixedQuantileHead, QuantileHead, dac_kl_loss
from mgsr.losses.divergences import check_divergence, divergence_loss, forward_kl
from mgsr.losses.span import RELATIONS, span_correlation_loss
from mgsr.spans import SpanExtractor


class DacKl(nn.Module):
    """DAC-KL (METHOD.md 3). head: learnable (f_sub, trained with the student) | fixed (constant l, u)."""

    group = "dac"

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

    @staticmethod
    def check(*, head="learnable", lower=0.2, upper=0.8, lower_range=(0.0, 0.3), upper_range=(0.7, 1.0),
              kappa=50.0, remainder="merge", band="mass", target_class=True, beta=1.0, **_) -> None:
        """ValueError naming the key to change (config validation calls this before any model loads)."""
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

    def forward(self, teacher_logits, student_logits, mask):
        lower, upper = self.head(teacher_logits.detach())
        out = dac_kl_loss(teacher_logits, student_logits, mask, lower, upper, **self.kw)
        logs = {"kl": out.kl, "coverage": out.coverage, "kept": out.kept, "lower_mean": out.lower_mean,
                "lower_std": out.lower_std, "upper_mean": out.upper_mean, "upper_std": out.upper_std}
        return out.loss, {k: float(v) for k, v in logs.items()}


class Divergence(nn.Module):
    """A token-level divergence of METHOD.md 5 (fkl, rkl, skl, jsd, tvd, sfkl, srkl, akl)."""

    group = "kd"

    def __init__(self, name: str = "fkl", **params):
        super().__init__()
        self.check(name=name, **params)
        self.name, self.params = name, params

    @staticmethod
    def check(*, name: str = "fkl", **params) -> None:
        check_divergence(name, params)

    def forward(self, teacher_logits, student_logits, mask):
        loss = divergence_loss(self.name, teacher_logits, student_logits, mask, **self.params)
        logs = {self.name: float(loss.detach())}
        if self.name != "fkl":  # the true forward KL, for comparing runs whatever they optimise
            with torch.no_grad():
                fkl = forward_kl(teacher_logits, student_logits)
                logs["fkl"] = float((fkl * mask).sum() / mask.sum().clamp_min(1))
        return loss, logs


class SpanCorrelation(nn.Module):
    """Span-level correlation consistency (METHOD.md 4) with NLTK span priors."""

    group = "span"

    def __init__(self, relation: str = "hadamard", chunk_size: int = 64, nltk_data: str | None = None,
                 use_nltk: bool = True, min_tokens: int = 2):
        super().__init__()
        self.check(relation=relation)
        self.relation, self.chunk_size = relation, chunk_size
        self.extractor = SpanExtractor(nltk_data, min_tokens=min_tokens, use_nltk=use_nltk)

    @staticmethod
    def check(*, relation: str = "hadamard", **_) -> None:
        if relation not in RELATIONS:
            raise ValueError(f"loss.span.relation={relation!r}: choose {' or '.join(RELATIONS)}")

    def forward(self, teacher_logits, student_logits, mask, *, tokenizer, response_ids):
        pair_mask = self.extractor.pair_mask(tokenizer, response_ids, mask).to(mask.device)
        out = span_correlation_loss(teacher_logits, student_logits, pair_mask, relation=self.relation,
                                    chunk_size=self.chunk_size)
        return out.loss, {"pairs": float(out.num_pairs), "relation_scale": float(out.relation_scale)}
