"""ABKD's alpha-beta divergence and TAID: golden values against plain-python loops, limit cases, gradients,
extreme logits, TAID's schedule and its checkpointed state, and the two experiments' configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import extreme_pair

from mgsr.build.validate import validate
from mgsr.losses.divergences import DIVERGENCES, divergence_loss, forward_kl, reverse_kl
from mgsr.losses.taid import interpolated_log_probs, taid_divergence, taid_terms, taid_update
from mgsr.objectives import Taid

B, T, V = 2, 3, 5
CONF = Path(__file__).resolve().parents[1] / "conf"
ab = DIVERGENCES["ab"]


def _logits(seed: int, dtype=torch.float64, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale).to(dtype)


def _softmax(row):
    mx = max(row)
    ex = [math.exp(x - mx) for x in row]
    return [x / sum(ex) for x in ex]


# ----------------------------------------------------------------------------- plain-python references


def _ab_ref(p, q, a, b):
    """Cichocki-Cruces-Amari AB-divergence of two probability vectors, case by case, as written in the paper."""
    if a == 0 and b == 0:
        return 0.5 * sum((math.log(x) - math.log(y)) ** 2 for x, y in zip(p, q))
    if b == 0:
        return sum(x**a * math.log(x**a / y**a) - x**a + y**a for x, y in zip(p, q)) / a**2
    if a == 0:
        return sum(y**b * math.log(y**b / x**b) - y**b + x**b for x, y in zip(p, q)) / b**2
    if a + b == 0:
        return sum(math.log(y**a / x**a) + (y**a / x**a) ** -1 - 1 for x, y in zip(p, q)) / a**2
    s = a + b
    return -sum(x**a * y**b - a / s * x**s - b / s * y**s for x, y in zip(p, q)) / (a * b)


def _per_token(fn, t, s):
    out = torch.empty(B, T, dtype=torch.float64)
    for i in range(B):
        for j in range(T):
            out[i, j] = fn(_softmax(t[i, j].tolist()), _softmax(s[i, j].tolist()))
    return out


AB_CASES = [(0.2, 0.7), (0.5, 0.5), (1.0, 0.0), (0.0, 1.0), (0.3, 0.0), (0.0, 0.4), (0.0, 0.0), (0.6, -0.6),
            (-0.4, 0.4), (1.5, 0.5), (0.1, 0.8), (2.0, -0.5)]


@pytest.mark.parametrize(("a", "b"), AB_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ab_golden_against_loops(a, b, dtype):
    t, s = _logits(0), _logits(1)
    want = _per_token(lambda p, q: _ab_ref(p, q, a, b), t, s)
    got = ab(t.to(dtype), s.to(dtype), alpha=a, beta=b)
    assert got.shape == (B, T) and got.dtype == dtype
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_ab_named_limits_are_fkl_rkl_and_amari_alpha():
    t, s = _logits(2), _logits(3)
    torch.testing.assert_close(ab(t, s, alpha=1.0, beta=0.0), forward_kl(t, s))  # the paper's (1, 0) = FKL
    torch.testing.assert_close(ab(t, s, alpha=0.0, beta=1.0), reverse_kl(t, s))  # and (0, 1) = RKL
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    for a in (0.2, 0.5, 0.9):  # alpha + beta = 1: Amari's alpha-divergence
        amari = (1 - (p**a * q ** (1 - a)).sum(-1)) / (a * (1 - a))
        torch.testing.assert_close(ab(t, s, alpha=a, beta=1 - a), amari)


@pytest.mark.parametrize(("a", "b", "da", "db"), [(1.0, 0.0, 0, 1), (0.3, 0.0, 0, 1), (0.0, 0.4, 1, 0),
                                                 (0.6, -0.6, 0, 1), (-0.7, 0.7, 1, 0), (0.0, 0.0, 1, 1)])
def test_ab_is_continuous_at_its_limit_cases(a, b, da, db):
    """The special cases are the limits of the general formula (not the official code's 1/alpha scaling)."""
    t, s = _logits(4), _logits(5)
    limit = ab(t, s, alpha=a, beta=b)
    errors = []
    for eps in (1e-3, 1e-4):
        near = ab(t, s, alpha=a + da * eps, beta=b + db * eps)
        errors.append((near - limit).abs().max().item())
    assert errors[1] < 0.2 * errors[0] + 1e-9 and errors[1] < 1e-2 * (1 + limit.abs().max().item())


def test_ab_official_code_scaling_differs_only_off_the_kl_points():
    """The official `ab_div` uses 1/alpha for beta = 0; ours is 1/alpha^2. Equal at alpha = 1, alpha x ours else."""
    t, s = _logits(6), _logits(7)
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    for a in (1.0, 0.3):
        official = ((p**a * torch.log(p**a / q**a)) - p**a + q**a).sum(-1) / a
        torch.testing.assert_close(official, a * ab(t, s, alpha=a, beta=0.0))


@pytest.mark.parametrize(("a", "b"), AB_CASES)
def test_ab_zero_when_equal_and_nonnegative(a, b):
    t, s = _logits(8), _logits(9)
    assert ab(t, t.clone(), alpha=a, beta=b).abs().max().item() < 1e-12
    assert ab(t, s, alpha=a, beta=b).min().item() >= 0.0


@pytest.mark.parametrize(("a", "b"), AB_CASES)
def test_ab_gradcheck_float64(a, b):
    t = torch.randn(1, 2, 4, dtype=torch.float64)
    s = torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ab(t, x, alpha=a, beta=b), (s,))


@pytest.mark.parametrize(("a", "b"), [(0.2, 0.7), (1.0, 0.0), (0.0, 1.0), (0.0, 0.0), (0.5, -0.5)])
def test_ab_masked_vocab_columns_give_zero_value_and_gradient(a, b):
    t, s = _logits(10), _logits(11).clone()
    t[..., 1] = -math.inf
    s[..., 1] = -math.inf
    s.requires_grad_()
    out = ab(t, s, alpha=a, beta=b)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(s.grad).all()
    assert (s.grad[..., 1] == 0).all()
    # the same as the divergence over the remaining columns
    keep = [0, 2, 3, 4]
    torch.testing.assert_close(out, ab(t[..., keep], s.detach()[..., keep], alpha=a, beta=b))


PARAMS = st.one_of(st.sampled_from([(1.0, 0.0), (0.0, 1.0), (0.0, 0.0), (0.2, 0.7)]),
                   st.tuples(st.floats(0.0, 1.5), st.floats(0.0, 1.5)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=extreme_pair(), params=PARAMS)
def test_ab_extreme_logits_finite(pair, params):
    a, b = params
    t, s = pair
    s = s.clone().requires_grad_()
    per_token = ab(t, s, alpha=a, beta=b)
    assert torch.isfinite(per_token).all(), per_token
    assert per_token.min().item() >= -1e-5
    divergence_loss("ab", t, s, torch.ones(1, 2, dtype=torch.bool), alpha=a, beta=b).backward()
    assert torch.isfinite(s.grad.float()).all()
    same = ab(t, t.clone(), alpha=a, beta=b)
    assert same.abs().max().item() < 1e-5


# ----------------------------------------------------------------------------- TAID: the loss


def _taid_ref(t_logits, s_logits, t):
    """(KL(p_t || q), -sum p_t log q) with p_t = softmax((1 - t) z_s + t z_t), by loops."""
    kl = torch.empty(B, T, dtype=torch.float64)
    ce = torch.empty(B, T, dtype=torch.float64)
    for i in range(B):
        for j in range(T):
            zs, zt = s_logits[i, j].tolist(), t_logits[i, j].tolist()
            pt = _softmax([(1 - t) * x + t * y for x, y in zip(zs, zt)])
            q = _softmax(zs)
            kl[i, j] = sum(a * math.log(a / b) for a, b in zip(pt, q) if a > 0)
            ce[i, j] = -sum(a * math.log(b) for a, b in zip(pt, q) if a > 0)
    return kl, ce


@pytest.mark.parametrize("t", [0.0, 0.2, 0.4, 0.75, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_taid_golden_against_loops(t, dtype):
    te, s = _logits(12), _logits(13)
    kl_want, ce_want = _taid_ref(te, s, t)
    kl, ce = taid_terms(te.to(dtype), s.to(dtype), t)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(kl.double(), kl_want, rtol=tol, atol=tol)
    torch.testing.assert_close(ce.double(), ce_want, rtol=tol, atol=tol)


def test_taid_endpoints():
    te, s = _logits(14), _logits(15)
    torch.testing.assert_close(taid_divergence(te, s, 1.0), forward_kl(te, s))  # t = 1: plain FKL to the teacher
    assert taid_divergence(te, s, 0.0).abs().max() < 1e-12  # t = 0: the target is the student itself
    assert taid_divergence(te, te.clone(), 0.6).abs().max() < 1e-12  # p == q: zero for every t


def test_taid_gradient_is_that_of_the_cross_entropy_to_a_constant_target():
    te, s0 = _logits(16), _logits(17)
    t = 0.4
    s = s0.clone().requires_grad_()
    taid_divergence(te, s, t).sum().backward()
    p_t = interpolated_log_probs(te, s0, t).exp()
    torch.testing.assert_close(s.grad, torch.softmax(s0, -1) - p_t)  # d/dz_s of -sum p_t log q, p_t fixed
    # and autograd's gradient equals gradcheck's numerical one for the same fixed target
    z_fixed = (1 - t) * s0 + t * te
    x = s0.clone()[:1, :2, :4].contiguous().requires_grad_()
    assert torch.autograd.gradcheck(lambda y: forward_kl(z_fixed[:1, :2, :4], y), (x,))
    x2 = x.detach().clone().requires_grad_()
    taid_divergence(te[:1, :2, :4], x2, t).sum().backward()
    x3 = x.detach().clone().requires_grad_()
    forward_kl(((1 - t) * x.detach() + t * te[:1, :2, :4]), x3).sum().backward()
    torch.testing.assert_close(x2.grad, x3.grad)
    assert te.grad is None


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=extreme_pair(), t=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)))
def test_taid_extreme_logits_finite(pair, t):
    te, s = pair
    s = s.clone().requires_grad_()
    kl, ce = taid_terms(te, s, t)
    assert torch.isfinite(kl).all() and torch.isfinite(ce).all(), (kl, ce)
    assert kl.min().item() >= -1e-5 and ce.min().item() >= -1e-5
    kl.sum().backward()
    assert torch.isfinite(s.grad.float()).all()
    assert taid_divergence(te, te.clone(), t).abs().max().item() < 1e-5


@pytest.mark.parametrize("t", [1e-310, 1.0 - 2 ** -53, 1e-46])
def test_taid_weights_that_round_to_zero_in_float32_stay_finite(t):
    """Found by hypothesis: a t that is not 0 in float64 but is in float32 made 0 * -inf = NaN."""
    te = torch.tensor([[[2.0, float("-inf"), 0.5, -1.0]]])
    s = torch.tensor([[[float("-inf"), 1.0, 0.0, 3.0]]], requires_grad=True)
    kl, ce = taid_terms(te, s, t)
    assert torch.isfinite(kl).all() and torch.isfinite(ce).all(), (kl, ce)
    kl.sum().backward()
    assert torch.isfinite(s.grad).all()


# ----------------------------------------------------------------------------- TAID: the schedule


def test_taid_update_by_hand():
    # first call: remember the loss, t unchanged
    assert taid_update(0.4, 0.0, math.inf, 10.0, 0, 100) == (0.4, 0.0, 10.0)
    # then: r = (10 - 8) / 10 = 0.2, m = 0.01 * 0.2 = 0.002, delta = alpha * sigmoid(m) * (1 - t)
    t, m, prev = taid_update(0.4, 0.0, 10.0, 8.0, 1, 100, alpha=0.1)
    assert m == pytest.approx(0.002) and prev == 8.0
    assert t == pytest.approx(0.4 + 0.1 * (1 / (1 + math.exp(-0.002))) * 0.6)  # above the ramp 0.406
    # default alpha 5e-4: the ramp (0.4 + 0.6 * 50/100 = 0.7) is the binding lower bound
    t, _, _ = taid_update(0.41, 0.0, 10.0, 8.0, 50, 100)
    assert t == pytest.approx(0.7)
    # never above t_end
    t, _, _ = taid_update(0.99, 5.0, 10.0, 1.0, 10, 100, alpha=1.0, t_end=0.995)
    assert t == 0.995
    # adaptive off: exactly the ramp
    t, _, _ = taid_update(0.9, 0.0, 10.0, 1.0, 25, 100, adaptive=False)
    assert t == pytest.approx(0.55)


def _run_schedule(losses, total, **hp):
    t, m, prev = hp.get("t_start", 0.4), 0.0, math.inf
    ts = []
    for step, loss in enumerate(losses):
        t, m, prev = taid_update(t, m, prev, loss, step, total, **hp)
        ts.append(t)
    return ts


def test_taid_schedule_on_a_sequence_of_losses():
    losses = [5.0, 4.0, 3.5, 3.4, 3.6, 3.0, 2.9, 2.95, 2.5, 2.4, 2.6, 2.2] * 3
    total = len(losses)
    for hp in (dict(), dict(alpha=0.05), dict(alpha=0.05, t_start=0.2, t_end=0.9), dict(adaptive=False)):
        ts = _run_schedule(losses, total, **hp)
        lo, hi = hp.get("t_start", 0.4), hp.get("t_end", 1.0)
        ramp = [lo + (hi - lo) * k / total for k in range(total)]
        assert all(lo <= x <= hi for x in ts)
        assert all(b >= a for a, b in zip(ts, ts[1:]))  # never decreases
        assert all(x >= r - 1e-12 for x, r in zip(ts[1:], ramp[1:]))  # never behind the linear ramp
    # a faster falling objective (larger momentum) moves t further than a rising one
    falling = _run_schedule([10.0 * 0.9**k for k in range(20)], 1000, alpha=0.05)
    rising = _run_schedule([10.0 * 1.1**k for k in range(20)], 1000, alpha=0.05)
    assert falling[-1] > rising[-1] > 0.4


def _forward(obj: Taid, seed: int):
    te, s = _logits(seed, torch.float32), _logits(seed + 1, torch.float32)
    return obj(te, s, torch.ones(B, T, dtype=torch.bool))


def test_taid_object_updates_once_per_optimiser_step_and_resumes_exactly():
    a = Taid(alpha=0.05)
    logged = []
    for step in range(4):
        _, logs = _forward(a, 20 + step)
        logged.append(logs["ce"])
        a.on_train_step(step, 10)
        assert {"t", "kl", "ce", "momentum"} <= set(logs)
    # the same as the pure schedule on the logged objectives
    want = _run_schedule(logged, 10, alpha=0.05)
    assert float(a.t) == pytest.approx(want[-1], abs=1e-12) and float(a.t) > 0.4
    # state_dict round trip: a fresh object continues identically
    b = Taid(alpha=0.05)
    b.load_state_dict(a.state_dict())
    assert set(a.state_dict()) >= {"t", "momentum", "prev_loss"}
    for step in range(4, 7):
        for obj in (a, b):
            _forward(obj, 30 + step)
            obj.on_train_step(step, 10)
        assert float(a.t) == float(b.t) and float(a.momentum) == float(b.momentum)


def test_taid_accumulation_updates_with_the_mean_of_the_step():
    acc, one = Taid(alpha=0.05), Taid(alpha=0.05)
    for step in range(3):
        ces = []
        for micro in range(2):
            _, logs = _forward(acc, 40 + 2 * step + micro)
            ces.append(logs["ce"])
            acc.on_train_step(step, 5, accumulate=2)
            if micro == 0:
                assert int(acc.pending_count) == 1  # no update in the middle of a step
        one.update(sum(ces) / 2, step, 5)
        assert float(acc.t) == pytest.approx(float(one.t), abs=1e-12)


@pytest.mark.parametrize(("kw", "key"), [(dict(t_start=1.0), "t_start"), (dict(t_start=-0.1), "t_start"),
                                         (dict(t_end=0.3), "t_end"), (dict(alpha=2.0), "alpha"),
                                         (dict(beta=1.0), "beta")])
def test_taid_check_names_the_key(kw, key):
    with pytest.raises(ValueError, match=f"loss.distill.{key}"):
        Taid.check(**kw)


# ----------------------------------------------------------------------------- the experiments


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


def test_abkd_experiment_composes_and_validates():
    cfg = _compose(["+experiment=baseline_abkd"])
    validate(cfg)
    assert cfg.name == "abkd" and cfg.loss.distill.name == "ab" and not cfg.scrg.enabled
    assert (cfg.loss.distill.alpha, cfg.loss.distill.beta) == (0.2, 0.7)
    assert cfg.loss.sft_weight == 0 and cfg.loss.distill_weight == 1
    with pytest.raises(Exception, match="ab has no parameter gamma"):
        validate(_compose(["+experiment=baseline_abkd", "+loss.distill.gamma=1"]))


def test_taid_experiment_composes_and_validates():
    cfg = _compose(["+experiment=baseline_taid"])
    validate(cfg)
    assert cfg.name == "taid" and cfg.loss.distill._target_ == "mgsr.objectives.Taid" and not cfg.scrg.enabled
    assert cfg.loss.sft_weight == 0 and cfg.loss.distill_weight == 1
    assert (cfg.loss.distill.t_start, cfg.loss.distill.alpha, cfg.loss.distill.beta) == (0.4, 5e-4, 0.99)
    with pytest.raises(Exception, match="loss.distill.t_start"):
        validate(_compose(["+experiment=baseline_taid", "loss.distill.t_start=1.5"]))


def test_compare_preset_lists_both():
    text = (CONF / "compare" / "paper.yaml").read_text()
    assert "abkd: [+experiment=baseline_abkd]" in text and "taid: [+experiment=baseline_taid]" in text
