"""Divergences: golden values against plain-python loops, properties, gradients, extreme numerics."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import extreme_pair

from mgsr.losses import (
    DIVERGENCES,
    adaptive_kl,
    align_vocab,
    divergence_loss,
    forward_kl,
    js_divergence,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    symmetric_kl,
    total_variation,
)

B, T, V = 2, 3, 5


def _logits(seed: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, V, generator=g) * scale


# ----------------------------------------------------------------------------- plain-python references


def _softmax(row: list[float]) -> list[float]:
    mx = max(row)
    ex = [math.exp(x - mx) for x in row]
    z = sum(ex)
    return [x / z for x in ex]


def _kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def _mix(a: list[float], b: list[float], w: float) -> list[float]:
    return [w * x + (1 - w) * y for x, y in zip(a, b)]


def _ref_token(name: str, p: list[float], q: list[float], **kw: float) -> float:
    if name == "fkl":
        return _kl(p, q)
    if name == "rkl":
        return _kl(q, p)
    if name == "skl":
        lam = kw.get("lam", 0.9)
        return (1 - lam) * _kl(p, q) + lam * _kl(q, p)
    if name == "jsd":
        beta = kw.get("beta", 0.5)
        m = _mix(p, q, beta)
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    if name == "tvd":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q))
    if name == "sfkl":
        alpha = kw.get("alpha", 0.1)
        return _kl(p, _mix(p, q, alpha))
    if name == "srkl":
        alpha = kw.get("alpha", 0.1)
        return _kl(q, _mix(q, p, alpha))
    if name == "akl":
        mu = kw.get("mu", 0.5)
        order = sorted(range(len(p)), key=lambda v: -p[v])
        g_head = g_tail = cum = 0.0
        for rank, v in enumerate(order):
            cum += p[v]
            gap = abs(p[v] - q[v])
            if rank == 0 or cum <= mu:
                g_head += gap
            else:
                g_tail += gap
        return (g_head * _kl(p, q) + g_tail * _kl(q, p)) / (g_head + g_tail)
    raise KeyError(name)


def _ref_per_token(name: str, t: torch.Tensor, s: torch.Tensor, **kw: float) -> torch.Tensor:
    out = torch.zeros(t.shape[:2], dtype=torch.float64)
    for b in range(t.shape[0]):
        for i in range(t.shape[1]):
            p = _softmax(t[b, i].double().tolist())
            q = _softmax(s[b, i].double().tolist())
            out[b, i] = _ref_token(name, p, q, **kw)
    return out


PARAMS = {
    "fkl": [{}],
    "rkl": [{}],
    "skl": [{}, {"lam": 0.3}],
    "jsd": [{}, {"beta": 0.1}, {"beta": 0.9}],
    "tvd": [{}],
    "sfkl": [{}, {"alpha": 0.4}],
    "srkl": [{}, {"alpha": 0.4}],
    "akl": [{}, {"mu": 0.3}, {"mu": 0.8}],
}
CASES = [(name, kw) for name, kws in PARAMS.items() for kw in kws]


def test_registry_keys() -> None:
    assert set(DIVERGENCES) == {"fkl", "rkl", "skl", "jsd", "tvd", "sfkl", "srkl", "akl", "ab"}


@pytest.mark.parametrize(("name", "kw"), CASES)
def test_golden_per_token_against_loops(name: str, kw: dict) -> None:
    t, s = _logits(0), _logits(1)
    got = DIVERGENCES[name](t, s, **kw)
    assert got.shape == (B, T) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _ref_per_token(name, t, s, **kw), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize(("name", "kw"), CASES)
def test_golden_masked_loss(name: str, kw: dict) -> None:
    t, s = _logits(2), _logits(3)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    ref = _ref_per_token(name, t, s, **kw)[mask].mean()
    got = divergence_loss(name, t, s, mask, **kw)
    assert got.shape == ()
    assert got.item() == pytest.approx(ref.item(), rel=1e-5, abs=2e-6)


def test_golden_hand_computed_fkl_rkl() -> None:
    p = torch.tensor([0.5, 0.25, 0.25]).log().view(1, 1, 3)
    q = torch.tensor([0.25, 0.5, 0.25]).log().view(1, 1, 3)
    # 0.5 ln 2 + 0.25 ln 0.5 = 0.25 ln 2 in both directions.
    assert forward_kl(p, q).item() == pytest.approx(0.25 * math.log(2), rel=1e-6)
    assert reverse_kl(p, q).item() == pytest.approx(0.25 * math.log(2), rel=1e-6)
    assert total_variation(p, q).item() == pytest.approx(0.25, rel=1e-6)


# ----------------------------------------------------------------------------- properties


@pytest.mark.parametrize(("name", "kw"), CASES)
def test_zero_when_equal_and_nonnegative(name: str, kw: dict) -> None:
    t, s = _logits(4), _logits(5)
    assert DIVERGENCES[name](t, t.clone(), **kw).abs().max().item() < 1e-6
    assert DIVERGENCES[name](t, s, **kw).min().item() >= 0.0


def test_jsd_half_is_symmetric() -> None:
    t, s = _logits(6), _logits(7)
    torch.testing.assert_close(js_divergence(t, s, beta=0.5), js_divergence(s, t, beta=0.5))
    # and beta <-> 1 - beta swaps the roles
    torch.testing.assert_close(js_divergence(t, s, beta=0.2), js_divergence(s, t, beta=0.8))


def test_parameter_endpoints() -> None:
    t, s = _logits(8), _logits(9)
    fkl, rkl = forward_kl(t, s), reverse_kl(t, s)
    torch.testing.assert_close(skew_forward_kl(t, s, alpha=0.0), fkl)
    torch.testing.assert_close(skew_reverse_kl(t, s, alpha=0.0), rkl)
    torch.testing.assert_close(symmetric_kl(t, s, lam=0.0), fkl)
    torch.testing.assert_close(symmetric_kl(t, s, lam=1.0), rkl)
    assert skew_forward_kl(t, s, alpha=1.0).abs().max() < 1e-6
    for beta in (0.0, 1.0):
        out = js_divergence(t, s, beta=beta)
        assert torch.isfinite(out).all() and out.abs().max() < 1e-6


def test_jsd_endpoints_finite_with_disjoint_support() -> None:
    t = torch.tensor([[[0.0, -math.inf, 1.0]]])
    s = torch.tensor([[[-math.inf, 0.0, 1.0]]], requires_grad=True)
    for beta in (0.0, 1e-6, 0.5, 1.0 - 1e-6, 1.0):
        out = js_divergence(t, s, beta=beta)
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(s.grad).all()
        s.grad = None


def test_akl_weights_follow_head_tail_gaps() -> None:
    # Mismatch only in the tail -> AKL is pure RKL; only in the head -> pure FKL.
    t = torch.tensor([0.6, 0.2, 0.1, 0.1]).log().view(1, 1, 4)
    tail_off = torch.tensor([0.6, 0.2, 0.15, 0.05]).log().view(1, 1, 4)
    torch.testing.assert_close(adaptive_kl(t, tail_off), reverse_kl(t, tail_off))
    head_off = torch.tensor([0.5, 0.3, 0.1, 0.1]).log().view(1, 1, 4)
    # head = {top-1} (cum 0.6 > 0.5); the 0.1 gap on class 0 vs 0.1 on class 1 -> equal weights
    expected = 0.5 * forward_kl(t, head_off) + 0.5 * reverse_kl(t, head_off)
    torch.testing.assert_close(adaptive_kl(t, head_off), expected)


def test_unknown_name_raises() -> None:
    t = _logits(0)
    with pytest.raises(ValueError, match="name='nope': unknown divergence; choose one of ab, akl, fkl, jsd, rkl"):
        divergence_loss("nope", t, t, torch.ones(B, T, dtype=torch.bool))
    with pytest.raises(ValueError, match="jsd has no parameter alpha .it takes: beta."):
        divergence_loss("jsd", t, t, torch.ones(B, T, dtype=torch.bool), alpha=0.1)


def test_registering_a_divergence_makes_it_available_everywhere_by_name() -> None:
    from mgsr.losses.divergences import DIVERGENCES, divergence_params, register_divergence
    from mgsr.objectives import Divergence
    from mgsr.scrg import ScrgConfig, token_divergence

    @register_divergence("_test_half_fkl")
    def half_fkl(teacher_logits, student_logits, scale: float = 0.5):
        return scale * forward_kl(teacher_logits, student_logits)

    try:
        t, s = _logits(0), _logits(1)
        mask = torch.ones(B, T, dtype=torch.bool)
        assert divergence_params("_test_half_fkl") == {"scale": 0.5}
        loss, _ = Divergence("_test_half_fkl", scale=1.0)(t, s, mask)
        torch.testing.assert_close(loss, divergence_loss("fkl", t, s, mask))
        ScrgConfig(divergence="_test_half_fkl")  # accepted by SCRG's ranking
        torch.testing.assert_close(token_divergence(t, s, "_test_half_fkl"), 0.5 * forward_kl(t, s))
        with pytest.raises(ValueError, match="registered twice"):
            register_divergence("_test_half_fkl")(half_fkl)
    finally:
        DIVERGENCES.pop("_test_half_fkl")


def test_align_vocab_truncates_padding_rows() -> None:
    t, s = torch.randn(1, 2, 8), torch.randn(1, 2, 6)
    ta, sa = align_vocab(t, s, 5)
    assert ta.shape[-1] == sa.shape[-1] == 5
    torch.testing.assert_close(ta, t[..., :5])
    with pytest.raises(ValueError):
        align_vocab(t, s, 7)


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_masked_positions_do_not_matter(name: str) -> None:
    t, s = _logits(10), _logits(11)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    base = divergence_loss(name, t, s, mask)
    t2, s2 = t.clone(), s.clone()
    t2[~mask] = torch.randn(int((~mask).sum()), V) * 50
    s2[~mask] = float("nan")
    assert divergence_loss(name, t2, s2, mask).item() == base.item()
    assert divergence_loss(name, t, s, torch.zeros(B, T, dtype=torch.bool)).item() == 0.0


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_gradient_reaches_student_not_teacher(name: str) -> None:
    t = _logits(12).requires_grad_()
    s = _logits(13).requires_grad_()
    divergence_loss(name, t, s, torch.ones(B, T, dtype=torch.bool)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and torch.isfinite(s.grad).all()
    assert t.grad is None


@pytest.mark.parametrize("name", ["fkl", "rkl", "skl", "jsd", "sfkl", "srkl"])
def test_gradcheck_float64(name: str) -> None:
    t = torch.randn(1, 2, 4, dtype=torch.float64)
    s = torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True)
    out = DIVERGENCES[name](t, s)
    assert out.dtype == torch.float64
    assert torch.autograd.gradcheck(lambda x: DIVERGENCES[name](t, x), (s,))


# ----------------------------------------------------------------------------- extreme numerics


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=extreme_pair(), name=st.sampled_from(sorted(DIVERGENCES)))
def test_extreme_logits_finite(pair: tuple[torch.Tensor, torch.Tensor], name: str) -> None:
    t, s = pair
    s = s.clone().requires_grad_()
    per_token = DIVERGENCES[name](t, s)
    assert torch.isfinite(per_token).all(), per_token
    assert per_token.min().item() >= -1e-6
    divergence_loss(name, t, s, torch.ones(1, 2, dtype=torch.bool)).backward()
    assert torch.isfinite(s.grad.float()).all()
