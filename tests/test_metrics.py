"""Golden-value tests for mgsr.evaluation.metrics (hand-computed references, tiny inputs)."""

from __future__ import annotations

import math

import pytest
import torch

from mgsr.evaluation.metrics import (
    distinct_n,
    exact_match,
    exposure_bias,
    mean_std,
    normalize_answer,
    postprocess,
    rouge_l,
    rouge_l_per_example,
)

# --- ROUGE-L -------------------------------------------------------------------------------------
# Words of <= 3 letters so the Porter stemmer (applied to tokens longer than 3 chars) changes nothing.
# 1) pred "the cat sat on the mat" (6 tok) vs ref "the cat is on the mat" (6 tok):
#    LCS = "the cat on the mat" = 5 -> P = R = 5/6 -> F = 5/6.
# 2) pred "a dog ran" (3 tok) vs refs ["the cat sat" (LCS 0 -> F 0), "a big dog ran far" (5 tok)]:
#    LCS = "a dog ran" = 3 -> P = 1, R = 3/5 -> F = 2 * 1 * 0.6 / 1.6 = 0.75; max over refs = 0.75.
# 3) pred "red fox" vs ref "fox red": LCS = 1 -> P = R = 1/2 -> F = 1/2 (order matters, unlike ROUGE-1).
PREDS = ["the cat sat on the mat", "a dog ran", "red fox"]
REFS = [["the cat is on the mat"], ["the cat sat", "a big dog ran far"], ["fox red"]]
HAND_F = [5 / 6, 0.75, 0.5]


def test_rouge_l_per_example_matches_hand_lcs():
    got = rouge_l_per_example(PREDS, REFS)
    assert got == pytest.approx([100 * f for f in HAND_F], abs=1e-9)


def test_rouge_l_corpus_is_mean_times_100():
    assert rouge_l(PREDS, REFS) == pytest.approx(100 * sum(HAND_F) / 3, abs=1e-9)


def test_rouge_l_max_over_references_is_order_independent():
    a = rouge_l(["a dog ran"], [["the cat sat", "a big dog ran far"]])
    b = rouge_l(["a dog ran"], [["a big dog ran far", "the cat sat"]])
    assert a == b == pytest.approx(75.0)


def test_rouge_l_uses_stemmer():
    # Porter: cats -> cat, running -> run; without stemming the F would be 0.
    assert rouge_l(["cats running"], [["cat run"]]) == pytest.approx(100.0)


def test_rouge_l_edge_cases():
    assert rouge_l([], []) == 0.0
    assert rouge_l([""], [["the cat"]]) == 0.0
    assert rouge_l(["the cat"], ["the cat"]) == pytest.approx(100.0)  # bare-string reference
    with pytest.raises(ValueError):
        rouge_l(["a", "b"], [["a"]])
    with pytest.raises(ValueError):
        rouge_l(["a"], [[]])


# --- exact match ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "pred, ref, same",
    [
        ("The Cat!", "the cat", True),  # case, punctuation
        ("The Cat!", "cat", False),  # MiniLLM keeps articles: "the cat" != "cat"
        ("an apple.", "Apple", False),
        ("  cat \n\t sat ", "cat sat", True),  # whitespace collapse
        ("cats", "cat", False),  # no stemming in exact match
        ("a-b", "ab", True),  # punctuation is deleted, not replaced by a space
    ],
)
def test_exact_match_minillm_normalisation(pred, ref, same):
    assert (normalize_answer(pred) == normalize_answer(ref)) is same
    assert exact_match([pred], [[ref]]) == (100.0 if same else 0.0)


@pytest.mark.parametrize(
    "pred, ref, same",
    [
        ("The Cat!", "cat", True),  # case, punctuation, article
        ("an apple.", "Apple", True),
        ("  cat \n\t sat ", "the cat sat", True),  # whitespace collapse, article in the middle
        ("theater", "ater", False),  # articles only as whole words
        ("cats", "cat", False),
        ("a-b", "ab", True),
    ],
)
def test_exact_match_squad_option(pred, ref, same):
    assert (normalize_answer(pred, "squad") == normalize_answer(ref, "squad")) is same
    assert exact_match([pred], [[ref]], style="squad") == (100.0 if same else 0.0)


def test_exact_match_hand_strings():
    assert normalize_answer("  The  Cat, sat; ON a mat!! ") == "the cat sat on a mat"
    assert normalize_answer("  The  Cat, sat; ON a mat!! ", "squad") == "cat sat on mat"
    with pytest.raises(ValueError, match="normalisation"):
        normalize_answer("x", "nope")


def test_exact_match_max_over_refs_and_mean():
    preds = ["A cat.", "dog"]
    refs = [["dog", "a cat"], ["cat"]]
    assert exact_match(preds, refs) == pytest.approx(50.0)
    assert exact_match(["A cat."], [["cat"]]) == 0.0 and exact_match(["A cat."], [["cat"]], style="squad") == 100.0
    assert exact_match([], []) == 0.0


# --- distinct-n ----------------------------------------------------------------------------------
CORPUS = ["the cat sat", "The cat ran away"]


def test_distinct_n_hand_counts():
    # unigrams: the cat sat the cat ran away -> 7 total, {the, cat, sat, ran, away} = 5 distinct
    assert distinct_n(CORPUS, 1) == pytest.approx(5 / 7)
    # bigrams: (the cat) (cat sat) (the cat) (cat ran) (ran away) -> 5 total, 4 distinct
    assert distinct_n(CORPUS, 2) == pytest.approx(4 / 5)
    # trigrams: (the cat sat) (the cat ran) (cat ran away) -> all distinct
    assert distinct_n(CORPUS, 3) == pytest.approx(1.0)
    assert distinct_n(CORPUS, 5) == 0.0


def test_distinct_n_does_not_cross_generations():
    # Only "a b" is a bigram; joining the generations would add "b c" (and "a a" below).
    assert distinct_n(["a b", "c"], 2) == pytest.approx(1.0)
    assert distinct_n(["a", "a"], 2) == 0.0
    assert distinct_n(["x x x x"], 1) == pytest.approx(0.25)
    assert distinct_n([], 1) == 0.0
    with pytest.raises(ValueError):
        distinct_n(CORPUS, 0)


def test_postprocess_strips():
    assert postprocess("  \n hello world \n") == "hello world"


# --- exposure bias -------------------------------------------------------------------------------
NAN = math.nan
# Ragged: row 0 has 3 valid steps, row 1 has 1 (student) / 2 (teacher) valid steps.
STUDENT = torch.tensor([[1.0, 2.0, 3.0], [3.0, NAN, NAN]])
TEACHER = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, NAN]])
# MiniLLM (sum over steps per sequence, then mean over the N = 2 sequences):
#   student cumsums [1, 3, 6] and [3, 3, 3] -> R = [2, 3, 4.5]
#   teacher cumsums [1, 2, 3] and [1, 2, 2] -> eps = [1, 2, 2.5]
#   ExAccErr = [(2-1)/1, (3-2)/2, (4.5-2.5)/2.5] x 100 = [100, 50, 80]
HAND_R, HAND_EPS, HAND_CURVE = [2.0, 3.0, 4.5], [1.0, 2.0, 2.5], [100.0, 50.0, 80.0]
# per_sequence (mean over sequences of each one's mean over its first l valid steps):
#   R = [mean(1, 3), mean(1.5, 3), mean(2, 3)] = [2, 2.25, 2.5]; eps = [1, 1, 1] -> [100, 125, 150]
SEQ_R, SEQ_EPS, SEQ_CURVE = [2.0, 2.25, 2.5], [1.0, 1.0, 1.0], [100.0, 125.0, 150.0]


def test_exposure_bias_minillm_hand_values_ragged():
    out = exposure_bias(STUDENT, TEACHER)
    assert out["R"] == pytest.approx(HAND_R)
    assert out["eps"] == pytest.approx(HAND_EPS)
    assert out["curve"] == pytest.approx(HAND_CURVE)
    assert out["at_15"] == pytest.approx(80.0)  # L = 3 <= 15 -> the last entry


def test_exposure_bias_per_sequence_option_hand_values():
    out = exposure_bias(STUDENT, TEACHER, average="per_sequence")
    assert out["R"] == pytest.approx(SEQ_R)
    assert out["eps"] == pytest.approx(SEQ_EPS)
    assert out["curve"] == pytest.approx(SEQ_CURVE)
    with pytest.raises(ValueError, match="average"):
        exposure_bias(STUDENT, TEACHER, average="nope")


def test_exposure_bias_minillm_matches_a_loop_reference():
    # MiniLLM's evaluate_exposure_bias.py, one sample per prompt, written as loops (without its +1e-3).
    g = torch.Generator().manual_seed(0)
    s, t = torch.rand(5, 12, generator=g) + 0.05, torch.rand(5, 12, generator=g) + 0.05
    ls, lt = [12, 3, 7, 1, 9], [5, 12, 2, 8, 12]
    s_mask = torch.tensor([[k < n for k in range(12)] for n in ls])
    t_mask = torch.tensor([[k < n for k in range(12)] for n in lt])
    out = exposure_bias(s, t, student_mask=s_mask, teacher_mask=t_mask)
    for k in range(12):
        r = sum(float(s[i, :k + 1][s_mask[i, :k + 1]].sum()) for i in range(5)) / 5
        e = sum(float(t[i, :k + 1][t_mask[i, :k + 1]].sum()) for i in range(5)) / 5
        assert out["R"][k] == pytest.approx(r) and out["eps"][k] == pytest.approx(e)
        assert out["curve"][k] == pytest.approx((r - e) / e * 100)


def test_exposure_bias_lengths_and_masks_equal_nan_padding():
    # Garbage (9) past each sequence's end must be ignored.
    s = torch.tensor([[1.0, 2.0, 3.0], [3.0, 9.0, 9.0]])
    t = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 9.0]])
    mask_s = torch.tensor([[True, True, True], [True, False, False]])
    mask_t = torch.tensor([[True, True, True], [True, True, False]])
    out = exposure_bias(s, t, student_mask=mask_s, teacher_mask=mask_t)
    assert out["curve"] == pytest.approx(HAND_CURVE)
    # lengths apply to both tables: teacher row 1 keeps 1 step -> eps = [1, 1.5, 2], R as above
    out = exposure_bias(s, t, lengths=[3, 1])
    assert out["eps"] == pytest.approx([1.0, 1.5, 2.0])
    assert out["curve"] == pytest.approx([100.0, 100.0, 125.0])
    # Without them the garbage is counted, so the test can tell the difference.
    assert exposure_bias(s, t)["curve"] != pytest.approx(HAND_CURVE)


def test_exposure_bias_empty_sequence_counts_in_the_mean():
    s = torch.cat([STUDENT, torch.full((1, 3), NAN)])
    t = torch.cat([TEACHER, torch.full((1, 3), NAN)])
    out = exposure_bias(s, t)
    assert out["R"] == pytest.approx([4 / 3, 2.0, 3.0])  # N = 3: an empty response adds 0, as in MiniLLM
    assert out["eps"] == pytest.approx([2 / 3, 4 / 3, 5 / 3])
    assert out["curve"] == pytest.approx(HAND_CURVE)  # N cancels in the ratio
    seq = exposure_bias(s, t, average="per_sequence")  # there: left out
    assert seq["R"] == pytest.approx(SEQ_R) and seq["curve"] == pytest.approx(SEQ_CURVE)


def test_exposure_bias_zero_when_r_equals_eps():
    kl = torch.rand(4, 20, generator=torch.Generator().manual_seed(0)) + 0.1
    out = exposure_bias(kl, kl.clone())
    assert out["curve"] == pytest.approx([0.0] * 20, abs=1e-9)
    assert out["at_15"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("average", ["minillm", "per_sequence"])
def test_exposure_bias_at_15_is_minillms_index_15(average):
    # Student KL grows by 1 each step, teacher constant 1 (equal lengths, so both averages agree):
    # R(k) = sum_{t<=k+1} t, eps(k) = k + 1 -> ExAccErr(k) = k / 2 x 100. MiniLLM reports ex_acc_err[15].
    L = 20
    s = torch.arange(1, L + 1, dtype=torch.float32).repeat(2, 1)
    t = torch.ones(2, L)
    out = exposure_bias(s, t, average=average)
    assert out["curve"] == pytest.approx([k / 2 * 100 for k in range(L)])
    assert out["at_15"] == pytest.approx(750.0) == out["curve"][15]


def test_exposure_bias_zero_eps_guard():
    zeros = torch.zeros(2, 3)
    assert exposure_bias(zeros, zeros)["curve"] == [0.0, 0.0, 0.0]
    assert exposure_bias(torch.ones(2, 3), zeros)["curve"] == [math.inf] * 3


# --- mean / std ----------------------------------------------------------------------------------
def test_mean_std_sample_std():
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))  # ddof=1: sqrt(2 / 2)
    assert mean_std([20.0, 22.0]) == pytest.approx((21.0, math.sqrt(2.0)))
    assert mean_std([5.0]) == (5.0, 0.0)
    with pytest.raises(ValueError):
        mean_std([])
