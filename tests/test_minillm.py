"""MiniLLM (mgsr/losses/minillm.py, mgsr.objectives.MiniLlm, generation.generate_mixed, rollout reuse): golden values
against plain-loop references, gradients, extreme logits, the mixed sampler, and rollout reuse with its state."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GPT2Config, GPT2LMHeadModel

from mgsr.generation import SamplingConfig, generate, generate_mixed, response_logits
from mgsr.losses.minillm import (
    clipped_surrogate,
    future_returns,
    gather_logprobs,
    importance_weights,
    minillm_loss,
    single_step_rkl,
    token_rewards,
    whiten,
)
from mgsr.objectives import MiniLlm
from mgsr.sequences import SequenceSource

B, R, V = 2, 3, 4


def _lsm(row):
    m = max(row)
    z = math.log(sum(math.exp(x - m) for x in row)) + m
    return [x - z for x in row]


def _rollout():
    g = torch.Generator().manual_seed(3)
    t = torch.randn(B, R, V, generator=g, dtype=torch.float64)
    s = torch.randn(B, R, V, generator=g, dtype=torch.float64)
    tokens = torch.tensor([[1, 3, 0], [2, 2, 1]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    old = torch.tensor([[-1.2, -0.9, -2.0], [-1.5, -1.1, 0.0]], dtype=torch.float64)
    mix = torch.tensor([[-1.0, -1.3, -1.8], [-1.6, -1.0, 0.0]], dtype=torch.float64)
    return t, s, tokens, mask, old, mix


def test_single_step_rkl_matches_a_loop():
    t, s, *_ = _rollout()
    got = single_step_rkl(t, s)
    for b in range(B):
        for i in range(R):
            lq, lp = _lsm(s[b, i].tolist()), _lsm(t[b, i].tolist())
            want = sum(math.exp(a) * (a - c) for a, c in zip(lq, lp))
            assert float(got[b, i]) == pytest.approx(want, abs=1e-12)


def _ref_rewards(t, tokens, mask, old, scaling=0.5, clip=100.0):
    r = [[0.0] * R for _ in range(B)]
    for b in range(B):
        for i in range(R):
            if mask[b, i]:
                lp = _lsm(t[b, i].tolist())[int(tokens[b, i])]
                r[b][i] = max(-clip, min(clip, (lp - float(old[b, i])) / scaling))
    return r


def _ref_returns(r, mask, gamma, norm, include_current=True):
    out = [[0.0] * R for _ in range(B)]
    for b in range(B):
        for i in range(R):
            if not mask[b, i]:
                continue
            start = i if include_current else i + 1
            js = [j for j in range(start, R) if mask[b, j]]
            total = sum(gamma ** (j - start) * r[b][j] for j in js)
            out[b][i] = total / max(len(js), 1) if norm else total
    return out


def test_rewards_and_returns_match_loops():
    t, s, tokens, mask, old, mix = _rollout()
    r = token_rewards(gather_logprobs(t, tokens), old, mask)
    ref = _ref_rewards(t, tokens, mask, old)
    assert torch.allclose(r, torch.tensor(ref, dtype=r.dtype), atol=1e-12) and float(r[1, 2]) == 0.0
    assert token_rewards(gather_logprobs(t, tokens), old - 500, mask, clip=100.0).max() == 100.0
    for gamma in (1.0, 0.95):
        for norm in (True, False):
            for cur in (True, False):
                got = future_returns(r, mask, gamma=gamma, length_norm=norm, include_current=cur)
                want = _ref_returns(ref, mask, gamma, norm, cur)
                for b in range(B):
                    assert got[b].tolist() == pytest.approx(want[b], abs=1e-12)


def test_whiten_uses_the_masked_entries():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    vals = [1.0, 2.0, 3.0, 4.0, 5.0]
    mu = sum(vals) / 5
    sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / 4 + 1e-8)
    got = whiten(x, mask)
    assert got[0].tolist() == pytest.approx([(v - mu) / sd for v in vals[:3]])
    assert got[1, :2].tolist() == pytest.approx([(v - mu) / sd for v in vals[3:]]) and float(got[1, 2]) == 0.0


def test_importance_weights_and_their_cap():
    _, _, _, mask, old, mix = _rollout()
    w = importance_weights(old, mix, mask)
    for b in range(B):
        for i in range(R):
            want = math.exp(float(old[b, i]) - float(mix[b, i])) if mask[b, i] else 1.0
            assert float(w[b, i]) == pytest.approx(want)
    capped = importance_weights(old, mix, mask, clip=1.1)
    assert float(capped.max()) <= 1.1 and float(capped[0, 0]) == pytest.approx(math.exp(-0.2))
    assert float(capped[0, 1]) == pytest.approx(1.1)  # exp(0.4) = 1.49 capped


def test_clipped_surrogate_inside_and_outside_the_clip():
    mask = torch.tensor([[True, True, True], [True, True, False]])
    old = torch.zeros(B, R, dtype=torch.float64)
    # ratios: 1.1 (inside), 1.5 (above), 0.5 (below) | 0.9 (inside), 1.3 (above), masked
    ratio = torch.tensor([[1.1, 1.5, 0.5], [0.9, 1.3, 7.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 2.0, -1.0], [-0.5, -3.0, 4.0]], dtype=torch.float64)
    w = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.1, 1.0]], dtype=torch.float64)
    lp = ratio.log().requires_grad_()
    got = clipped_surrogate(lp, old, adv, mask, w, clip=0.2)
    terms = []
    for b in range(B):
        for i in range(R):
            if mask[b, i]:
                rho = float(ratio[b, i]) * float(w[b, i])
                a = float(adv[b, i])
                terms.append(max(-a * rho, -a * min(max(rho, 0.8), 1.2)))
    assert float(got.detach()) == pytest.approx(sum(terms) / len(terms))
    got.backward()
    # the gradient vanishes where the clipped branch is the max (1.5 with A > 0) and flows where it is not (0.5, A < 0:
    # max(-A rho, -A 0.8) = 0.5 at rho = 0.5 -> unclipped side 0.5 < 0.8: clipped term wins, no gradient)
    assert float(lp.grad[0, 1]) == 0.0 and float(lp.grad[0, 0]) != 0.0 and float(lp.grad[1, 2]) == 0.0
    assert float(lp.grad[0, 2]) == 0.0  # A < 0, rho below 1 - clip: -A * 0.8 > -A * 0.5, the clip binds


def test_the_whole_loss_equals_its_parts():
    t, s, tokens, mask, old, mix = _rollout()
    out = minillm_loss(t, s, tokens, mask, old, mix)
    r = token_rewards(gather_logprobs(t, tokens), old, mask)
    adv = whiten(future_returns(r, mask), mask)
    pg = clipped_surrogate(gather_logprobs(s, tokens), old, adv, mask, importance_weights(old, mix, mask))
    ss = (single_step_rkl(t, s) * mask).sum() / mask.sum()
    assert float(out.loss) == pytest.approx(float(pg + ss)) and float(out.pg) == pytest.approx(float(pg))
    off = minillm_loss(t, s, tokens, mask, old, mix, single_step=False)
    assert float(off.loss) == pytest.approx(float(pg))


def test_gradcheck_wrt_student_logits():
    t, s, tokens, mask, old, mix = _rollout()
    s = s.clone().requires_grad_()
    # old log-probs near the current ones keep every ratio strictly inside or outside the clip (no kinks)
    assert torch.autograd.gradcheck(lambda x: minillm_loss(t, x, tokens, mask, old, mix).loss, (s,), eps=1e-6,
                                    atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(scale=st.floats(1e-3, 1e4), shift=st.floats(-1e4, 1e4), seed=st.integers(0, 1000))
def test_extreme_logits_stay_finite(scale, shift, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(B, R, V, generator=g) * scale + shift
    s = (torch.randn(B, R, V, generator=g) * scale - shift).requires_grad_()
    tokens = torch.randint(V, (B, R), generator=g)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    old = gather_logprobs(s.detach(), tokens).clamp_min(-1e4) - 0.1
    mix = torch.logaddexp(old + math.log(0.8), gather_logprobs(t, tokens) + math.log(0.2))
    out = minillm_loss(t, s, tokens, mask, old, mix)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(s.grad).all()


# ------------------------------------------------------------------------------------------- the mixed sampler
def _model(seed):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                      bos_token_id=1, eos_token_id=2)).eval()


def _prompts():
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    return ids, (ids != 0).long()


@pytest.mark.parametrize("seed", [0, 1])
def test_mix_zero_is_the_student_sampler(seed):
    teacher, student = _model(1), _model(2)
    ids, mask = _prompts()
    cfg = SamplingConfig(max_new_tokens=10)
    a = generate(student, ids, mask, cfg, eos_id=2, pad_id=0, generator=torch.Generator().manual_seed(seed))
    b = generate_mixed(teacher, student, ids, mask, cfg, mix=0.0, eos_id=2, pad_id=0,
                       generator=torch.Generator().manual_seed(seed))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["response_mask"], b["response_mask"])
    assert torch.allclose(b["old_logprob"], b["mix_logprob"], atol=1e-6)


def test_mix_one_samples_the_teacher():
    teacher, student = _model(1), _model(2)
    ids, mask = _prompts()
    cfg = SamplingConfig(max_new_tokens=10)
    a = generate(teacher, ids, mask, cfg, eos_id=2, pad_id=0, generator=torch.Generator().manual_seed(5))
    b = generate_mixed(teacher, student, ids, mask, cfg, mix=1.0, eos_id=2, pad_id=0,
                       generator=torch.Generator().manual_seed(5))
    assert torch.equal(a["input_ids"], b["input_ids"])


def _mixed_rollout(new_tokens: int):
    teacher, student = _model(1), _model(2)
    ids, mask = _prompts()
    out = generate_mixed(teacher, student, ids, mask, SamplingConfig(max_new_tokens=new_tokens), mix=0.2, eos_id=2,
                         pad_id=0, generator=torch.Generator().manual_seed(0))
    return teacher, student, out


def test_recorded_logprobs_equal_a_forward_pass():
    teacher, student, out = _mixed_rollout(8)
    P = out["prompt_len"]
    tokens, m = out["input_ids"][:, P:], out["response_mask"][:, P:]
    with torch.no_grad():
        lq = gather_logprobs(response_logits(student, out), tokens)
        lp = gather_logprobs(response_logits(teacher, out), tokens)
    want_mix = torch.log(0.2 * lp.exp() + 0.8 * lq.exp())
    assert torch.allclose(out["old_logprob"][m], lq[m], atol=1e-5)
    assert torch.allclose(out["mix_logprob"][m], want_mix[m], atol=1e-5)
    assert (out["old_logprob"][~m] == 0).all()


def test_objective_reads_the_rollout():
    teacher, student, out = _mixed_rollout(6)
    P = out["prompt_len"]
    with torch.no_grad():
        t_logits = response_logits(teacher, out)
    s_logits = response_logits(student, out)
    loss, logs = MiniLlm()(t_logits, s_logits, out["response_mask"][:, P:],
                           seqs={"tokens": out["input_ids"][:, P:], "old_logprob": out["old_logprob"],
                                 "mix_logprob": out["mix_logprob"]})
    loss.backward()
    assert torch.isfinite(loss) and logs["ratio"] == pytest.approx(1.0, abs=1e-4)  # fresh rollout: q_theta = q_old
    with pytest.raises(ValueError, match="old_logprob"):
        MiniLlm()(t_logits, s_logits, out["response_mask"][:, P:], seqs={"tokens": out["input_ids"][:, P:]})
    with pytest.raises(ValueError, match="clip"):
        MiniLlm.check(clip=1.5)


# ------------------------------------------------------------------------------------------------ rollout reuse
def _batch(i):
    ids = torch.tensor([[i + 3, i + 4]])
    return {"input_ids": ids, "prompt_ids": ids, "prompt_attention_mask": torch.ones_like(ids)}


def _fake_rollout():
    calls = []

    def rollout(batch):
        calls.append(1)
        n = len(calls)
        ids = torch.cat([batch["prompt_ids"], torch.tensor([[n]])], 1)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "prompt_len": 2,
                "response_mask": torch.tensor([[False, False, True]]), "old_logprob": torch.tensor([[-float(n)]])}
    return rollout, calls


def test_each_fresh_rollout_is_served_reuse_times():
    rollout, calls = _fake_rollout()
    src = SequenceSource(reuse_rollouts=3)
    served = [float(src.next(_batch(s), step=s, total=9, rollout=rollout, pad_id=0)[1]["old_logprob"])
              for s in range(7)]
    assert served == [-1, -1, -1, -2, -2, -2, -3] and len(calls) == 3


def test_reuse_state_round_trip_mid_reuse():
    rollout, calls = _fake_rollout()
    src = SequenceSource(reuse_rollouts=4)
    for s in range(2):
        src.next(_batch(s), step=s, total=9, rollout=rollout, pad_id=0)
    state = src.state_dict()
    rest = [float(src.next(_batch(s), step=s, total=9, rollout=rollout, pad_id=0)[1]["old_logprob"])
            for s in range(2, 6)]
    rollout2, calls2 = _fake_rollout()
    calls2.append(1)  # the resumed run has made one rollout already
    again = SequenceSource(reuse_rollouts=4)
    again.load_state_dict(state)
    rest2 = [float(again.next(_batch(s), step=s, total=9, rollout=rollout2, pad_id=0)[1]["old_logprob"])
             for s in range(2, 6)]
    assert rest == rest2 == [-1, -1, -2, -2]
    with pytest.raises(ValueError, match="reuse_rollouts"):
        SequenceSource(reuse_rollouts=0)
