"""Supervised fine-tuning loss: token cross-entropy on the gold response (METHOD.md section 1)."""

from __future__ import annotations

import torch

from mgsr.losses.divergences import compute_dtype, to_log_probs, token_mean


def sft_loss(student_logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_SFT = mean over masked tokens of -log q(targets[b, t] | b, t).

    student_logits [B, T, V] (position t predicts targets[:, t]); targets [B, T] long; mask [B, T] bool.
    Targets at masked positions are ignored (they may be padding or -100). Returns a 0-dim float32
    tensor (float64 for float64 logits); an empty mask gives 0.
    """
    lq = to_log_probs(student_logits, compute_dtype(student_logits))
    mask = mask.bool()
    safe_targets = torch.where(mask, targets, torch.zeros_like(targets))
    nll = -lq.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    return token_mean(nll, mask)
