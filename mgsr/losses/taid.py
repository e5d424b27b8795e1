"""TAID: Temporally Adaptive Interpolated Distillation (Shing et al., ICLR 2025), the pure math.

Following the authors' code (SakanaAI/TAID, src/distil_losses/taid.py, class TAID):

    p_t   = softmax((1 - t) * stopgrad(z_s) + t * z_t)           (logit-space interpolation, detached)
    L_t   = -sum_v p_t,v log q_v                                   (their loss: the cross-entropy to p_t)
          = KL(p_t || q) + H(p_t)                                  (same gradient, since p_t is a constant)

with z_s, z_t the student's and teacher's logits [B, T, V] and q = softmax(z_s). The adaptive schedule of t,
applied once per optimiser step to the token mean of L_t (their `update_t`):

    first call:  prev = L; t unchanged
    otherwise:   r     = (prev - L) / (prev + 1e-15)               (relative decrease of the objective)
                 m     = beta * m + (1 - beta) * r                 (momentum)
                 delta = alpha * sigmoid(m) * (1 - t)
                 t     = min(t_end, max(t_start + (t_end - t_start) * step / total, t + delta))
                 prev  = L

The linear ramp is a lower bound, so t never falls behind it and never decreases. Defaults t_start = 0.4,
t_end = 1, alpha = 5e-4, beta = 0.99 (their argparse defaults and the Phi-3 -> TinyLlama script; their
StableLM / Llama-2 scripts use t_start = 0.2).
"""

from __future__ import annotations

import math

import torch

from mgsr.losses.divergences import compute_dtype, kl_from_log_probs, to_log_probs, weighted_log_ratio

TAID_EPS = 1e-15  # the authors' guard in the relative change


def _scaled(weight: float, logits: torch.Tensor) -> torch.Tensor:
    """weight * logits with an exact 0 for weight 0 (0 * -inf would be NaN on masked columns). The test is made in
    the logits' dtype: a weight that rounds to 0 there (a denormal t, or 1 - t one ulp from 1) is 0."""
    w = torch.tensor(weight, dtype=logits.dtype)
    return torch.zeros_like(logits) if w == 0 else w.to(logits.device) * logits


def interpolated_log_probs(teacher_logits: torch.Tensor, student_logits: torch.Tensor, t: float) -> torch.Tensor:
    """log p_t = log_softmax((1 - t) * z_s + t * z_t), both detached, in the compute dtype. [B, T, V]."""
    t = float(t)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"TAID's t must lie in [0, 1], got {t}")
    dtype = compute_dtype(teacher_logits, student_logits)
    z = _scaled(1.0 - t, student_logits.detach().to(dtype)) + _scaled(t, teacher_logits.detach().to(dtype))
    return to_log_probs(z, dtype)


def taid_terms(teacher_logits: torch.Tensor, student_logits: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL(p_t || q), cross-entropy -sum p_t log q), each per token [B, T]; gradients reach the student only via q.

    0 log 0 = 0 in value and gradient: columns where p_t = 0 (e.g. -inf logits) contribute nothing.
    """
    lpt = interpolated_log_probs(teacher_logits, student_logits, t)
    lq = to_log_probs(student_logits, lpt.dtype)
    kl = kl_from_log_probs(lpt, lq)
    entropy = -weighted_log_ratio(lpt.exp(), lpt, torch.zeros_like(lpt)).sum(-1)
    return kl, kl + entropy


def taid_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor, t: float) -> torch.Tensor:
    """KL(p_t || q) per token [B, T] (the true divergence; its gradient is that of TAID's cross-entropy)."""
    return taid_terms(teacher_logits, student_logits, t)[0]


def _sigmoid(x: float) -> float:
    """1 / (1 + exp(-x)) without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def taid_update(t: float, momentum: float, prev_loss: float, loss: float, step: int, total: int, *,
                t_start: float = 0.4, t_end: float = 1.0, alpha: float = 5e-4, beta: float = 0.99,
                adaptive: bool = True) -> tuple[float, float, float]:
    """One step of TAID's schedule (module docstring): returns the new (t, momentum, prev_loss).

    `step` is the number of optimiser steps done before this one (Lightning's global_step), `total` the run's
    number of optimiser steps; `prev_loss = inf` marks the first call. Pure Python floats (float64).
    """
    if math.isinf(prev_loss):
        return t, momentum, loss
    relative = (prev_loss - loss) / (prev_loss + TAID_EPS)
    momentum = beta * momentum + (1.0 - beta) * relative
    delta = alpha * _sigmoid(momentum) * (1.0 - t)
    target = t_start + (t_end - t_start) * step / max(total, 1)
    t = min(t_end, max(target, t + delta)) if adaptive else target
    return t, momentum, loss
