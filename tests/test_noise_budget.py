"""The noise budget's arithmetic (mgsr/noise_budget.py) against values computed by hand."""

import math

import pytest

from mgsr.noise_budget import NoiseBudget, deterministic_budget, noise_budget, per_eval_seed

# training seed -> {eval seed: score}; per-eval-seed differences e: [2, 3], [2, 1], [5, 3]
A = {0: {10: 3.0, 20: 5.0}, 1: {10: 4.0, 20: 4.0}, 2: {10: 6.0, 20: 5.0}}
B = {0: {10: 1.0, 20: 2.0}, 1: {10: 2.0, 20: 3.0}, 2: {10: 1.0, 20: 2.0}, 3: {10: 9.0, 20: 9.0}}


def test_split_by_hand():
    nb = noise_budget(A, B)
    # d = [2.5, 1.5, 4.0]: mean 8/3, var = (1/36 + 49/36 + 64/36) / 2 = 19/12
    assert nb.n == 3 and nb.sd == pytest.approx(math.sqrt(19 / 12))
    # var_j(e)/k per seed: 0.5/2, 0.5/2, 2/2 -> mean 0.5
    assert nb.var_eval == pytest.approx(0.5)
    assert nb.var_train == pytest.approx(19 / 12 - 0.5)
    assert nb.eval_share == pytest.approx(0.5 / (19 / 12))
    # t(0.975, 2) = 4.302653, t(0.80, 2) = 1.060660 (tables)
    assert nb.half == pytest.approx(4.302653 * math.sqrt(19 / 12) / math.sqrt(3), rel=1e-6)
    assert nb.mde == pytest.approx((4.302653 + 1.060660) * math.sqrt(19 / 12) / math.sqrt(3), rel=1e-6)


def test_seeds_needed_for_a_target_half_width():
    nb = noise_budget(A, B)
    # t(0.975, 26) = 2.0555: 2.0555 * sqrt(19/12 / 27) = 0.4977 <= 0.5; t(25) = 2.0595 at n = 26 gives 0.5082
    assert nb.seeds_for(0.5) == 27
    # twice the evaluation budget: var = 13/12 + 0.5/2 = 4/3; n = 23 (t 2.0739): 0.4993; n = 22 (t 2.0796): 0.5120
    assert nb.seeds_for(0.5, eval_factor=2.0) == 23
    assert nb.seeds_for(1e-6, max_seeds=50) is None


def test_eval_share_is_capped_and_train_floored():
    nb = NoiseBudget(n=3, sd=0.5, var_eval=0.5)  # more decoding noise than total spread: all of it is evaluation
    assert nb.eval_share == 1.0 and nb.var_train == 0.0


def test_deterministic_metric_has_no_eval_share():
    nb = deterministic_budget({0: 1.0, 1: 2.0, 2: 4.0}, {0: 0.5, 1: 1.0, 2: 1.0, 5: 3.0})
    # d = [0.5, 1.0, 3.0]: mean 1.5, var = (1 + 0.25 + 2.25) / 2 = 1.75
    assert nb.n == 3 and nb.sd == pytest.approx(math.sqrt(1.75))
    assert nb.var_eval == 0.0 and nb.eval_share == 0.0 and nb.var_train == pytest.approx(1.75)


def test_too_few_seeds_or_no_split():
    assert noise_budget({0: {10: 1.0}}, {0: {10: 0.0}}) is None
    nb = noise_budget({0: {None: 1.0}, 1: {None: 3.0}}, {0: {None: 0.0}, 1: {None: 1.0}})
    assert nb.sd == pytest.approx(math.sqrt(0.5)) and math.isnan(nb.var_eval) and math.isnan(nb.eval_share)
    assert nb.seeds_for(0.5) is not None  # the total spread alone still sizes the seed count
    assert nb.seeds_for(0.5, eval_factor=2.0) is None  # but not a changed evaluation budget


def test_per_eval_seed_averages_sets_like_the_cell_score():
    res = {"eval": {"per_seed": {"test": {"10": {"rougeL": 40.0}, "20": {"rougeL": 44.0}},
                                 "vicuna": {"10": {"rougeL": 20.0}, "20": {"rougeL": 30.0}}}}}
    assert per_eval_seed(res) == {"10": 30.0, "20": 37.0}
    assert per_eval_seed(res, ("test", "rougeL")) == {"10": 40.0, "20": 44.0}
    assert per_eval_seed({"eval": {}}) is None
