"""DAC-KL, the reference formulation: every band and remainder in plain autograd (METHOD.md section 3).

This file defines the values. `dac_kl_loss` (mgsr/losses/dac_kl.py) computes the same loss, for the
default band="mass", remainder="merge" through the fast autograd Functions of mgsr/losses/dac_kl_fast.py,
and falls back to `reference_terms` for the tokens those cannot handle exactly and for every other mode.
`dac_kl_reference` is the whole loss through this file alone, for tests and benchmarks.

Per token, sort the teacher distribution p descending; for class v let e_v be the teacher mass ranked
above v and c_v = e_v + p_v. A quantile pair 0 <= l < u <= 1 selects a band of classes via a mask m_v,
the teacher's top-1 class k* is kept as its own entry, and the remaining classes are either merged into
one remainder entry (default, [ours]) or dropped with renormalisation (the paper's literal reading):

    merge:  P = [m p, p_k*, R_p],  Q = [m q, q_k*, R_q],  R_x = sum_{v != k*} (1 - m_v) x_v
    drop:   P = [m p, p_k*] / Z_p, Q = [m q, q_k*] / Z_q
    loss  = mean_tokens KL(P || Q) + beta * mean_tokens (1 - coverage),  coverage = p_k* + sum_v m_v p_v

Merging is a stochastic coarse-graining applied to p and q alike, so KL(P || Q) <= KL(p || q).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mgsr.losses.divergences import (
    compute_dtype,
    kl_from_log_probs,
    safe_log,
    safe_logsumexp,
    to_log_probs,
    token_mean,
    weighted_log_ratio,
)

BANDS = ("mass", "logprob", "off")
REMAINDERS = ("merge", "drop")
# Floor for log-probs used as band thresholds: keeps -inf (masked vocab) out of the interpolation.
LOGPROB_FLOOR = -1e30
# Soft-mask sharpness when the caller gives none (METHOD.md 3: kappa -> inf is the hard mask).
DEFAULT_KAPPA = 50.0


@dataclass
class TeacherRows:
    """The teacher on the masked tokens, computed once and shared by the quantile head and the loss.

    logits [n, V] (detached) and log_probs [n, V] (compute dtype) in the order of mask.reshape(-1).nonzero();
    top: `stable_topk(log_probs, k)` of dac_kl_fast.py ((values, indices, clean), [n, k]) when computed, else None.
    The loss's fast path overwrites log_probs in place (it saves a V-wide buffer): read it before the loss.
    """

    logits: torch.Tensor
    log_probs: torch.Tensor
    top: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def teacher_rows(teacher_logits: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> TeacherRows:
    """[B, T, V] teacher logits and a [B, T] mask -> the masked rows and their log-probs in `dtype`."""
    flat = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    keep = mask.bool().reshape(-1)
    if not bool(keep.all()):
        flat = flat.index_select(0, keep.nonzero().squeeze(-1))
    return TeacherRows(flat, to_log_probs(flat, dtype))


# (kl, coverage, kept) per row [n] from (teacher rows, student rows [n, V], lower, upper [n]) and the
# compute dtype.
RowTerms = Callable[[TeacherRows, torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype],
                    tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class DacKlOutput:
    """DAC-KL result. `loss` carries the gradient; every other field is a detached scalar for logging."""

    loss: torch.Tensor
    kl: torch.Tensor  # mean over tokens of KL(P || Q)
    coverage: torch.Tensor  # mean over tokens of p_k* + sum_v m_v p_v
    kept: torch.Tensor  # mean over tokens of the number of classes kept (hard band + target)
    lower_mean: torch.Tensor
    lower_std: torch.Tensor
    upper_mean: torch.Tensor
    upper_std: torch.Tensor


def _quantile_desc(sorted_desc: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Value at fractional rank q * (V - 1) of a descending-sorted [..., V] row (linear interpolation).

    Differentiable in q (through the interpolation fraction), so a learned l/u gets a gradient.
    """
    last = sorted_desc.shape[-1] - 1
    pos = q * last
    lo = pos.detach().floor().clamp(0, last).long()
    hi = (lo + 1).clamp(max=last)
    frac = pos - lo.to(pos.dtype)
    v_lo = sorted_desc.gather(-1, lo.unsqueeze(-1)).squeeze(-1)
    v_hi = sorted_desc.gather(-1, hi.unsqueeze(-1)).squeeze(-1)
    return v_lo + frac * (v_hi - v_lo)


def _band(
    lp_sorted: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, band: str, kappa: float, hard: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Band mask over descending-sorted classes: (m, 1 - m, hard 0/1 mask), each [B, T, V].

    mass:    m_v = sigmoid(kappa (c_v - l)) * sigmoid(kappa (u - e_v))      (hard: c_v > l and e_v < u)
    logprob: thresholds hi = Q(l), lo = Q(u) at fractional ranks l(V-1), u(V-1) of the sorted log-probs;
             m_v = sigmoid(kappa (hi - log p_v)) * sigmoid(kappa (log p_v - lo))   (hard: lo <= log p_v <= hi)
    off:     m = 0.
    1 - m is formed as sigmoid(-a) + sigmoid(a) sigmoid(-b), which has no cancellation when m ~ 1.
    """
    l_, u_ = lower.unsqueeze(-1), upper.unsqueeze(-1)
    if band == "off":
        zeros = torch.zeros_like(lp_sorted)
        return zeros, torch.ones_like(lp_sorted), zeros
    if band == "mass":
        cum = lp_sorted.exp().cumsum(-1)
        above = F.pad(cum[..., :-1], (1, 0))
        a, b = kappa * (cum - l_), kappa * (u_ - above)
        hard_mask = (cum > l_) & (above < u_)
    else:
        lp_c = lp_sorted.clamp_min(LOGPROB_FLOOR)
        hi = _quantile_desc(lp_c, lower).unsqueeze(-1)
        lo = _quantile_desc(lp_c, upper).unsqueeze(-1)
        a, b = kappa * (hi - lp_c), kappa * (lp_c - lo)
        hard_mask = (lp_c <= hi) & (lp_c >= lo)
    hard_mask = hard_mask.to(lp_sorted.dtype)
    if hard:
        return hard_mask, 1.0 - hard_mask, hard_mask
    m = torch.sigmoid(a) * torch.sigmoid(b)
    one_minus_m = torch.sigmoid(-a) + torch.sigmoid(a) * torch.sigmoid(-b)
    return m, one_minus_m, hard_mask


def reference_terms(
    lp: torch.Tensor, lq: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, *, band: str, remainder: str,
    kappa: float, hard: bool, target_class: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (KL(P || Q), coverage, classes kept) [...] from log-probs [..., V]; plain autograd.

    The formulation of METHOD.md 3 written out directly (every band and remainder): it defines the values
    the fast paths must reproduce, and takes the tokens they cannot handle exactly.
    """
    # Everything below lives in the teacher's descending order; k* is column 0 (stable sort: first argmax).
    lp_s, order = lp.sort(dim=-1, descending=True, stable=True)
    lq_s = lq.gather(-1, order)
    p_s = lp_s.exp()

    m, rest, hard_mask = _band(lp_s, lower, upper, band, kappa, hard)
    target = torch.zeros_like(lp_s)
    if target_class:
        target[..., 0] = 1.0
        not_target = 1.0 - target
        m, rest, hard_mask = m * not_target, rest * not_target, hard_mask * not_target
    keep = m + target  # weight with which each class enters a kept (band or target) entry

    if remainder == "merge":
        # KL = sum_v keep_v p_v log(p_v / q_v) + R_p log(R_p / R_q)
        kept_kl = weighted_log_ratio(keep * p_s, lp_s, lq_s).sum(-1)  # band entries + target entry
        log_rest = safe_log(rest)
        log_r_p = safe_logsumexp(log_rest + lp_s)  # masked sums in log space: no 1 - coverage cancellation
        log_r_q = safe_logsumexp(log_rest + lq_s)
        kl = kept_kl + weighted_log_ratio(log_r_p.exp(), log_r_p, log_r_q)
    else:
        # Renormalise in log space (log-softmax over the kept entries): Z_p can underflow to 0 in linear
        # space while the renormalised P is perfectly well defined.
        log_keep = safe_log(keep)
        live = torch.isfinite(safe_logsumexp(log_keep + lp_s)).unsqueeze(-1)  # anything kept at all
        log_pp = torch.log_softmax(torch.where(live, log_keep + lp_s, torch.zeros_like(lp_s)), dim=-1)
        log_qq = torch.log_softmax(torch.where(live, log_keep + lq_s, torch.zeros_like(lq_s)), dim=-1)
        kl = torch.where(live.squeeze(-1), kl_from_log_probs(log_pp, log_qq), torch.zeros_like(lp_s[..., 0]))
    coverage = (keep * p_s).sum(-1)  # p_k* + sum_v m_v p_v
    return kl, coverage, (hard_mask.sum(-1) + target.sum(-1)).detach()


# --------------------------------------------------------------------------- the loss around per-row terms


def check_options(band: str, remainder: str, target_class: bool) -> None:
    if band not in BANDS:
        raise ValueError(f"unknown dac band {band!r}; choose one of: {', '.join(BANDS)}")
    if remainder not in REMAINDERS:
        raise ValueError(f"unknown dac remainder {remainder!r}; choose one of: {', '.join(REMAINDERS)}")
    if band == "off" and not target_class:
        raise ValueError("dac band='off' with target_class=False keeps no class; enable one of them")


def _per_token(x: torch.Tensor | float, shape: torch.Size, dtype: torch.dtype, device) -> torch.Tensor:
    """Broadcast a scalar / [B, T]-broadcastable quantile to [B, T] in `dtype`, keeping its graph."""
    if not torch.is_tensor(x):
        return torch.full(shape, float(x), dtype=dtype, device=device)
    return torch.broadcast_to(x.to(device=device, dtype=dtype), shape)


def _masked_std(x: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    return token_mean((x - mean) ** 2, mask).sqrt()


def masked_token_loss(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor,
    lower: torch.Tensor | float, upper: torch.Tensor | float, *, beta: float, row_terms: RowTerms,
    teacher: TeacherRows | None = None,
) -> DacKlOutput:
    """The DAC-KL loss from per-row terms, computed on the masked tokens only (rows [n, V] of the
    flattened batch): mean KL + beta * mean (1 - coverage), and the logged statistics. Empty mask: loss 0.
    teacher: `teacher_rows(teacher_logits, mask, dtype)` when the caller has computed it already."""
    dtype = compute_dtype(teacher_logits, student_logits)
    shape, vocab = teacher_logits.shape[:-1], teacher_logits.shape[-1]
    lower_t = _per_token(lower, shape, dtype, teacher_logits.device)
    upper_t = _per_token(upper, shape, dtype, teacher_logits.device)
    mask = mask.bool()

    rows = mask.reshape(-1).nonzero().squeeze(-1)
    n = rows.numel()
    s_rows = student_logits.reshape(-1, vocab)
    lo_rows, up_rows = lower_t.reshape(-1), upper_t.reshape(-1)
    if n < mask.numel():
        s_rows, lo_rows, up_rows = (x.index_select(0, rows) for x in (s_rows, lo_rows, up_rows))
    if n == 0:
        kl = coverage = kept = s_rows.sum(-1).to(dtype)  # empty, but attached to the graph
    else:
        if teacher is None:
            teacher = teacher_rows(teacher_logits, mask, dtype)
        kl, coverage, kept = row_terms(teacher, s_rows, lo_rows, up_rows, dtype)
    denom = max(n, 1)
    kl_mean = kl.sum() / denom
    uncovered = (1.0 - coverage).sum() / denom
    with torch.no_grad():
        kept_mean = kept.sum() / denom
        lower_mean, upper_mean = token_mean(lower_t, mask), token_mean(upper_t, mask)
        lower_std = _masked_std(lower_t, mask, lower_mean)
        upper_std = _masked_std(upper_t, mask, upper_mean)
    return DacKlOutput(
        loss=kl_mean + beta * uncovered,
        kl=kl_mean.detach(),
        coverage=(coverage.sum() / denom).detach(),
        kept=kept_mean,
        lower_mean=lower_mean,
        lower_std=lower_std,
        upper_mean=upper_mean,
        upper_std=upper_std,
    )


def reference_row_terms(
    *, band: str, remainder: str, kappa: float, hard: bool, target_class: bool
) -> RowTerms:
    """`reference_terms` on the teacher rows' log-probs and the student rows' log-softmax, as a `RowTerms`."""

    def terms(teacher, s_rows, lo_rows, up_rows, dtype):
        lp, lq = teacher.log_probs, to_log_probs(s_rows, dtype)
        return reference_terms(lp, lq, lo_rows, up_rows, band=band, remainder=remainder, kappa=kappa, hard=hard,
                               target_class=target_class)

    return terms


# dac_kl_loss's keyword options and defaults (the fast entry point spells them out in its signature)
REFERENCE_DEFAULTS = {"kappa": DEFAULT_KAPPA, "remainder": "merge", "band": "mass", "target_class": True, "beta": 1.0,
                      "hard": False}


def dac_kl_reference(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor,
                     lower: torch.Tensor | float, upper: torch.Tensor | float, **options) -> DacKlOutput:
    """`dac_kl_loss` with every token through `reference_terms` (same arguments, same definition). `options`: the
    keyword options of `dac_kl_loss` (kappa, remainder, band, target_class, beta, hard), defaults included."""
    unknown = set(options) - set(REFERENCE_DEFAULTS)
    if unknown:
        raise TypeError(f"dac_kl_reference: unknown options {sorted(unknown)}")
    o = {**REFERENCE_DEFAULTS, **options}
    kappa, remainder, band, target_class, beta, hard = (o[k] for k in REFERENCE_DEFAULTS)
    check_options(band, remainder, target_class)
    terms = reference_row_terms(band=band, remainder=remainder, kappa=kappa, hard=hard,
                                target_class=target_class)
    return masked_token_loss(teacher_logits, student_logits, mask, lower, upper, beta=beta, row_terms=terms)
