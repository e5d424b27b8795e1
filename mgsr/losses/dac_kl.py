"""DAC-KL: distribution-adaptive clipping KL and its quantile heads (METHOD.md section 3).

Per token, sort the teacher distribution p descending; for class v let e_v be the teacher mass ranked
above v and c_v = e_v + p_v. A quantile pair 0 <= l < u <= 1 selects a band of classes via a mask m_v,
the teacher's top-1 class k* is kept as its own entry, and the remaining classes are either merged into
one remainder entry (default, [ours]) or dropped with renormalisation (the paper's literal reading):

    merge:  P = [m p, p_k*, R_p],  Q = [m q, q_k*, R_q],  R_x = sum_{v != k*} (1 - m_v) x_v
    drop:   P = [m p, p_k*] / Z_p, Q = [m q, q_k*] / Z_q
    loss  = mean_tokens KL(P || Q) + beta * mean_tokens (1 - coverage),  coverage = p_k* + sum_v m_v p_v

Merging is a stochastic coarse-graining applied to p and q alike, so KL(P || Q) <= KL(p || q).

Cost. The default (band="mass", remainder="merge") runs as custom autograd Functions over the masked
tokens only, with hand-written backward passes and a handful of reused [N, V] buffers (on CPU a fresh
V-wide buffer costs more than the arithmetic written into it):

    d KL / d z_v = q_v (sum_w P_w) - w_v p_v - (R_p / R_q) r_v q_v      (z: student logits; w = m + [v = k*],
                                                                        r = 1 - w computed without cancellation)
    d KL / d m_v = p_v (log p_v - log q_v - log(R_p / R_q) - 1) + (R_p / R_q) q_v,  d coverage / d m_v = p_v

* hard mask (fixed head): `topk` of the teacher with a cap (`TOPK_CAP`) plus the exact tail masses
  (masked sums of p and q over the classes outside the cap). Exact whenever the cap reaches the band's
  upper quantile (cumulative mass of the top classes >= u): every class outside it then has e_v >= u and
  is in the remainder. Other tokens take the full-sort path (the top-k path is used when at least half of
  the tokens qualify: splitting a batch between paths copies rows).
* soft mask (learnable head): one full stable sort. A cap is not exact here: the sigmoid gives every tail
  class a weight that depends on its own e_v (up to 0.5 when u = 1), which needs the full order.
* tokens whose fast value is not finite or whose remainder mass is below sqrt(float tiny) (masked -inf
  vocabulary columns, extreme logits) are recomputed with the reference formulation below (log-space
  sums, guarded 0 log 0), so values and gradients match it wherever the fast path is not exact.
The other bands / remainders use the reference formulation (`_reference_terms`) directly.
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
    to_log_probs,
    token_mean,
    weighted_log_ratio,
)

BANDS = ("mass", "logprob", "off")
REMAINDERS = ("merge", "drop")
# Floor for log-probs used as band thresholds: keeps -inf (masked vocab) out of the interpolation.
_LOGPROB_FLOOR = -1e30
# Classes sorted exactly by the hard-mask top-k path; the rest only enter through their summed mass.
TOPK_CAP = 256


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


def _per_token(x: torch.Tensor | float, shape: torch.Size, dtype: torch.dtype, device) -> torch.Tensor:
    """Broadcast a scalar / [B, T]-broadcastable quantile to [B, T] in `dtype`, keeping its graph."""
    if not torch.is_tensor(x):
        return torch.full(shape, float(x), dtype=dtype, device=device)
    return torch.broadcast_to(x.to(device=device, dtype=dtype), shape)


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


def _reference_terms(
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
    return kl, coverage, (hard_mask.sum(-1) + target.sum(-1)).detach()


# --------------------------------------------------------------------------- fast path: band=mass, merge


def _dot(a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Row-wise sum_v a_v b_v of [n, V] tensors via a reused buffer; torch.sum's cascade summation keeps
    it as accurate as the reference (a float32 BLAS dot loses ~1e-5 over 50k classes)."""
    return torch.mul(a, b, out=scratch).sum(-1)


def _tiny(dtype: torch.dtype) -> float:
    # Below this a remainder mass is left to the log-space reference: its terms may be denormal there.
    return torch.finfo(dtype).tiny ** 0.5


_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float64: torch.int64}


def _descending_order(lp: torch.Tensor) -> torch.Tensor:
    """The permutation of `lp.sort(dim=-1, descending=True, stable=True)` for log-probs (<= 0), found by sorting
    the bit patterns of -lp as integers: for floats >= 0 the integer order is the float order, ties stay ties
    (kept in index order by the stable sort), and an integer sort is ~1.5x faster than a float sort on CPU."""
    return (-lp).view(_SAME_WIDTH_INT[lp.dtype]).sort(dim=-1, stable=True).indices


def _hard_range(cum: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, width: int):
    """Columns [i0, i1) of the hard band (c_v > l and e_v < u) in a descending-sorted row; cum [n, K].

    cum and e = [0, cum[:-1]] are non-decreasing, so the band is one contiguous run of columns.
    """
    i0 = torch.searchsorted(cum, lower.unsqueeze(-1).contiguous(), right=True).squeeze(-1)
    below = torch.searchsorted(cum, upper.unsqueeze(-1).contiguous()).squeeze(-1).clamp(max=width - 1)
    i1 = below + (upper > 0).long()  # e_0 = 0 < u
    return i0, i1


def _finish(kl_kept, r_p, r_q, dtype):
    """KL from the kept part and the remainder masses; flags tokens for the reference path."""
    tiny = _tiny(dtype)
    log_ratio = torch.log(r_p.clamp_min(tiny)) - torch.log(r_q.clamp_min(tiny))
    kl = kl_kept + r_p * log_ratio
    bad = ~torch.isfinite(kl) | (r_p < tiny) | (r_q < tiny)
    return torch.where(bad, torch.zeros_like(kl), kl), bad


class _SortedMassMerge(torch.autograd.Function):
    """band=mass, remainder=merge over rows [n, V] with one full stable sort of the teacher (soft or hard)."""

    @staticmethod
    def forward(ctx, s, lp, lower, upper, kappa, hard, target_class):
        dtype, V = lp.dtype, lp.shape[-1]
        lq = to_log_probs(s, dtype)
        order = _descending_order(lp)
        lp_s = lp.gather(-1, order)
        pd = lq.gather(-1, order)  # lq_s for now; buffers are reused in place below
        q_s = torch.exp(pd, out=lq)
        del lq
        torch.sub(lp_s, pd, out=pd)
        p_s = lp_s.exp_()
        del lp_s
        pd.mul_(p_s)  # p_v (log p_v - log q_v), teacher order
        cum = p_s.cumsum(-1)
        lo, up = lower.detach().to(dtype), upper.detach().to(dtype)
        i0, i1 = _hard_range(cum, lo, up, V)
        first = torch.clamp(i0, min=1) if target_class else i0
        kept = (i1 - first).clamp_min(0).to(dtype) + float(target_class)
        sna = snb = None
        if hard:
            cols = torch.arange(V, device=lp.device)
            w = ((cols >= i0.unsqueeze(-1)) & (cols < i1.unsqueeze(-1))).to(dtype)
            r = 1.0 - w
        else:
            b = torch.empty_like(cum)  # kappa (u - e_v), e = [0, cum[:-1]]
            b[:, 0] = up
            torch.sub(up.unsqueeze(-1), cum[:, :-1], out=b[:, 1:])
            b.mul_(kappa)
            a = cum.sub_(lo.unsqueeze(-1)).mul_(kappa)  # kappa (c_v - l)
            del cum
            sa = torch.sigmoid(a)
            sna = a.neg_().sigmoid_()
            w = torch.sigmoid(b)
            snb = b.neg_().sigmoid_()
            w.mul_(sa)  # m = sigmoid(a) sigmoid(b)
            r = torch.addcmul(sna, sa, snb, out=sa)  # 1 - m without cancellation
        if target_class:
            w[:, 0] = 1.0
            r[:, 0] = 0.0
        scratch = torch.empty_like(p_s)
        kl_kept = _dot(w, pd, scratch)
        cov = _dot(w, p_s, scratch)
        r_p, r_q = _dot(r, p_s, scratch), _dot(r, q_s, scratch)
        del scratch
        kl, bad = _finish(kl_kept, r_p, r_q, dtype)
        ctx.mark_non_differentiable(kept, bad)
        ctx.save_for_backward(order, p_s, q_s, pd, w, r, sna, snb, r_p, r_q, cov, bad)
        ctx.opts = (kappa, hard, target_class, s.dtype)
        return kl, torch.where(bad, torch.zeros_like(cov), cov), kept, bad

    @staticmethod
    def backward(ctx, g_kl, g_cov, _g_kept, _g_bad):
        order, p_s, q_s, pd, w, r, sna, snb, r_p, r_q, cov, bad = ctx.saved_tensors
        kappa, hard, target_class, s_dtype = ctx.opts
        zero = torch.zeros_like(g_kl)
        g = torch.where(bad, zero, g_kl)
        rho = torch.where(bad, zero, r_p / r_q.clamp_min(_tiny(r_q.dtype)))
        grad_l = grad_u = None
        if not hard and (ctx.needs_input_grad[2] or ctx.needs_input_grad[3]):
            gc = torch.where(bad, zero, g_cov)
            c1 = gc - g * (torch.log(rho.clamp_min(_tiny(rho.dtype))) + 1.0)
            c2 = g * rho
            # d loss / d m_v, times m_v: d m / d l = -kappa m sigmoid(-a), d m / d u = kappa m sigmoid(-b)
            gm = torch.mul(pd, g.unsqueeze(-1)).addcmul_(p_s, c1.unsqueeze(-1)).addcmul_(q_s, c2.unsqueeze(-1))
            gm.mul_(w)
            if target_class:
                gm[:, 0] = 0.0  # w[:, 0] is the target entry, not a band weight
            scratch = torch.empty_like(gm)
            grad_l = -kappa * _dot(sna, gm, scratch)
            grad_u = kappa * _dot(snb, gm, scratch)
            del scratch, gm
        grad_s = None
        if ctx.needs_input_grad[0]:
            total = cov + r_p  # sum of P (1 up to rounding)
            gs = torch.addcmul(total.unsqueeze(-1), r, -rho.unsqueeze(-1))
            gs.mul_(q_s).addcmul_(w, p_s, value=-1.0).mul_(g.unsqueeze(-1))
            grad_s = torch.empty_like(gs).scatter_(-1, order, gs).to(s_dtype)
        return grad_s, None, grad_l, grad_u, None, None, None


class _TopkHardMassMerge(torch.autograd.Function):
    """band=mass, remainder=merge, hard mask, for rows whose top-K classes reach the upper quantile.

    head_lp / head_idx [n, K]: the teacher's top-K log-probs in stable descending order. Tail classes all
    have e_v >= u, so they sit in the remainder with weight 1 and only their masses are needed.
    `lp` is consumed (overwritten) to save a V-wide buffer.
    """

    @staticmethod
    def forward(ctx, s, lp, head_lp, head_idx, lower, upper, target_class):
        dtype, K = lp.dtype, head_idx.shape[-1]
        lq = to_log_probs(s, dtype)
        lq_h = lq.gather(-1, head_idx)
        p_h, q_h = head_lp.exp(), lq_h.exp()
        cum = p_h.cumsum(-1)
        i0, i1 = _hard_range(cum, lower.detach().to(dtype), upper.detach().to(dtype), K)
        cols = torch.arange(K, device=lp.device)
        w = ((cols >= i0.unsqueeze(-1)) & (cols < i1.unsqueeze(-1))).to(dtype)
        if target_class:
            w[:, 0] = 1.0  # the target entry replaces column 0 of the band
        kept = w.sum(-1)
        r = 1.0 - w
        pd = p_h * (head_lp - lq_h)
        tail_p = lp.exp_().scatter_(-1, head_idx, 0.0)  # exact tail masses: masked sums over the rest
        tail_q = lq.exp_().scatter_(-1, head_idx, 0.0)
        r_p = (r * p_h).sum(-1) + tail_p.sum(-1)
        r_q = (r * q_h).sum(-1) + tail_q.sum(-1)
        cov = (w * p_h).sum(-1)
        kl, bad = _finish((w * pd).sum(-1), r_p, r_q, dtype)
        ctx.mark_non_differentiable(kept, bad)
        ctx.save_for_backward(tail_q, head_idx, p_h, q_h, w, r, r_p, r_q, cov, bad)
        ctx.s_dtype = s.dtype
        return kl, torch.where(bad, torch.zeros_like(cov), cov), kept, bad

    @staticmethod
    def backward(ctx, g_kl, _g_cov, _g_kept, _g_bad):
        tail_q, head_idx, p_h, q_h, w, r, r_p, r_q, cov, bad = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        zero = torch.zeros_like(g_kl)
        g = torch.where(bad, zero, g_kl)
        rho = torch.where(bad, zero, r_p / r_q.clamp_min(_tiny(r_q.dtype)))
        total = (cov + r_p).unsqueeze(-1)
        head = (q_h * (total - rho.unsqueeze(-1) * r) - w * p_h) * g.unsqueeze(-1)
        grad = torch.mul(tail_q, g.unsqueeze(-1) * (total - rho.unsqueeze(-1))).scatter_(-1, head_idx, head)
        return grad.to(ctx.s_dtype), None, None, None, None, None, None


def _stable_topk(lp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of [n, V] rows in the order of a stable descending sort (ties by ascending index), and
    whether the k-th value is strictly above every class left out (else the set itself is ambiguous)."""
    vals, idx = lp.topk(k + 1, dim=-1)
    clean = vals[:, k - 1] > vals[:, k]
    vals, idx = vals[:, :k], idx[:, :k]
    by_index = idx.argsort(dim=-1)
    vals, idx = vals.gather(-1, by_index), idx.gather(-1, by_index)
    vals, pos = vals.sort(dim=-1, descending=True, stable=True)
    return vals, idx.gather(-1, pos), clean


def _mass_merge_rows(t, s, lower, upper, *, kappa, hard, target_class):
    """Per-row (kl, coverage, kept) for teacher/student logits rows [n, V] (band=mass, remainder=merge).

    Routing: hard mask -> top-k path where exact; the rest -> full-sort path; tokens either flags -> the
    reference formulation.
    """
    dtype = compute_dtype(t, s)
    n, V = t.shape
    lp = to_log_probs(t, dtype)
    out = [torch.zeros(n, dtype=dtype, device=t.device) for _ in range(3)]
    todo = torch.ones(n, dtype=torch.bool, device=t.device)

    def run(mask, fn):
        """fn(rows or None) on the rows where `mask` holds; stores its values, returns its 'bad' flags there."""
        nonlocal out
        rows = None if bool(mask.all()) else mask.nonzero().squeeze(-1)
        *values, bad = fn(rows)
        if rows is None:
            out = list(values)
            return bad.clone()
        out = [x.index_put((rows,), v) for x, v in zip(out, values)]
        flags = torch.zeros_like(mask)
        flags[rows] = bad
        return flags

    def rows_of(rows, *xs):
        return xs if rows is None else tuple(x.index_select(0, rows) for x in xs)

    if hard and V > TOPK_CAP + 1:
        head_lp, head_idx, clean = _stable_topk(lp, TOPK_CAP)
        ok = clean & (head_lp.exp().cumsum(-1)[:, -1] >= upper.detach().to(dtype))
        # Splitting rows between paths copies them: worth it only when most rows can take the cheap one.
        if 2 * int(ok.sum()) >= n:
            # lp is consumed by this path: later paths recompute the log-probs of their rows
            todo = ~ok | run(ok, lambda rows: _TopkHardMassMerge.apply(
                *rows_of(rows, s, lp, head_lp, head_idx, lower, upper), target_class))
            lp = None
    if bool(todo.any()):
        def sorted_path(rows):
            lp_r = lp if lp is not None and rows is None else to_log_probs(rows_of(rows, t)[0], dtype)
            return _SortedMassMerge.apply(*rows_of(rows, s), lp_r, *rows_of(rows, lower, upper), kappa, hard,
                                          target_class)

        todo = run(todo, sorted_path)
        lp = None
    if bool(todo.any()):
        def reference(rows):
            t_r, s_r, lo_r, up_r = rows_of(rows, t, s, lower, upper)
            terms = _reference_terms(to_log_probs(t_r, dtype), to_log_probs(s_r, dtype), lo_r, up_r, band="mass",
                                     remainder="merge", kappa=kappa, hard=hard, target_class=target_class)
            return (*terms, torch.zeros_like(terms[2], dtype=torch.bool))

        run(todo, reference)
    return tuple(out)


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
    Reduction: mean over masked tokens; an empty mask gives loss 0. Masked-out tokens are never computed.
    """
    if band not in BANDS:
        raise ValueError(f"unknown dac band {band!r}; choose one of: {', '.join(BANDS)}")
    if remainder not in REMAINDERS:
        raise ValueError(f"unknown dac remainder {remainder!r}; choose one of: {', '.join(REMAINDERS)}")
    if band == "off" and not target_class:
        raise ValueError("dac band='off' with target_class=False keeps no class; enable one of them")

    dtype = compute_dtype(teacher_logits, student_logits)
    shape, vocab = teacher_logits.shape[:-1], teacher_logits.shape[-1]
    lower_t = _per_token(lower, shape, dtype, teacher_logits.device)
    upper_t = _per_token(upper, shape, dtype, teacher_logits.device)
    mask = mask.bool()

    # Only the masked tokens are computed: rows [n, V] of the flattened batch.
    rows = mask.reshape(-1).nonzero().squeeze(-1)
    n = rows.numel()
    t_rows, s_rows = teacher_logits.detach().reshape(-1, vocab), student_logits.reshape(-1, vocab)
    lo_rows, up_rows = lower_t.reshape(-1), upper_t.reshape(-1)
    if n < mask.numel():
        t_rows, s_rows, lo_rows, up_rows = (x.index_select(0, rows) for x in (t_rows, s_rows, lo_rows, up_rows))
    if n == 0:
        kl = coverage = kept = s_rows.sum(-1).to(dtype)  # empty, but attached to the graph
    elif band == "mass" and remainder == "merge":
        kl, coverage, kept = _mass_merge_rows(t_rows, s_rows, lo_rows, up_rows, kappa=kappa, hard=hard,
                                              target_class=target_class)
    else:
        kl, coverage, kept = _reference_terms(
            to_log_probs(t_rows, dtype), to_log_probs(s_rows, dtype), lo_rows, up_rows, band=band,
            remainder=remainder, kappa=kappa, hard=hard, target_class=target_class)
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
        entropy = -torch.special.xlogy(p, p).sum(-1, keepdim=True)  # 0 log 0 = 0; two V-wide passes
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
