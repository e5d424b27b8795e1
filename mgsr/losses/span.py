"""Span-level correlation consistency (METHOD.md section 4, steps 2-3).

For every adjacent in-span pair (i, i+1) the teacher relation is compared with the student relation:

    hadamard: r_i = p_i * p_{i+1}, s_i = q_i * q_{i+1} (element-wise over V);  l_i = ||r_i - s_i||_2^2
    cosine:   r_i = cos(p_i, p_{i+1}),   s_i = cos(q_i, q_{i+1}) (scalars);      l_i = (r_i - s_i)^2
    L_span = mean over pairs of l_i  (0 when there are no pairs)

Memory is O(chunk x V): pairs are processed `chunk_size` at a time, and the gradient w.r.t. the student
logits is formed analytically chunk by chunk into one [B*T, V] buffer (a custom autograd Function), so
autograd never stores per-chunk V-wide intermediates for the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mgsr.losses.divergences import compute_dtype

RELATIONS = ("hadamard", "cosine")


@dataclass
class SpanOutput:
    """Span loss result. `loss` carries the gradient."""

    loss: torch.Tensor
    num_pairs: int
    # Mean teacher relation magnitude (hadamard: ||r_i||_2; cosine: |cos|), detached: shows how tiny
    # the products are, i.e. how large w_span must be to matter.
    relation_scale: torch.Tensor


def _softmax_backward(prob: torch.Tensor, grad_prob: torch.Tensor) -> torch.Tensor:
    """d loss / d logits from d loss / d softmax: prob * (g - <g, prob>)."""
    return prob * (grad_prob - (grad_prob * prob).sum(-1, keepdim=True))


def _chunk_terms(
    pa: torch.Tensor, pb: torch.Tensor, qa: torch.Tensor, qb: torch.Tensor, relation: str, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-chunk (sum of l_i, sum of teacher scale, dL/dqa, dL/dqb) for [c, V] probability rows."""
    if relation == "hadamard":
        r = pa * pb
        diff = qa * qb - r
        loss_sum = (diff * diff).sum()
        scale_sum = r.norm(dim=-1).sum()
        if not need_grad:
            return loss_sum, scale_sum, None, None
        return loss_sum, scale_sum, 2.0 * diff * qb, 2.0 * diff * qa
    t_cos = (pa * pb).sum(-1) / (pa.norm(dim=-1) * pb.norm(dim=-1))
    na, nb = qa.norm(dim=-1, keepdim=True), qb.norm(dim=-1, keepdim=True)
    s_cos = (qa * qb).sum(-1, keepdim=True) / (na * nb)
    diff = s_cos - t_cos.unsqueeze(-1)
    loss_sum = (diff * diff).sum()
    scale_sum = t_cos.abs().sum()
    if not need_grad:
        return loss_sum, scale_sum, None, None
    # d cos(a, b) / d a = b / (|a||b|) - cos * a / |a|^2  (probability vectors: norms >= 1/sqrt(V) > 0)
    grad_cos = 2.0 * diff
    ga = grad_cos * (qb / (na * nb) - s_cos * qa / (na * na))
    gb = grad_cos * (qa / (na * nb) - s_cos * qb / (nb * nb))
    return loss_sum, scale_sum, ga, gb


class _SpanRelationLoss(torch.autograd.Function):
    """Chunked span loss with an analytic student gradient; the teacher is a constant."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, rows_a, rows_b, relation, chunk_size):
        dtype = compute_dtype(student_logits, teacher_logits)
        vocab = student_logits.shape[-1]
        s_flat = student_logits.reshape(-1, vocab)
        t_flat = teacher_logits.reshape(-1, vocab)
        need_grad = ctx.needs_input_grad[0]
        grad = torch.zeros(s_flat.shape, dtype=dtype, device=s_flat.device) if need_grad else None
        loss_sum = torch.zeros((), dtype=dtype, device=s_flat.device)
        scale_sum = torch.zeros((), dtype=dtype, device=s_flat.device)
        n = rows_a.numel()
        for start in range(0, n, chunk_size):
            ra, rb = rows_a[start : start + chunk_size], rows_b[start : start + chunk_size]
            pa, pb = (torch.softmax(t_flat[r].to(dtype), dim=-1) for r in (ra, rb))
            qa, qb = (torch.softmax(s_flat[r].to(dtype), dim=-1) for r in (ra, rb))
            part_loss, part_scale, ga, gb = _chunk_terms(pa, pb, qa, qb, relation, need_grad)
            loss_sum += part_loss
            scale_sum += part_scale
            if need_grad:
                # A position can sit in two pairs (as i and as i+1): accumulate, never overwrite.
                grad.index_add_(0, ra, _softmax_backward(qa, ga))
                grad.index_add_(0, rb, _softmax_backward(qb, gb))
        denom = max(n, 1)
        if need_grad:
            ctx.save_for_backward(grad)
            ctx.meta = (denom, student_logits.shape, student_logits.dtype)
        scale = scale_sum / denom
        ctx.mark_non_differentiable(scale)
        return loss_sum / denom, scale

    @staticmethod
    def backward(ctx, grad_loss, grad_scale):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        (grad,) = ctx.saved_tensors
        denom, shape, dtype = ctx.meta
        grad_student = (grad * (grad_loss.to(grad.dtype) / denom)).reshape(shape).to(dtype)
        return grad_student, None, None, None, None, None


def span_correlation_loss(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    pair_mask: torch.Tensor,
    *,
    relation: str = "hadamard",
    chunk_size: int = 64,
) -> SpanOutput:
    """L_span = mean over adjacent in-span pairs of the relation mismatch (module docstring).

    teacher_logits, student_logits: [B, T, V] aligned logits; pair_mask: [B, T-1] bool, True at i when
    positions i and i+1 are adjacent inside one span. relation: "hadamard" | "cosine". chunk_size: pairs
    per chunk (memory O(chunk_size x V)). Math in float32 (float64 for float64 inputs). Returns
    SpanOutput(loss 0-dim, num_pairs, relation_scale); no pairs -> loss 0.
    """
    if relation not in RELATIONS:
        raise ValueError(f"unknown span relation {relation!r}; choose one of: {', '.join(RELATIONS)}")
    if chunk_size < 1:
        raise ValueError(f"span chunk_size must be >= 1, got {chunk_size}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher/student logits shapes differ: {teacher_logits.shape} vs {student_logits.shape}"
        )
    batch, length = student_logits.shape[:2]
    if tuple(pair_mask.shape) != (batch, length - 1):
        raise ValueError(
            f"pair_mask must have shape [B, T-1] = {(batch, length - 1)}, got {tuple(pair_mask.shape)}"
        )
    pairs = pair_mask.bool().nonzero()
    rows_a = pairs[:, 0] * length + pairs[:, 1]
    loss, scale = _SpanRelationLoss.apply(
        student_logits, teacher_logits.detach(), rows_a, rows_a + 1, relation, chunk_size
    )
    return SpanOutput(loss=loss, num_pairs=int(pairs.shape[0]), relation_scale=scale.detach())
