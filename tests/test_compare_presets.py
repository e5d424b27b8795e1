"""The testbed's comparison presets: every row of compare=ablations is MGSR with exactly the change its label
names, every row of both presets runs the resolution protocol, and the two presets share their mgsr cells."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO, compose_train
from omegaconf import OmegaConf

from mgsr.build.validate import validate
from mgsr.compare import Spec

ABL = yaml.safe_load((REPO / "conf" / "compare" / "ablations.yaml").read_text())
PAPER = yaml.safe_load((REPO / "conf" / "compare" / "paper.yaml").read_text())


def _cfg(spec, method):
    return compose_train([*spec["methods"][method], "seed=1", *spec["overrides"]])


def _flat(cfg, keys):
    return {k: OmegaConf.select(cfg, k) for k in keys}


KEYS = ("loss.sft_weight", "loss.distill_weight", "loss.span_weight", "loss.distill._target_", "loss.distill.head",
        "loss.distill.lower", "loss.distill.upper", "loss.distill.band", "scrg.rounds", "scrg.mode",
        "scrg.threshold_mode", "scrg.threshold", "scrg.quantile", "trainer.max_steps", "optim.lr")


@pytest.mark.parametrize("method", list(ABL["methods"]))
def test_every_ablation_row_is_mgsr_with_one_change(method):
    cfg = _cfg(ABL, method)
    validate(cfg)
    # the resolution protocol: no selection, 1000 test prompts x 3 seeds, teacher-forced metrics
    assert cfg.checkpoint.monitor is None and cfg.trainer.limit_val_batches == 0
    assert cfg.data.n_test == 1000 and list(cfg.eval.seeds) == [10, 20, 30] and cfg.eval.teacher_forced
    ref, got = _flat(_cfg(ABL, "mgsr"), KEYS), _flat(cfg, KEYS)
    changed = {k for k in KEYS if ref[k] != got[k]}
    expected = {"mgsr": set(),
                "no_scrg": {"scrg.rounds"}, "no_span": {"loss.span_weight"},
                "multi_t0.8": {"scrg.mode"} | ({"scrg.threshold"} if ref["scrg.threshold"] != 0.8 else set()),
                "w_dac0_span1": {"loss.distill_weight"}, "w_dac0.5_span0.5": {"loss.distill_weight",
                                                                              "loss.span_weight"},
                "w_dac1_span0.5": {"loss.span_weight"}, "w_dac0.5_span1": {"loss.distill_weight"}}
    if method in expected:
        assert changed == expected[method], changed
    elif method.startswith("clip_q"):  # fixed bounds in mass space instead of the learned head
        lo, hi = int(method[6:8]) / 100, int(method[9:11]) / 100
        assert (got["loss.distill.lower"], got["loss.distill.upper"]) == (lo, hi) and got["loss.distill.head"] == "fixed"
        assert changed <= {"loss.distill.head", "loss.distill.lower", "loss.distill.upper", "loss.distill.band"}
    else:  # adaptive_q*: multi-token SCRG above the sequence's q-quantile
        assert got["scrg.mode"] == "multi" and got["scrg.threshold_mode"] == "adaptive"
        assert got["scrg.quantile"] == float(method.split("_q")[1])
        assert changed <= {"scrg.mode", "scrg.threshold_mode", "scrg.quantile"}


def test_the_presets_share_their_mgsr_cells_and_protocol():
    a = Spec(name="a", methods=ABL["methods"], seeds=[0], overrides=ABL["overrides"])
    p = Spec(name="p", methods=PAPER["methods"], seeds=[0], overrides=PAPER["overrides"])
    out = REPO / "results" / "testbed"
    assert a.command(out, "mgsr", 0) == p.command(out, "mgsr", 0)  # one cell, run once, reported twice
    assert "protocol=resolution" in PAPER["overrides"] and ABL["baselines"] == ["mgsr"]
    assert ABL["report_name"] == "report_ablations"
