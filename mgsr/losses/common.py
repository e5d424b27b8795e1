"""Reduction helpers shared by every loss, so all of them normalise the same way."""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over positions where `mask` is true.

    values: [B, T] float; mask: [B, T] bool/0-1. Returns a 0-dim float32 tensor;
    an all-false mask gives 0 (not NaN), so an empty batch never poisons the step.
    """
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """float32 log-softmax over the last dim; -inf logits (masked classes) stay -inf."""
    return torch.log_softmax(logits.float(), dim=-1)
