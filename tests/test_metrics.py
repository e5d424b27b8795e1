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
        ("The Cat!", "cat", True),  # case, punctuation, article
        ("an apple.", "Apple", True),
        ("  cat \n\t sat ", "the cat sat", True),  # whitespace collapse, article in the middle
        ("theater", "ater", False),  # articles only as whole words
        ("cats", "cat", False),  # no stemming in exact match
        ("a-b", "ab", True),  # punctuation is deleted, not replaced by a space
    ],
)
def test_exact_match_normalisation(pred, ref, same):
    assert (normalize_answer(pred) == normalize_answer(ref)) is same
    assert exact_match([pred], [[ref]]) == (100.0 if same else 0.0)


def test_exact_match_max_over_refs_and_mean():
    preds = ["A cat.", "dog"]
    refs = [["dog", "cat"], ["cat"]]
    assert exact_match(preds, refs) == pytest.approx(50.0)
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
# Row 0 has 3 valid steps, row 1 has 1 (student) / 2 (teacher) valid steps.
STUDENT = torch.tensor([[1.0, 2.0, 3.0], [3.0, NAN, NAN]])
TEACHER = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, NAN]])
# R(1) = mean(1, 3) = 2; R(2) = mean((1+2)/2, 3) = 2.25; R(3) = mean((1+2+3)/3, 3) = 2.5
# eps(l) = 1 for all l -> ExAccErr = 100, 125, 150 (%)
HAND_R, HAND_EPS, HAND_CURVE = [2.0, 2.25, 2.5], [1.0, 1.0, 1.0], [100.0, 125.0, 150.0]


def test_exposure_bias_hand_values_with_nan_padding():
    out = exposure_bias(STUDENT, TEACHER)
    assert out["R"] == pytest.approx(HAND_R)
    assert out["eps"] == pytest.approx(HAND_EPS)
    assert out["curve"] == pytest.approx(HAND_CURVE)
    assert out["at_15"] == pytest.approx(150.0)  # L = 3 < 15 -> value at L


def test_exposure_bias_lengths_and_masks_equal_nan_padding():
    # Garbage (9) past each sequence's end must be ignored.
    s = torch.tensor([[1.0, 2.0, 3.0], [3.0, 9.0, 9.0]])
    t = torch.tensor([[1.0, 1.0, 1.0], [1.0, 9.0, 9.0]])
    out = exposure_bias(s, t, lengths=[3, 1])
    assert out["curve"] == pytest.approx(HAND_CURVE)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    out = exposure_bias(s, t, student_mask=mask, teacher_mask=mask)
    assert out["curve"] == pytest.approx(HAND_CURVE)
    # Without the lengths the garbage is counted, so the test can tell the difference.
    assert exposure_bias(s, t)["curve"] != pytest.approx(HAND_CURVE)


def test_exposure_bias_empty_sequence_is_left_out():
    s = torch.cat([STUDENT, torch.full((1, 3), NAN)])
    t = torch.cat([TEACHER, torch.full((1, 3), NAN)])
    out = exposure_bias(s, t)
    assert out["R"] == pytest.approx(HAND_R)  # the ratio alone would hide a wrong denominator
    assert out["eps"] == pytest.approx(HAND_EPS)
    assert out["curve"] == pytest.approx(HAND_CURVE)


def test_exposure_bias_zero_when_r_equals_eps():
    kl = torch.rand(4, 20, generator=torch.Generator().manual_seed(0)) + 0.1
    out = exposure_bias(kl, kl.clone())
    assert out["curve"] == pytest.approx([0.0] * 20, abs=1e-9)
    assert out["at_15"] == pytest.approx(0.0, abs=1e-9)


def test_exposure_bias_at_15_and_accumulation():
    # Student KL grows by 1 each step, teacher constant 1: R(l) = (l + 1) / 2, ExAccErr(l) = (l - 1) / 2 * 100.
    L = 20
    s = torch.arange(1, L + 1, dtype=torch.float32).repeat(2, 1)
    t = torch.ones(2, L)
    out = exposure_bias(s, t)
    assert out["curve"] == pytest.approx([(step - 1) / 2 * 100 for step in range(1, L + 1)])
    assert out["at_15"] == pytest.approx(700.0)


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
