"""DAC-KL: distribution-adaptive clipping KL and its quantile heads (METHOD.md section 3).

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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mgsr.losses.divergences import (
    compute_dtype,
    kl_from_log_probs,
    safe_log,
    safe_logsumexp,
    teacher_student_log_probs,
    to_log_probs,
    token_mean,
    weighted_log_ratio,
)

BANDS = ("mass", "logprob", "off")
REMAINDERS = ("merge", "drop")
# Floor for log-probs used as band thresholds: keeps -inf (masked vocab) out of the interpolation.
_LOGPROB_FLOOR = -1e30


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


def _per_token(x: torch.Tensor | float, shape: torch.Size, ref: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar / [B, T]-broadcastable quantile to [B, T] in ref's dtype, keeping its graph."""
    if not torch.is_tensor(x):
        return torch.full(shape, float(x), dtype=ref.dtype, device=ref.device)
    return torch.broadcast_to(x.to(device=ref.device, dtype=ref.dtype), shape)


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
        lp_c = lp_sorted.clamp_min(_LOGPROB_FLOOR)
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


def _masked_std(x: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    return token_mean((x - mean) ** 2, mask).sqrt()


def dac_kl_loss(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    mask: torch.Tensor,
    lower: torch.Tensor | float,
    upper: torch.Tensor | float,
    *,
    kappa: float = 50.0,
    remainder: str = "merge",
    band: str = "mass",
    target_class: bool = True,
    beta: float = 1.0,
    hard: bool = False,
) -> DacKlOutput:
    """DAC-KL loss (see the module docstring for the formulas).

    teacher_logits, student_logits: [B, T, V]; mask: [B, T] bool (response tokens);
    lower, upper: quantiles broadcastable to [B, T] (per-token from `QuantileHead`, or scalars).
    kappa: soft-mask sharpness; hard=True uses the 0/1 mask (no gradient to lower/upper).
    band: "mass" (cumulative-mass band, [ours]) | "logprob" (band on log-prob values) | "off" (no band).
    target_class: keep k* = argmax p as its own entry (True) or treat it like any other class (False).
    remainder: "merge" (clipped classes form one entry, [ours]) | "drop" (renormalise the kept entries;
        with band="off" only the target is kept, so drop gives KL = 0 by construction).
    beta: weight of the coverage term, which depends only on the teacher and m, so it moves only l/u.
    Reduction: mean over masked tokens; an empty mask gives loss 0.
    """
    if band not in BANDS:
        raise ValueError(f"unknown dac band {band!r}; choose one of: {', '.join(BANDS)}")
    if remainder not in REMAINDERS:
        raise ValueError(f"unknown dac remainder {remainder!r}; choose one of: {', '.join(REMAINDERS)}")
    if band == "off" and not target_class:
        raise ValueError("dac band='off' with target_class=False keeps no class; enable one of them")

    lp, lq = teacher_student_log_probs(teacher_logits, student_logits)
    shape = lp.shape[:-1]
    lower_t, upper_t = _per_token(lower, shape, lp), _per_token(upper, shape, lp)

    # Everything below lives in the teacher's descending order; k* is column 0 (stable sort: first argmax).
    lp_s, order = lp.sort(dim=-1, descending=True, stable=True)
    lq_s = lq.gather(-1, order)
    p_s = lp_s.exp()

    m, rest, hard_mask = _band(lp_s, lower_t, upper_t, band, kappa, hard)
    target = torch.zeros_like(lp_s)
    if target_class:
        target[..., 0] = 1.0
        not_target = 1.0 - target
        m, rest, hard_mask = m * not_target, rest * not_target, hard_mask * not_target
    keep = m + target  # weight with which each class enters a kept (band or target) entry

    if remainder == "merge":
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

    coverage = (keep * p_s).sum(-1)
    kl_mean = token_mean(kl, mask)
    uncovered = token_mean(1.0 - coverage, mask)
    with torch.no_grad():
        kept = token_mean(hard_mask.sum(-1) + target.sum(-1), mask)
        lower_mean, upper_mean = token_mean(lower_t, mask), token_mean(upper_t, mask)
        lower_std = _masked_std(lower_t, mask, lower_mean)
        upper_std = _masked_std(upper_t, mask, upper_mean)
    return DacKlOutput(
        loss=kl_mean + beta * uncovered,
        kl=kl_mean.detach(),
        coverage=token_mean(coverage, mask).detach(),
        kept=kept,
        lower_mean=lower_mean,
        lower_std=lower_std,
        upper_mean=upper_mean,
        upper_std=upper_std,
    )


def _check_ranges(lower_range: tuple[float, float], upper_range: tuple[float, float]) -> None:
    lo0, lo1 = lower_range
    up0, up1 = upper_range
    if not 0.0 <= lo0 <= lo1 <= up0 <= up1 <= 1.0 or lo0 >= up1:
        raise ValueError(
            "quantile head ranges must satisfy 0 <= lower_range[0] <= lower_range[1] <= upper_range[0]"
            f" <= upper_range[1] <= 1, got lower_range={lower_range}, upper_range={upper_range}"
        )


class QuantileHead(nn.Module):
    """f_sub [ours]: per-token band quantiles (l, u) from the teacher's distribution shape.

    Features per token (detached): the teacher's top-k sorted probabilities (zero-padded when V < k) and
    its entropy in nats -> Linear(k+1, hidden) -> GELU -> Linear(hidden, 2) -> sigmoid, mapped to
    l in lower_range and u in upper_range. forward: [B, T, V] -> (lower [B, T], upper [B, T]).
    """

    def __init__(
        self,
        top_k: int = 32,
        hidden: int = 64,
        lower_range: tuple[float, float] = (0.0, 0.3),
        upper_range: tuple[float, float] = (0.7, 1.0),
    ) -> None:
        super().__init__()
        if top_k < 1 or hidden < 1:
            raise ValueError(f"quantile head needs top_k >= 1 and hidden >= 1, got {top_k}, {hidden}")
        _check_ranges(tuple(lower_range), tuple(upper_range))
        self.top_k = top_k
        self.lower_range = (float(lower_range[0]), float(lower_range[1]))
        self.upper_range = (float(upper_range[0]), float(upper_range[1]))
        self.net = nn.Sequential(nn.Linear(top_k + 1, hidden), nn.GELU(), nn.Linear(hidden, 2))
        # Small (not zero) output weights: outputs start near mid-range, yet every parameter gets a
        # gradient from the first step (zero weights would block the first layer once).
        nn.init.normal_(self.net[2].weight, std=0.01)
        nn.init.zeros_(self.net[2].bias)

    def features(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        """[B, T, V] -> [B, T, top_k + 1]: sorted top-k teacher probabilities and the entropy."""
        dtype = self.net[0].weight.dtype
        lp = to_log_probs(teacher_logits.detach(), compute_dtype(teacher_logits, self.net[0].weight))
        p = lp.exp()
        k = min(self.top_k, p.shape[-1])
        top = p.topk(k, dim=-1).values
        top = F.pad(top, (0, self.top_k - k))
        entropy = -weighted_log_ratio(p, lp, torch.zeros_like(lp)).sum(-1, keepdim=True)
        return torch.cat([top, entropy], dim=-1).to(dtype)

    def forward(self, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gates = torch.sigmoid(self.net(self.features(teacher_logits)))
        (lo0, lo1), (up0, up1) = self.lower_range, self.upper_range
        return lo0 + (lo1 - lo0) * gates[..., 0], up0 + (up1 - up0) * gates[..., 1]


class FixedQuantileHead(nn.Module):
    """Fixed-quantile variant (dac.head: fixed): constant (l, u) per token, no parameters."""

    def __init__(self, lower: float = 0.2, upper: float = 0.8) -> None:
        super().__init__()
        if not 0.0 <= lower < upper <= 1.0:
            raise ValueError(
                f"dac quantiles must satisfy 0 <= lower < upper <= 1, got lower={lower}, upper={upper}"
            )
        self.lower, self.upper = float(lower), float(upper)

    def forward(self, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T, V] -> (lower [B, T], upper [B, T]) filled with the constants."""
        kw = {"dtype": compute_dtype(teacher_logits), "device": teacher_logits.device}
        shape = teacher_logits.shape[:-1]
        return torch.full(shape, self.lower, **kw), torch.full(shape, self.upper, **kw)
