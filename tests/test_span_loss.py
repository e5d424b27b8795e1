"""Span correlation loss: golden values against python loops, chunking, gradients (the analytic
backward is checked by gradcheck and against plain autograd), pair masking and extreme numerics."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import extreme_pair

from mgsr.losses import span_correlation_loss

B, T, V = 2, 4, 5
PAIRS = torch.tensor([[True, True, False], [False, True, True]])


def _logits(seed: int, scale: float = 2.0, shape: tuple[int, ...] = (B, T, V)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _softmax(row: list[float]) -> list[float]:
    mx = max(row)
    ex = [math.exp(x - mx) for x in row]
    return [x / sum(ex) for x in ex]


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _ref(t: torch.Tensor, s: torch.Tensor, pairs: torch.Tensor, relation: str) -> tuple[float, float, int]:
    losses, scales = [], []
    for b in range(pairs.shape[0]):
        for i in range(pairs.shape[1]):
            if not pairs[b, i]:
                continue
            p0, p1 = _softmax(t[b, i].double().tolist()), _softmax(t[b, i + 1].double().tolist())
            q0, q1 = _softmax(s[b, i].double().tolist()), _softmax(s[b, i + 1].double().tolist())
            if relation == "hadamard":
                r = [x * y for x, y in zip(p0, p1)]
                sr = [x * y for x, y in zip(q0, q1)]
                losses.append(sum((x - y) ** 2 for x, y in zip(r, sr)))
                scales.append(math.sqrt(sum(x * x for x in r)))
            else:
                ct, cs = _cos(p0, p1), _cos(q0, q1)
                losses.append((ct - cs) ** 2)
                scales.append(abs(ct))
    n = len(losses)
    return (sum(losses) / n, sum(scales) / n, n) if n else (0.0, 0.0, 0)


def _autograd_span(t: torch.Tensor, s: torch.Tensor, pairs: torch.Tensor, relation: str) -> torch.Tensor:
    """Plain vectorised autograd version, to check the hand-written backward against."""
    p, q = torch.softmax(t.detach().double(), -1), torch.softmax(s.double(), -1)
    if relation == "hadamard":
        per = ((p[:, :-1] * p[:, 1:] - q[:, :-1] * q[:, 1:]) ** 2).sum(-1)
    else:
        cos_t = torch.nn.functional.cosine_similarity(p[:, :-1], p[:, 1:], dim=-1)
        cos_s = torch.nn.functional.cosine_similarity(q[:, :-1], q[:, 1:], dim=-1)
        per = (cos_t - cos_s) ** 2
    return per[pairs].mean()


@pytest.mark.parametrize("relation", ["hadamard", "cosine"])
def test_golden_against_loops(relation: str) -> None:
    t, s = _logits(0), _logits(1)
    out = span_correlation_loss(t, s, PAIRS, relation=relation)
    loss, scale, n = _ref(t, s, PAIRS, relation)
    assert out.loss.shape == () and out.loss.dtype == torch.float32
    assert out.num_pairs == n == 4
    assert out.loss.item() == pytest.approx(loss, rel=1e-5, abs=1e-9)
    assert out.relation_scale.item() == pytest.approx(scale, rel=1e-5)


def test_hand_computed_hadamard() -> None:
    # teacher uniform over 2 classes at both positions: r = [1/4, 1/4];
    # student one position uniform, the next (3/4, 1/4): s = [3/8, 1/8]; ||r - s||^2 = 2/64
    t = torch.zeros(1, 2, 2)
    s = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])
    out = span_correlation_loss(t, s, torch.tensor([[True]]))
    assert out.loss.item() == pytest.approx(2 / 64, rel=1e-6)
    assert out.relation_scale.item() == pytest.approx(math.sqrt(2) / 4, rel=1e-6)


@pytest.mark.parametrize("relation", ["hadamard", "cosine"])
def test_chunking_does_not_change_the_result(relation: str) -> None:
    t, s = _logits(2, shape=(3, 6, 7)), _logits(3, shape=(3, 6, 7))
    pairs = torch.rand(3, 5, generator=torch.Generator().manual_seed(4)) > 0.3
    grads, losses = [], []
    for chunk in (1, 2, 64):
        x = s.clone().requires_grad_()
        out = span_correlation_loss(t, x, pairs, relation=relation, chunk_size=chunk)
        out.loss.backward()
        losses.append(out.loss.item())
        grads.append(x.grad)
    assert losses[0] == pytest.approx(losses[2], rel=1e-6) and losses[1] == pytest.approx(losses[2], rel=1e-6)
    torch.testing.assert_close(grads[0], grads[2])
    torch.testing.assert_close(grads[1], grads[2])


@pytest.mark.parametrize("relation", ["hadamard", "cosine"])
def test_zero_when_equal_and_without_pairs(relation: str) -> None:
    t, s = _logits(5), _logits(6)
    assert span_correlation_loss(t, t.clone(), PAIRS, relation=relation).loss.item() == 0.0
    empty = span_correlation_loss(
        t, s.requires_grad_(), torch.zeros(B, T - 1, dtype=torch.bool), relation=relation
    )
    assert empty.loss.item() == 0.0 and empty.num_pairs == 0 and empty.relation_scale.item() == 0.0
    empty.loss.backward()  # still a valid graph node
    assert (s.grad == 0).all()


@pytest.mark.parametrize("relation", ["hadamard", "cosine"])
def test_positions_outside_pairs_do_not_matter(relation: str) -> None:
    t, s = _logits(7), _logits(8)
    base = span_correlation_loss(t, s, PAIRS, relation=relation).loss.item()
    # batch 0 uses positions 0..2, batch 1 uses 1..3: position 3 of row 0 and 0 of row 1 are free
    t2, s2 = t.clone(), s.clone()
    t2[0, 3], s2[0, 3], t2[1, 0], s2[1, 0] = 50.0, float("nan"), -7.0, float("nan")
    assert span_correlation_loss(t2, s2, PAIRS, relation=relation).loss.item() == base


def test_invalid_arguments_raise() -> None:
    t = _logits(9)
    with pytest.raises(ValueError, match="unknown span relation"):
        span_correlation_loss(t, t, PAIRS, relation="dot")
    with pytest.raises(ValueError, match=r"pair_mask must have shape \[B, T-1\]"):
        span_correlation_loss(t, t, torch.ones(B, T, dtype=torch.bool))
    with pytest.raises(ValueError, match="chunk_size"):
        span_correlation_loss(t, t, PAIRS, chunk_size=0)


@pytest.mark.parametrize("relation", ["hadamard", "cosine"])
def test_gradient_matches_plain_autograd(relation: str) -> None:
    t = _logits(10).requires_grad_()
    s = _logits(11).double().requires_grad_()
    span_correlation_loss(t, s, PAIRS, relation=relation, chunk_size=2).loss.backward()
    assert t.grad is None
    ref = s.detach().clone().requires_grad_()
    _autograd_span(t, ref, PAIRS, relation).backward()
    assert s.grad.abs().sum() > 0
    torch.testing.assert_close(s.grad, ref.grad)


@pytest.mark.parametrize("relation", ["hadamard", "cosine"])
def test_gradcheck_float64(relation: str) -> None:
    t = _logits(12, shape=(1, 3, 4)).double()
    s = _logits(13, shape=(1, 3, 4)).double().requires_grad_()
    pairs = torch.tensor([[True, True]])
    assert torch.autograd.gradcheck(
        lambda x: span_correlation_loss(t, x, pairs, relation=relation, chunk_size=1).loss, (s,)
    )


def test_bf16_student_gets_bf16_gradient() -> None:
    s = _logits(14).to(torch.bfloat16).requires_grad_()
    out = span_correlation_loss(_logits(15), s, PAIRS)
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    assert s.grad.dtype == torch.bfloat16 and s.grad.float().abs().sum() > 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=extreme_pair(positions=3), relation=st.sampled_from(["hadamard", "cosine"]))
def test_extreme_logits_finite(pair, relation: str) -> None:
    t, s = pair
    s = s.clone().requires_grad_()
    out = span_correlation_loss(t, s, torch.tensor([[True, True]]), relation=relation)
    assert torch.isfinite(out.loss) and out.loss.item() >= 0.0
    out.loss.backward()
    assert torch.isfinite(s.grad.float()).all()
