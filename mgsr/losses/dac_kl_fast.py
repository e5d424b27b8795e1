"""DAC-KL fast path: band="mass", remainder="merge" as custom autograd Functions (METHOD.md section 3).

The values are defined by `reference_terms` (mgsr/losses/dac_kl_reference.py); `dac_kl_loss`
(mgsr/losses/dac_kl.py) routes rows to these Functions and sends the tokens they flag to the reference.

Cost. The Functions run over the masked tokens only, with hand-written backward passes and a handful of
reused [N, V] buffers (on CPU a fresh V-wide buffer costs more than the arithmetic written into it):

    d KL / d z_v = q_v (sum_w P_w) - w_v p_v - (R_p / R_q) r_v q_v      (z: student logits; w = m + [v = k*],
                                                                        r = 1 - w computed without cancellation)
    d KL / d m_v = p_v (log p_v - log q_v - log(R_p / R_q) - 1) + (R_p / R_q) q_v,  d coverage / d m_v = p_v

* hard mask (fixed head), `TopkHardMassMerge`: the teacher's top-K classes (K = `TOPK_CAP` in dac_kl.py)
  plus the exact tail masses (masked sums of p and q over the classes outside the cap). Exact whenever the
  cap reaches the band's upper quantile (cumulative mass of the top classes >= u): every class outside it
  then has e_v >= u and is in the remainder.
* `SortedMassMerge` (soft or hard mask): one full stable sort. A cap is not exact for the soft mask: the
  sigmoid gives every tail class a weight that depends on its own e_v (up to 0.5 when u = 1), which needs
  the full order.
* Both flag ("bad") the tokens whose fast value is not finite or whose remainder mass is below
  sqrt(float tiny) (masked -inf vocabulary columns, extreme logits); those are left to the reference.
"""

from __future__ import annotations

import torch

from mgsr.losses.divergences import to_log_probs


def _dot(a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Row-wise sum_v a_v b_v of [n, V] tensors via a reused buffer; torch.sum's cascade summation keeps
    it as accurate as the reference (a float32 BLAS dot loses ~1e-5 over 50k classes)."""
    return torch.mul(a, b, out=scratch).sum(-1)


def _tiny(dtype: torch.dtype) -> float:
    # Below this a remainder mass is left to the log-space reference: its terms may be denormal there.
    return torch.finfo(dtype).tiny ** 0.5


_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float64: torch.int64}


def descending_order(lp: torch.Tensor) -> torch.Tensor:
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


class SortedMassMerge(torch.autograd.Function):
    """band=mass, remainder=merge over rows [n, V] with one full stable sort of the teacher (soft or hard)."""

    @staticmethod
    def forward(ctx, s, lp, lower, upper, kappa, hard, target_class):
        dtype, V = lp.dtype, lp.shape[-1]
        lq = to_log_probs(s, dtype)
        order = descending_order(lp)
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


class TopkHardMassMerge(torch.autograd.Function):
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


def stable_topk(lp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of [n, V] rows in the order of a stable descending sort (ties by ascending index), and
    whether the k-th value is strictly above every class left out (else the set itself is ambiguous)."""
    vals, idx = lp.topk(k + 1, dim=-1)
    clean = vals[:, k - 1] > vals[:, k]
    vals, idx = vals[:, :k], idx[:, :k]
    by_index = idx.argsort(dim=-1)
    vals, idx = vals.gather(-1, by_index), idx.gather(-1, by_index)
    vals, pos = vals.sort(dim=-1, descending=True, stable=True)
    return vals, idx.gather(-1, pos), clean
