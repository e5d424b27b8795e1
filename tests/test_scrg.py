import math
import types

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from mgsr.generation import SamplingConfig, generate
from mgsr.scrg import (
    RevisionStats,
    ScrgConfig,
    pick_corrections,
    revise_once,
    rollout_and_revise,
    token_divergence,
)
from mgsr.sequences import SequenceSource

EOS, PAD = 1, 0


def _model(seed, init=0.02):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=30, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=EOS,
                     eos_token_id=EOS, initializer_range=init)
    return GPT2LMHeadModel(cfg).eval()


class SpikeTeacher(torch.nn.Module):
    """The student plus a planted spike: at response index j the teacher puts all mass on `token`."""

    def __init__(self, base, prompt_len, j, token):
        super().__init__()
        self.base, self.P, self.j, self.token = base, prompt_len, j, token

    def forward(self, input_ids, **kw):
        out = self.base(input_ids=input_ids, **kw)
        logits = out.logits.clone()
        offset = input_ids.shape[1] - logits.shape[1]  # columns dropped by logits_to_keep
        col = self.P - 1 + self.j - offset  # logits at column c predict token c + 1
        logits[:, col, self.token] += 60.0
        return types.SimpleNamespace(logits=logits, past_key_values=None)


@pytest.fixture(scope="module")
def rollout():
    student = _model(0)
    ids = torch.tensor([[PAD, 5, 6, 7], [8, 9, 10, 11]])
    seqs = generate(student, ids, (ids != PAD).long(), SamplingConfig(max_new_tokens=12), eos_id=EOS + 100,
                    pad_id=PAD, generator=torch.Generator().manual_seed(0))  # no EOS: full-length rollouts
    return student, seqs


def test_planted_spike_is_the_corrected_position(rollout):
    student, seqs = rollout
    P, j = seqs["prompt_len"], 5
    resp = seqs["input_ids"][:, P:]
    token = next(t for t in range(2, 30) if (resp[:, j] != t).all())
    teacher = SpikeTeacher(student, P, j, token)
    stats = RevisionStats()
    out = revise_once(teacher, student, seqs, ScrgConfig(), SamplingConfig(max_new_tokens=12, greedy=True),
                      eos_id=EOS + 100, pad_id=PAD, stats=stats)
    new = out["input_ids"][:, P:]
    assert torch.equal(new[:, :j], resp[:, :j])  # prefix before the error position unchanged
    assert (new[:, j] == token).all()  # the corrected token is the teacher's
    assert stats.summary()["position"] == pytest.approx(j / 12)
    assert stats.summary()["divergence"] > 2.0  # KL(one-hot || q) = -log q(token), about log(30) here
    assert stats.summary()["unchanged_share"] == 0.0


def test_no_candidate_keeps_rollout(rollout):
    student, seqs = rollout
    # teacher == student and the response is the student's own greedy choice -> no candidate anywhere
    P = seqs["prompt_len"]
    greedy = generate(student, seqs["input_ids"][:, :P], seqs["attention_mask"][:, :P],
                      SamplingConfig(max_new_tokens=8, greedy=True), eos_id=EOS + 100, pad_id=PAD)
    stats = RevisionStats()
    out = revise_once(student, student, greedy, ScrgConfig(), SamplingConfig(max_new_tokens=8, greedy=True),
                      eos_id=EOS + 100, pad_id=PAD, stats=stats)
    assert torch.equal(out["input_ids"], greedy["input_ids"])
    assert stats.summary()["unchanged_share"] == 1.0


def test_pick_single_is_argmax_over_candidates():
    div = torch.tensor([[0.1, 5.0, 0.3, 2.0], [1.0, 0.2, 0.9, 0.0]])
    cand = torch.tensor([[True, False, True, True], [False, False, False, False]])
    picked = pick_corrections(div, cand, ScrgConfig())
    assert picked.tolist() == [[False, False, False, True], [False] * 4]  # 5.0 is not a candidate


def test_pick_multi_fixed_threshold_takes_all_above_none_below():
    div = torch.tensor([[0.9, 0.1, 1.5, 0.8, 0.81]])
    cand = torch.tensor([[True, True, True, True, True]])
    picked = pick_corrections(div, cand, ScrgConfig(mode="multi", threshold=0.8))
    assert picked.tolist() == [[True, False, True, False, True]]
    capped = pick_corrections(div, cand, ScrgConfig(mode="multi", threshold=0.8, max_corrections=2))
    assert capped.tolist() == [[True, False, True, False, False]]  # the two largest


def test_pick_multi_adaptive_uses_per_sequence_quantile():
    div = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [10.0, 20.0, 30.0, 40.0, 50.0]])
    cand = torch.ones_like(div, dtype=torch.bool)
    picked = pick_corrections(div, cand, ScrgConfig(mode="multi", threshold_mode="adaptive", quantile=0.7))
    # 0.7-quantile of 1..5 is 3.8 -> {4, 5}; the same relative cut in the second row despite larger values
    assert picked.tolist() == [[False, False, False, True, True]] * 2


def test_multi_mode_keeps_tokens_between_corrections(rollout):
    student, seqs = rollout
    P = seqs["prompt_len"]
    resp = seqs["input_ids"][:, P:]
    t1 = next(t for t in range(2, 30) if (resp[:, 2] != t).all())
    t2 = next(t for t in range(2, 30) if (resp[:, 6] != t).all())
    teacher = SpikeTeacher(SpikeTeacher(student, P, 2, t1), P, 6, t2)
    stats = RevisionStats()
    out = revise_once(teacher, student, seqs, ScrgConfig(mode="multi", threshold=1.0),
                      SamplingConfig(max_new_tokens=12, greedy=True), eos_id=EOS + 100, pad_id=PAD, stats=stats)
    new = out["input_ids"][:, P:]
    assert (new[:, 2] == t1).all() and (new[:, 6] == t2).all()
    assert torch.equal(new[:, 3:6], resp[:, 3:6]) and torch.equal(new[:, :2], resp[:, :2])
    assert stats.summary()["corrected_per_seq"] == 2.0


def test_zero_rounds_is_plain_generation(rollout):
    student, seqs = rollout
    P = seqs["prompt_len"]
    prompts, mask = seqs["input_ids"][:, :P], seqs["attention_mask"][:, :P]
    cfg = SamplingConfig(max_new_tokens=12)
    a = rollout_and_revise(student, student, prompts, mask, ScrgConfig(rounds=0), cfg, eos_id=EOS, pad_id=PAD,
                           generator=torch.Generator().manual_seed(0))
    b = generate(student, prompts, mask, cfg, eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a["input_ids"], b["input_ids"])


def test_sequence_source_honours_frequency_and_replays():
    calls = []
    seqs = {"input_ids": torch.tensor([[3, 4, 5]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
            "response_mask": torch.tensor([[False, True, True]]), "prompt_len": 1}
    src = SequenceSource(every_n_steps=3)
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long)}
    rollout = lambda b: calls.append(1) or seqs  # noqa: E731
    for step in range(7):
        source, out = src.next(batch, step=step, total=7, rollout=rollout, pad_id=PAD)
        assert source == ("fresh" if step % 3 == 0 else "replay")
        assert out["input_ids"].shape[0] in (1, 2)
    assert len(calls) == 3  # steps 0, 3, 6
    assert src.counts == {"gold": 0, "fresh": 3, "replay": 4}
    src2 = SequenceSource(every_n_steps=3)
    src2.load_state_dict(src.state_dict())
    assert len(src2.buffer) == len(src.buffer) and src2.counts == src.counts


def test_bad_scrg_config_is_one_line():
    with pytest.raises(ValueError, match="scrg.mode must be single|multi"):
        ScrgConfig(mode="all")
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        SequenceSource(every_n_steps=0)


# --- adaptive multi-token threshold: rows with candidates always correct their maximum (issue 14.4) -----------
def test_pick_adaptive_single_candidate_and_equal_divergences_correct_the_maximum():
    div = torch.tensor([[0.5, 3.0, 0.2, 0.1], [2.0, 2.0, 2.0, 2.0], [1.0, 4.0, 2.0, 3.0]])
    cand = torch.tensor([[False, True, False, False], [True, True, True, True], [False, False, False, False]])
    picked = pick_corrections(div, cand, ScrgConfig(mode="multi", threshold_mode="adaptive", quantile=0.8))
    # one candidate: its quantile is itself; equal values: the quantile equals them -> still the maximum (the
    # first of the ties, as argmax); no candidates: nothing
    assert picked.tolist() == [[False, True, False, False], [True, False, False, False], [False] * 4]


def test_pick_adaptive_value_on_the_quantile_is_not_above_it():
    # 0.75-quantile of 1..5 is exactly 4.0: strictly above it is {5} only (a >= would also take 4)
    div = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    cand = torch.ones_like(div, dtype=torch.bool)
    picked = pick_corrections(div, cand, ScrgConfig(mode="multi", threshold_mode="adaptive", quantile=0.75))
    assert picked.tolist() == [[False, False, False, False, True]]


def test_adaptive_revision_corrects_a_row_with_one_candidate(rollout):
    student, seqs = rollout
    P, j = seqs["prompt_len"], 4
    resp = seqs["input_ids"][:, P:]
    token = next(t for t in range(2, 30) if (resp[:, j] != t).all())
    # teacher = student except the spike: the only position where the teacher's argmax differs is j (if the
    # student's sample is not its argmax elsewhere, those are candidates too; make them agree)
    greedy = generate(student, seqs["input_ids"][:, :P], seqs["attention_mask"][:, :P],
                      SamplingConfig(max_new_tokens=12, greedy=True), eos_id=EOS + 100, pad_id=PAD)
    teacher = SpikeTeacher(student, P, j, token)
    stats = RevisionStats()
    out = revise_once(teacher, student, greedy, ScrgConfig(mode="multi", threshold_mode="adaptive", quantile=0.9),
                      SamplingConfig(max_new_tokens=12, greedy=True), eos_id=EOS + 100, pad_id=PAD, stats=stats)
    assert (out["input_ids"][:, P + j] == token).all()
    assert stats.summary()["unchanged_share"] == 0.0 and stats.summary()["corrected_per_seq"] == 1.0


# --- mutations that the suite must catch (issue 14.11) ----------------------------------------------------------
def test_token_divergence_directions_golden():
    # p = (0.7, 0.2, 0.1) teacher, q = (0.2, 0.5, 0.3) student, as logits (log-probabilities)
    p, q = [0.7, 0.2, 0.1], [0.2, 0.5, 0.3]
    t_logits = torch.tensor(p).log().view(1, 1, 3)
    s_logits = torch.tensor(q).log().view(1, 1, 3)
    fkl = sum(a * math.log(a / b) for a, b in zip(p, q))  # KL(p || q) = 0.583815...
    rkl = sum(b * math.log(b / a) for a, b in zip(p, q))  # KL(q || p) = 0.537176...
    assert fkl == pytest.approx(0.5838150, abs=1e-6) and rkl == pytest.approx(0.5371758, abs=1e-6)
    assert token_divergence(t_logits, s_logits, "fkl").item() == pytest.approx(fkl, abs=1e-6)
    assert token_divergence(t_logits, s_logits, "rkl").item() == pytest.approx(rkl, abs=1e-6)


def _greedy_reference(model, prefix, n):
    """One row, no padding, no cache: argmax continuation of `prefix` for n tokens."""
    ids, out = prefix[None], []
    for _ in range(n):
        nxt = model(input_ids=ids).logits[0, -1].argmax()
        out.append(int(nxt))
        ids = torch.cat([ids, nxt.view(1, 1)], 1)
    return out


def test_multi_correction_regeneration_matches_a_cache_free_reference():
    # Two corrections (2 and 6): the scoring cache is exact only before the FIRST changed token; trusting it up
    # to the last one would keep the old token's keys/values at 2 and change what is generated after 6.
    # Large initial weights, so that the next token depends on the context, not only on the last token.
    student = _model(3, init=0.5)
    ids = torch.tensor([[PAD, 5, 6, 7], [8, 9, 10, 11], [PAD, PAD, 12, 13]])
    seqs = generate(student, ids, (ids != PAD).long(), SamplingConfig(max_new_tokens=16), eos_id=EOS + 100,
                    pad_id=PAD, generator=torch.Generator().manual_seed(0))
    P = seqs["prompt_len"]
    resp = seqs["input_ids"][:, P:]
    t1 = next(t for t in range(2, 30) if (resp[:, 2] != t).all())
    t2 = next(t for t in range(2, 30) if (resp[:, 6] != t).all())
    teacher = SpikeTeacher(SpikeTeacher(student, P, 2, t1), P, 6, t2)
    out = revise_once(teacher, student, seqs, ScrgConfig(mode="multi", threshold=1.0, max_corrections=2),
                      SamplingConfig(max_new_tokens=16, greedy=True), eos_id=EOS + 100, pad_id=PAD)
    with torch.no_grad():
        for b in range(resp.shape[0]):
            prompt = seqs["input_ids"][b, :P][seqs["attention_mask"][b, :P].bool()]
            kept = out["input_ids"][b, P:P + 7]
            assert kept[2] == t1 and kept[6] == t2
            ref = _greedy_reference(student, torch.cat([prompt, kept]), 16 - 7)
            assert out["input_ids"][b, P + 7:P + 16].tolist() == ref, b
