"""Loss objects the module composes (built by Hydra from conf/loss). They hold parameters and switches;
the math lives in the pure functions of `mgsr.losses`.

Each `forward(teacher_logits, student_logits, mask)` takes aligned [B, T, V] logits and a [B, T] response
mask and returns `(loss, logs)`, logs being floats for the metric group named by `group`.
"""

from __future__ import annotations

import torch
from torch import nn

from mgsr.losses.dac_kl import FixedQuantileHead, QuantileHead, dac_kl_loss
from mgsr.losses.divergences import DIVERGENCES, divergence_loss, forward_kl
from mgsr.losses.span import span_correlation_loss
from mgsr.spans import SpanExtractor


class DacKl(nn.Module):
    """DAC-KL (METHOD.md 3). head: learnable (f_sub, trained with the student) | fixed (constant l, u)."""

    group = "dac"

    def __init__(self, head: str = "learnable", lower: float = 0.2, upper: float = 0.8, *, top_k: int = 32,
                 hidden: int = 64, lower_range=(0.0, 0.3), upper_range=(0.7, 1.0), kappa: float = 50.0,
                 remainder: str = "merge", band: str = "mass", target_class: bool = True, beta: float = 1.0,
                 lr: float | None = None):
        super().__init__()
        if head not in ("learnable", "fixed"):
            raise ValueError(f"loss.distill.head must be learnable|fixed, got {head!r}")
        if remainder not in ("merge", "drop"):
            raise ValueError(f"loss.distill.remainder must be merge|drop, got {remainder!r}")
        if band not in ("mass", "logprob", "off"):
            raise ValueError(f"loss.distill.band must be mass|logprob|off, got {band!r}")
        if band == "off" and not target_class:
            raise ValueError("loss.distill: band=off with target_class=false keeps no class; enable one of them")
        if beta < 0:
            raise ValueError(f"loss.distill.beta must be >= 0, got {beta}")
        self.head = (QuantileHead(top_k=top_k, hidden=hidden, lower_range=tuple(lower_range),
                                  upper_range=tuple(upper_range))
                     if head == "learnable" else FixedQuantileHead(lower, upper))
        self.kw = dict(kappa=kappa, remainder=remainder, band=band, target_class=target_class, beta=beta,
                       hard=head == "fixed")
        self.lr = lr  # own learning rate for f_sub (None: the student's)

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
        if name not in DIVERGENCES:
            raise ValueError(f"unknown divergence {name!r}; choose one of: {', '.join(sorted(DIVERGENCES))}")
        self.name, self.params = name, params

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
        if relation not in ("hadamard", "cosine"):
            raise ValueError(f"loss.span.relation must be hadamard|cosine, got {relation!r}")
        self.relation, self.chunk_size = relation, chunk_size
        self.extractor = SpanExtractor(nltk_data, min_tokens=min_tokens, use_nltk=use_nltk)

    def forward(self, teacher_logits, student_logits, mask, *, tokenizer, response_ids):
        pair_mask = self.extractor.pair_mask(tokenizer, response_ids, mask).to(mask.device)
        out = span_correlation_loss(teacher_logits, student_logits, pair_mask, relation=self.relation,
                                    chunk_size=self.chunk_size)
        return out.loss, {"pairs": float(out.num_pairs), "relation_scale": float(out.relation_scale)}
