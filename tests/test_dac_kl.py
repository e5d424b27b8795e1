"""DAC-KL: golden values against plain-python loops and hand-computed numbers, the merge guarantees,
gradient routing (student vs quantile head vs coverage term), extreme numerics and the quantile heads."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import extreme_pair

from mgsr.losses import FixedQuantileHead, QuantileHead, dac_kl_loss, forward_kl

B, T, V = 2, 3, 5


def _logits(seed: int, scale: float = 2.0, shape: tuple[int, ...] = (B, T, V)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _quantiles(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, T, generator=g) * 0.3, 0.7 + torch.rand(B, T, generator=g) * 0.3


# ----------------------------------------------------------------------------- plain-python reference


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _softmax(row: list[float]) -> list[float]:
    mx = max(row)
    ex = [math.exp(x - mx) for x in row]
    return [x / sum(ex) for x in ex]


def _kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def _quantile_desc(values: list[float], x: float) -> float:
    pos = x * (len(values) - 1)
    i0 = min(int(math.floor(pos)), len(values) - 1)
    i1 = min(i0 + 1, len(values) - 1)
    return values[i0] + (pos - i0) * (values[i1] - values[i0])


def _ref_token(p, q, lo, up, *, kappa, remainder, band, target_class, hard):
    """Returns (KL(P || Q), coverage, kept) for one token, straight from METHOD.md section 3."""
    order = sorted(range(len(p)), key=lambda v: -p[v])
    ps, qs = [p[v] for v in order], [q[v] for v in order]
    lps = [math.log(x) for x in ps]
    thr_hi, thr_lo = _quantile_desc(lps, lo), _quantile_desc(lps, up)
    m, hard_m, above = [], [], 0.0
    for k, pk in enumerate(ps):
        cum = above + pk
        if band == "mass":
            a, b = kappa * (cum - lo), kappa * (up - above)
            inside = cum > lo and above < up
        elif band == "logprob":
            a, b = kappa * (thr_hi - lps[k]), kappa * (lps[k] - thr_lo)
            inside = thr_lo <= lps[k] <= thr_hi
        else:
            a = b = -math.inf
            inside = False
        soft = 0.0 if band == "off" else _sig(a) * _sig(b)
        is_target = target_class and k == 0
        m.append(0.0 if is_target else (float(inside) if hard else soft))
        hard_m.append(0.0 if is_target else float(inside))
        above = cum
    kept_p = [m[k] * ps[k] for k in range(len(ps)) if not (target_class and k == 0)]
    kept_q = [m[k] * qs[k] for k in range(len(qs)) if not (target_class and k == 0)]
    if target_class:
        kept_p.append(ps[0])
        kept_q.append(qs[0])
    coverage = sum(kept_p)
    if remainder == "merge":
        rest = range(1 if target_class else 0, len(ps))
        big_p = kept_p + [sum((1 - m[k]) * ps[k] for k in rest)]
        big_q = kept_q + [sum((1 - m[k]) * qs[k] for k in rest)]
    else:
        big_p = [x / sum(kept_p) for x in kept_p]
        big_q = [x / sum(kept_q) for x in kept_q]
    return _kl(big_p, big_q), coverage, sum(hard_m) + float(target_class)


def _ref_loss(t, s, mask, lower, upper, *, beta=1.0, **kw):
    lower = torch.broadcast_to(torch.as_tensor(lower, dtype=torch.float64), mask.shape)
    upper = torch.broadcast_to(torch.as_tensor(upper, dtype=torch.float64), mask.shape)
    kls, covs, kepts = [], [], []
    for b in range(mask.shape[0]):
        for i in range(mask.shape[1]):
            if not mask[b, i]:
                continue
            p = _softmax(t[b, i].double().tolist())
            q = _softmax(s[b, i].double().tolist())
            kl, cov, kept = _ref_token(p, q, float(lower[b, i]), float(upper[b, i]), **kw)
            kls.append(kl)
            covs.append(cov)
            kepts.append(kept)
    n = len(kls)
    kl, cov = sum(kls) / n, sum(covs) / n
    return {"loss": kl + beta * (1 - cov), "kl": kl, "coverage": cov, "kept": sum(kepts) / n}


def _assert_matches(out, ref) -> None:
    for key in ("loss", "kl", "coverage", "kept"):
        got = getattr(out, key)
        assert got.shape == ()
        assert got.item() == pytest.approx(ref[key], rel=2e-5, abs=2e-6), key


MASK = torch.tensor([[True, True, False], [True, False, True]])
COMBOS = [
    {"band": "mass", "remainder": "merge", "target_class": True},
    {"band": "mass", "remainder": "drop", "target_class": True},
    {"band": "logprob", "remainder": "merge", "target_class": True},
    {"band": "logprob", "remainder": "drop", "target_class": True},
    {"band": "mass", "remainder": "merge", "target_class": False},
    {"band": "logprob", "remainder": "drop", "target_class": False},
    {"band": "off", "remainder": "merge", "target_class": True},
]


@pytest.mark.parametrize("kw", COMBOS)
def test_golden_learnable_soft_path(kw: dict) -> None:
    t, s = _logits(0), _logits(1)
    lower, upper = _quantiles(2)
    out = dac_kl_loss(t, s, MASK, lower, upper, kappa=20.0, beta=0.7, **kw)
    ref = _ref_loss(t, s, MASK, lower, upper, kappa=20.0, beta=0.7, hard=False, **kw)
    _assert_matches(out, ref)


@pytest.mark.parametrize("kw", COMBOS)
@pytest.mark.parametrize("quantiles", [(0.2, 0.8), (0.05, 0.95)])
def test_golden_fixed_quantile_hard_path(kw: dict, quantiles: tuple[float, float]) -> None:
    t, s = _logits(3), _logits(4)
    lower, upper = FixedQuantileHead(*quantiles)(t)
    out = dac_kl_loss(t, s, MASK, lower, upper, hard=True, **kw)
    ref = _ref_loss(t, s, MASK, *quantiles, kappa=50.0, hard=True, **kw)
    _assert_matches(out, ref)
    # scalars work the same as the head's constant tensors
    _assert_matches(dac_kl_loss(t, s, MASK, *quantiles, hard=True, **kw), ref)


# Teacher (0.15, 0.5, 0.10, 0.25) is deliberately unsorted; student (0.2, 0.4, 0.2, 0.2).
# Sorted teacher: class1 .5 (k*), class3 .25, class0 .15, class2 .10; e = 0, .5, .75, .9.
HAND_T = torch.tensor([0.15, 0.5, 0.10, 0.25]).log().view(1, 1, 4)
HAND_S = torch.tensor([0.2, 0.4, 0.2, 0.2]).log().view(1, 1, 4)
ONE = torch.ones(1, 1, dtype=torch.bool)


@pytest.mark.parametrize(
    ("upper", "kw", "kl", "coverage", "kept"),
    [
        # band {3, 0}, remainder {2}: P=[.25,.15,.5,.1], Q=[.2,.2,.4,.2]; .75ln1.25 + .15ln.75 + .1ln.5
        (0.8, {"remainder": "merge"}, 0.0548906346, 0.9, 3.0),
        # same kept entries renormalised: (.75ln1.25 + .15ln.75)/.9 + ln(.8/.9)
        (0.8, {"remainder": "drop"}, 0.0202229117, 0.9, 3.0),
        # band {3}, remainder {0, 2}: P=[.25,.5,.25], Q=[.2,.4,.4]; .75ln1.25 + .25ln.625
        (0.6, {"remainder": "merge"}, 0.0498567562, 0.75, 2.0),
        # drop: [1/3, 2/3] vs [1/3, 2/3] -> the literal reading's loss vanishes
        (0.6, {"remainder": "drop"}, 0.0, 0.75, 2.0),
        # no band: P=[.5,.5], Q=[.4,.6]
        (0.6, {"remainder": "merge", "band": "off"}, 0.0204109973, 0.5, 1.0),
        # k* treated as a band class: the band is {1, 3}, same entries as the target case
        (0.6, {"remainder": "merge", "target_class": False}, 0.0498567562, 0.75, 2.0),
    ],
)
def test_hand_computed_single_token(upper: float, kw: dict, kl: float, coverage: float, kept: float) -> None:
    out = dac_kl_loss(HAND_T, HAND_S, ONE, 0.2, upper, hard=True, beta=1.0, **kw)
    assert out.kl.item() == pytest.approx(kl, abs=1e-6)
    assert out.coverage.item() == pytest.approx(coverage, abs=1e-6)
    assert out.loss.item() == pytest.approx(kl + 1.0 - coverage, abs=1e-6)
    assert out.kept.item() == kept


def test_hand_computed_merge_below_full_kl() -> None:
    full = forward_kl(HAND_T, HAND_S).item()
    assert full == pytest.approx(0.0548906346, abs=1e-6)  # = the u=0.8 merge value (1-class remainder)
    assert dac_kl_loss(HAND_T, HAND_S, ONE, 0.2, 0.6, hard=True).kl.item() < full


# ----------------------------------------------------------------------------- properties

VALID = [
    {"band": b, "remainder": r, "target_class": tc, "hard": h}
    for b in ("mass", "logprob", "off")
    for r in ("merge", "drop")
    for tc in (True, False)
    for h in (True, False)
    if not (b == "off" and not tc)
]


@pytest.mark.parametrize("kw", VALID)
def test_zero_when_teacher_equals_student(kw: dict) -> None:
    t = _logits(5)
    lower, upper = _quantiles(6)
    out = dac_kl_loss(t, t.clone(), MASK, lower, upper, **kw)
    assert abs(out.kl.item()) < 1e-6
    assert out.loss.item() == pytest.approx(1.0 - out.coverage.item(), abs=1e-6)


@pytest.mark.parametrize("kw", [k for k in VALID if k["remainder"] == "merge"])
def test_merge_is_between_zero_and_full_forward_kl(kw: dict) -> None:
    t, s = _logits(7, 3.0), _logits(8, 3.0)
    lower, upper = _quantiles(9)
    full = forward_kl(t, s)
    for b in range(B):
        for i in range(T):
            one = torch.zeros(B, T, dtype=torch.bool)
            one[b, i] = True
            kl = dac_kl_loss(t, s, one, lower, upper, **kw).kl.item()
            assert -1e-7 <= kl <= full[b, i].item() + 1e-6


def test_coverage_grows_with_the_band() -> None:
    t, s = _logits(10), _logits(11)
    narrow = dac_kl_loss(t, s, MASK, 0.3, 0.7)
    wide = dac_kl_loss(t, s, MASK, 0.0, 1.0)
    assert wide.coverage > narrow.coverage
    assert wide.kept > narrow.kept


def test_stats_over_masked_tokens() -> None:
    t, s = _logits(12), _logits(13)
    lower, upper = _quantiles(14)
    out = dac_kl_loss(t, s, MASK, lower, upper)
    assert out.lower_mean.item() == pytest.approx(lower[MASK].mean().item(), rel=1e-6)
    assert out.lower_std.item() == pytest.approx(lower[MASK].std(unbiased=False).item(), rel=1e-5)
    assert out.upper_mean.item() == pytest.approx(upper[MASK].mean().item(), rel=1e-6)
    assert out.upper_std.item() == pytest.approx(upper[MASK].std(unbiased=False).item(), rel=1e-5)


def test_invalid_options_raise() -> None:
    t = _logits(0)
    with pytest.raises(ValueError, match="band='off' with target_class=False"):
        dac_kl_loss(t, t, MASK, 0.2, 0.8, band="off", target_class=False)
    with pytest.raises(ValueError, match="unknown dac band"):
        dac_kl_loss(t, t, MASK, 0.2, 0.8, band="nope")
    with pytest.raises(ValueError, match="unknown dac remainder"):
        dac_kl_loss(t, t, MASK, 0.2, 0.8, remainder="nope")


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("band", ["mass", "logprob"])
def test_masked_positions_do_not_matter(band: str) -> None:
    t, s = _logits(15), _logits(16)
    lower, upper = _quantiles(17)
    base = dac_kl_loss(t, s, MASK, lower, upper, band=band)
    t2, s2, lower2 = t.clone(), s.clone(), lower.clone()
    t2[~MASK] = _logits(18, 50.0)[~MASK]
    s2[~MASK] = float("nan")
    lower2[~MASK] = 0.29
    out = dac_kl_loss(t2, s2, MASK, lower2, upper, band=band)
    for key in ("loss", "kl", "coverage", "kept", "lower_mean", "lower_std"):
        assert getattr(out, key).item() == getattr(base, key).item(), key
    empty = dac_kl_loss(t, s, torch.zeros(B, T, dtype=torch.bool), lower, upper, band=band)
    assert empty.loss.item() == 0.0 and empty.kl.item() == 0.0


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("kw", VALID)
def test_gradient_reaches_student_not_teacher(kw: dict) -> None:
    t = _logits(19).requires_grad_()
    s = _logits(20).requires_grad_()
    lower, upper = _quantiles(21)
    out = dac_kl_loss(t, s, MASK, lower, upper, **kw)
    out.loss.backward()
    assert torch.isfinite(s.grad).all() and t.grad is None
    if kw["band"] == "off" and kw["remainder"] == "drop":
        # degenerate by construction: only the target survives, P = Q = [1], nothing to learn
        assert out.kl.item() == 0.0 and s.grad.abs().sum() == 0
    else:
        assert s.grad.abs().sum() > 0


@pytest.mark.parametrize("band", ["mass", "logprob"])
@pytest.mark.parametrize("remainder", ["merge", "drop"])
def test_soft_mask_trains_the_quantile_head(band: str, remainder: str) -> None:
    torch.manual_seed(0)
    head = QuantileHead(top_k=4, hidden=8)
    t, s = _logits(22), _logits(23)
    lower, upper = head(t)
    dac_kl_loss(t, s, MASK, lower, upper, band=band, remainder=remainder).loss.backward()
    for name, param in head.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_kl_term_alone_reaches_the_head() -> None:
    head = QuantileHead(top_k=4, hidden=8)
    t, s = _logits(24), _logits(25)
    lower, upper = head(t)
    dac_kl_loss(t, s, MASK, lower, upper, beta=0.0).loss.backward()
    assert head.net[2].weight.grad.abs().sum() > 0


def test_hard_mask_gives_no_gradient_to_quantiles() -> None:
    lower, upper = (x.requires_grad_() for x in _quantiles(26))
    loss = dac_kl_loss(_logits(27), _logits(28).requires_grad_(), MASK, lower, upper, hard=True).loss
    grads = torch.autograd.grad(loss, (lower, upper), allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in grads)


@pytest.mark.parametrize("band", ["mass", "logprob", "off"])
def test_coverage_term_has_no_student_gradient(band: str) -> None:
    t = _logits(29)
    lower, upper = _quantiles(30)
    grads = []
    for beta in (0.0, 5.0):
        s = _logits(31).requires_grad_()
        lo, up = lower.clone().requires_grad_(), upper.clone().requires_grad_()
        dac_kl_loss(t, s, MASK, lo, up, band=band, beta=beta).loss.backward()
        grads.append((s.grad, lo.grad, up.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    if band != "off":  # but it does move the quantiles
        assert (grads[0][1] - grads[1][1]).abs().sum() + (grads[0][2] - grads[1][2]).abs().sum() > 0


@pytest.mark.parametrize("band", ["mass", "logprob"])
@pytest.mark.parametrize("remainder", ["merge", "drop"])
def test_gradcheck_float64(band: str, remainder: str) -> None:
    t = _logits(32, shape=(1, 2, 4)).double()
    s = _logits(33, shape=(1, 2, 4)).double().requires_grad_()
    # quantile positions l(V-1), u(V-1) kept away from integers: the logprob band interpolates linearly
    lower = torch.tensor([[0.15, 0.25]], dtype=torch.float64, requires_grad=True)
    upper = torch.tensor([[0.8, 0.9]], dtype=torch.float64, requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.bool)

    def fn(s_, lo_, up_):
        return dac_kl_loss(t, s_, mask, lo_, up_, kappa=5.0, band=band, remainder=remainder).loss

    assert fn(s, lower, upper).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (s, lower, upper))


# ----------------------------------------------------------------------------- extreme numerics


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pair=extreme_pair(),
    kw=st.sampled_from(VALID),
    lower=st.floats(0.0, 0.3),
    upper=st.floats(0.7, 1.0),
)
def test_extreme_logits_finite(pair, kw: dict, lower: float, upper: float) -> None:
    t, s = pair
    s = s.clone().requires_grad_()
    lo = torch.full((1, 2), lower, requires_grad=True)
    up = torch.full((1, 2), upper, requires_grad=True)
    out = dac_kl_loss(t, s, torch.ones(1, 2, dtype=torch.bool), lo, up, **kw)
    assert torch.isfinite(out.loss) and out.kl.item() >= -1e-6
    out.loss.backward()
    assert torch.isfinite(s.grad.float()).all()
    assert all(torch.isfinite(g).all() for g in (lo.grad, up.grad) if g is not None)


def test_drop_with_underflowing_kept_mass_is_finite() -> None:
    # one-hot teacher; the logprob band keeps only tail classes whose p underflows to 0 in float32,
    # yet the renormalised P (uniform over them) is well defined and equals Q -> KL 0 (found by hypothesis)
    t = torch.tensor([[[1e4, -1e4, -1e4, -1e4, -1e4]]])
    s = torch.zeros(1, 1, 5, requires_grad=True)
    out = dac_kl_loss(t, s, ONE, 0.25, 1.0, band="logprob", remainder="drop", target_class=False, hard=True)
    assert out.kl.item() == pytest.approx(0.0, abs=1e-6)
    out.loss.backward()
    assert torch.isfinite(s.grad).all()


# ----------------------------------------------------------------------------- heads


def test_fixed_head_has_no_parameters_and_constant_output() -> None:
    head = FixedQuantileHead(0.1, 0.9)
    assert list(head.parameters()) == []
    lower, upper = head(_logits(34))
    assert lower.shape == upper.shape == (B, T)
    assert (lower == 0.1).all() and (upper == 0.9).all()


@pytest.mark.parametrize(("lower", "upper"), [(0.5, 0.5), (0.8, 0.2), (-0.1, 0.5), (0.2, 1.1)])
def test_fixed_head_validates(lower: float, upper: float) -> None:
    with pytest.raises(ValueError, match=r"dac quantiles must satisfy 0 <= lower < upper <= 1, got lower="):
        FixedQuantileHead(lower, upper)


def test_quantile_head_shapes_ranges_and_mid_range_init() -> None:
    torch.manual_seed(0)
    head = QuantileHead(top_k=32, hidden=64, lower_range=(0.0, 0.3), upper_range=(0.7, 1.0))
    t = _logits(35, 5.0)  # V=5 < top_k: features are zero-padded
    assert head.features(t).shape == (B, T, 33)
    lower, upper = head(t)
    assert lower.shape == upper.shape == (B, T)
    assert ((lower - 0.15).abs() < 0.02).all() and ((upper - 0.85).abs() < 0.02).all()
    big = QuantileHead(top_k=4, hidden=8)
    with torch.no_grad():
        big.net[2].weight.mul_(1e3)  # saturate: outputs must still respect the ranges
    lo, up = big(_logits(36, 10.0, shape=(2, 3, 50)))
    assert ((lo >= 0.0) & (lo <= 0.3)).all() and ((up >= 0.7) & (up <= 1.0)).all()


def test_quantile_head_features_are_teacher_shape_and_detached() -> None:
    head = QuantileHead(top_k=3, hidden=4)
    t = torch.tensor([0.5, 0.25, 0.125, 0.125]).log().view(1, 1, 4).requires_grad_()
    feats = head.features(t)
    entropy = -(0.5 * math.log(0.5) + 0.25 * math.log(0.25) + 2 * 0.125 * math.log(0.125))
    torch.testing.assert_close(feats[0, 0], torch.tensor([0.5, 0.25, 0.125, entropy]))
    assert not feats.requires_grad


def test_quantile_head_validates_ranges() -> None:
    with pytest.raises(ValueError, match="quantile head ranges"):
        QuantileHead(lower_range=(0.0, 0.8), upper_range=(0.7, 1.0))


def _unshared_module_step(module, t, s, mask):
    """DacKl's loss and gradients computed the pre-sharing way: the head on every token's own log-softmax."""
    lower, upper = module.head(t.detach())
    return dac_kl_loss(t, s, mask, lower, upper, **module.kw).loss


@pytest.mark.parametrize("vocab", [50, 9000])  # full-sort path; soft top-k path (V >= SOFT_TOPK_MIN_VOCAB)
def test_module_shares_the_teacher_rows_without_changing_the_loss(vocab: int) -> None:
    """DacKl computes the teacher's log-softmax (and, at large V, its top-k) once, on the masked tokens only,
    for f_sub's features and the loss: loss, student gradient and head gradients equal the unshared path."""
    from mgsr.objectives import DacKl

    torch.manual_seed(0)
    module = DacKl(head="learnable", top_k=8, hidden=16)
    t = _logits(40, 3.0, shape=(2, 6, vocab))
    s0 = _logits(41, 3.0, shape=(2, 6, vocab))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)  # prompt tokens left out
    results = []
    for step in (lambda s: module(t, s, mask)[0], lambda s: _unshared_module_step(module, t, s, mask)):
        module.zero_grad()
        s = s0.clone().requires_grad_()
        loss = step(s)
        loss.backward()
        results.append((loss.detach(), s.grad.clone(), [p.grad.clone() for p in module.head.parameters()]))
    (l1, g1, h1), (l2, g2, h2) = results
    assert torch.equal(l1, l2) and torch.equal(g1, g2)  # same kernels on the same rows: bit-identical
    assert all(torch.equal(a, b) and a.abs().sum() > 0 for a, b in zip(h1, h2))
    from mgsr.losses.dac_kl import shared_teacher_rows

    assert (shared_teacher_rows(t, s0, mask, **module.kw).top is not None) == (vocab >= 8192)


def test_head_from_masked_rows_matches_forward_on_those_rows() -> None:
    from mgsr.losses.dac_kl_reference import teacher_rows

    torch.manual_seed(0)
    head = QuantileHead(top_k=4, hidden=8)
    t = _logits(42, 3.0, shape=(2, 5, 40))
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    rows = teacher_rows(t, mask, torch.float32)
    lo, up = head.from_rows(rows.log_probs, mask)
    lo_all, up_all = head(t)
    assert torch.equal(lo[mask], lo_all[mask]) and torch.equal(up[mask], up_all[mask])
    assert not torch.equal(lo[~mask], lo_all[~mask])  # the other tokens were not computed


@pytest.mark.parametrize("vocab", [50, 9000])
def test_module_with_an_empty_mask_gives_zero_and_a_graph(vocab: int) -> None:
    from mgsr.objectives import DacKl

    t, s = _logits(43, shape=(2, 3, vocab)), _logits(44, shape=(2, 3, vocab)).requires_grad_()
    loss, logs = DacKl()(t, s, torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert float(loss) == 0.0 and logs["kl"] == 0.0 and s.grad is not None and not s.grad.any()
