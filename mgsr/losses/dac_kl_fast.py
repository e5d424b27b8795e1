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
* `SortedMassMerge` (soft or hard mask): one full stable sort; the reference-exact fallback.
* soft mask (learnable head), `TopkSoftMassMerge`: a cap is not exact for the soft mask (the sigmoid gives every
  tail class a weight that depends on its own e_v), so the tail's e_v come from a histogram over log p with a
  worst-case error bound per row; rows over the bound take `SortedMassMerge`.
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


class TopkSoftMassMerge(torch.autograd.Function):
    """band=mass, remainder=merge, soft mask, without a full sort: the teacher's top-K classes exactly (head)
    plus a histogram of the tail's log-probs for the tail's cumulative masses.

    Head (the top-K in stable descending order, K = `SOFT_TOPK_CAP` in dac_kl.py): exactly as `SortedMassMerge`.
    Tail (every other class): e_v = C_K + F_v with C_K the head's mass and F_v the tail mass ranked above v.
    F_v is estimated from a histogram of the tail over log p (`SOFT_BUCKETS` buckets of `SOFT_BUCKET_WIDTH`
    nats below the K-th log-prob): F_v ~ E_b + (M_b - p_v) / 2 for v in bucket b (E_b: tail mass of the buckets
    above, M_b: bucket mass), so |error of e_v| <= M_b. The tail's masses and sums are exact (masked sums);
    only the tail's mask weights m_v = sigmoid(kappa (u - e_v)) carry the estimate, with
    |error of m_v| <= kappa sigmoid(kappa (u - E_b)) M_b =: beta_b. Requires (callers check):
    C_K >= u and kappa (C_K - l) >= SOFT_TAIL_MIN_A, so sigmoid(kappa (c_v - l)) is 1 in float32 there and
    the tail's l-gradient is below 1e-8 of kappa (left out).
    A row is flagged (left to the full-sort path) when the bound on the error of its KL, kappa times it for
    the u-gradient, exceeds `tol`: kappa max_b beta_b (sum_tail |pd| + (|log rho| + 1) T_p + rho T_q) > tol.
    `lp` is consumed (overwritten).
    """

    @staticmethod
    def forward(ctx, s, lp, head_lp, head_idx, lower, upper, kappa, target_class, buckets, width, tol):
        dtype, (n, V), K = lp.dtype, lp.shape, head_idx.shape[-1]
        lq = to_log_probs(s, dtype)
        lq_h = lq.gather(-1, head_idx)
        p_h, q_h = head_lp.exp(), lq_h.exp()
        pd_h = p_h * (head_lp - lq_h)
        lo, up = lower.detach().to(dtype), upper.detach().to(dtype)
        # ---- head: SortedMassMerge's soft band on K columns
        cum = p_h.cumsum(-1)
        c_k = cum[:, -1].to(torch.float64)
        i0, i1 = _hard_range(cum, lo, up, K)
        first = torch.clamp(i0, min=1) if target_class else i0
        kept = (i1 - first).clamp_min(0).to(dtype) + float(target_class)
        b = torch.empty_like(cum)
        b[:, 0] = up
        torch.sub(up.unsqueeze(-1), cum[:, :-1], out=b[:, 1:])
        b.mul_(kappa)
        a = (cum - lo.unsqueeze(-1)).mul_(kappa)
        sa, sna = torch.sigmoid(a), torch.sigmoid(-a)
        sb, snb = torch.sigmoid(b), torch.sigmoid(-b)
        w = sa * sb
        r = sna + sa * snb
        if target_class:
            w[:, 0] = 1.0
            r[:, 0] = 0.0
        # ---- tail: x = (p, q, p (log p - log q)) with the head columns zeroed
        # class-major stacks ([3, n, V] seen as [n, 3, V]): each row block is contiguous, for index_add_ /
        # index_select without a copy, and the bmm below reads them in place
        x = torch.empty(3, n, V, dtype=dtype, device=lp.device).transpose(0, 1)
        p, q, pd = x.unbind(1)
        torch.exp(lp, out=p)
        torch.exp(lq, out=q)
        torch.sub(lp, lq, out=pd).mul_(p)
        del lq
        x.scatter_(-1, head_idx.unsqueeze(1).expand(n, 3, K), 0.0)
        # Bucket of each class: floor((log p_K - log p_v) / width), as an int32 index into the flattened
        # [n, buckets] histogram (index_add_ / index_select take int32, ~2x faster on CPU than an int64
        # scatter_add_ / gather, whose V-wide index alone is a 2-unit buffer). Head classes land in bucket 0
        # but add nothing to it (their p is zeroed above) and their m is overwritten by the head's.
        scaled = torch.add(head_lp[:, -1:] * (1.0 / width), lp, alpha=-1.0 / width, out=lp).clamp_(0, buckets - 1)
        index_dtype = torch.int32 if n * buckets < 2**31 else torch.int64
        rows = torch.arange(0, n * buckets, buckets, dtype=index_dtype, device=p.device).unsqueeze(-1)
        idx = scaled.to(index_dtype).add_(rows).view(-1)
        del lp, scaled
        mass = torch.zeros(n * buckets, dtype=dtype, device=p.device).index_add_(0, idx, p.view(-1))
        mass64 = mass.view(n, buckets).to(torch.float64)
        top = c_k.unsqueeze(-1) + mass64.cumsum(-1) - mass64  # E_b: teacher mass above bucket b
        up64 = up.to(torch.float64).unsqueeze(-1)
        # kappa (u - e_v) = table[b] + kappa p_v / 2, table[b] = kappa (u - E_b - M_b / 2)
        table = (kappa * (up64 - top - 0.5 * mass64)).to(dtype).view(-1)
        wt = torch.empty(2, n, V, dtype=dtype, device=p.device).transpose(0, 1)
        m, m1m = wt.unbind(1)
        torch.index_select(table, 0, idx, out=m.view(-1))
        del idx
        m.add_(p, alpha=0.5 * kappa).sigmoid_()
        torch.addcmul(m, m, m, value=-1.0, out=m1m)  # m (1 - m)
        sums = torch.bmm(x, wt.transpose(1, 2))  # [n, 3 (p, q, pd), 2 (m, m (1 - m))]
        t_p, t_q = x[:, 0].sum(-1), x[:, 1].sum(-1)
        abs_pd = torch.linalg.vector_norm(pd, ord=1, dim=-1)
        # ---- totals
        kl_kept = (w * pd_h).sum(-1) + sums[:, 2, 0]
        cov = (w * p_h).sum(-1) + sums[:, 0, 0]
        r_p = (r * p_h).sum(-1) + (t_p - sums[:, 0, 0])
        r_q = (r * q_h).sum(-1) + (t_q - sums[:, 1, 0])
        kl, bad = _finish(kl_kept, r_p, r_q, dtype)
        # ---- error bound of the tail estimate
        beta = (kappa * torch.sigmoid(kappa * (up64 - top)) * mass64).amax(-1).to(dtype)
        rho = r_p / r_q.clamp_min(_tiny(dtype))
        bound = kappa * beta * (abs_pd + (torch.log(rho.clamp_min(_tiny(dtype))).abs() + 1.0) * t_p + rho * t_q)
        bad = bad | ~(bound <= tol)
        ctx.mark_non_differentiable(kept, bad)
        ctx.save_for_backward(head_idx, p_h, q_h, pd_h, w, r, sna, snb, p, q, m, sums, r_p, r_q, cov, bad)
        ctx.opts = (kappa, target_class, s.dtype)
        return kl, torch.where(bad, torch.zeros_like(cov), cov), kept, bad

    @staticmethod
    def backward(ctx, g_kl, g_cov, _g_kept, _g_bad):
        head_idx, p_h, q_h, pd_h, w, r, sna, snb, p, q, m, sums, r_p, r_q, cov, bad = ctx.saved_tensors
        kappa, target_class, s_dtype = ctx.opts
        zero = torch.zeros_like(g_kl)
        g = torch.where(bad, zero, g_kl)
        rho = torch.where(bad, zero, r_p / r_q.clamp_min(_tiny(r_q.dtype)))
        grad_l = grad_u = None
        if ctx.needs_input_grad[4] or ctx.needs_input_grad[5]:
            gc = torch.where(bad, zero, g_cov)
            c1 = gc - g * (torch.log(rho.clamp_min(_tiny(rho.dtype))) + 1.0)
            c2 = g * rho
            gm = (pd_h * g.unsqueeze(-1) + p_h * c1.unsqueeze(-1) + q_h * c2.unsqueeze(-1)) * w
            if target_class:
                gm[:, 0] = 0.0
            grad_l = -kappa * (sna * gm).sum(-1)
            tail_u = g * sums[:, 2, 1] + c1 * sums[:, 0, 1] + c2 * sums[:, 1, 1]
            grad_u = kappa * ((snb * gm).sum(-1) + tail_u)
        grad_s = None
        if ctx.needs_input_grad[0]:
            total = cov + r_p
            # tail: q_v g (total - rho) + m_v g (rho q_v - p_v); head: as SortedMassMerge
            grad = torch.mul(q, (g * rho).unsqueeze(-1)).addcmul_(p, g.unsqueeze(-1), value=-1.0).mul_(m)
            grad.addcmul_(q, (g * (total - rho)).unsqueeze(-1))
            head = (q_h * (total.unsqueeze(-1) - rho.unsqueeze(-1) * r) - w * p_h) * g.unsqueeze(-1)
            grad_s = grad.scatter_(-1, head_idx, head).to(s_dtype)
        return grad_s, None, None, None, grad_l, grad_u, None, None, None, None, None
