"""bench/step_cost.py: `--init testbed` measures from the start the comparison's cells train from."""

from __future__ import annotations

import subprocess
import sys
from argparse import Namespace

from conftest import REPO, compose_train

sys.path.insert(0, str(REPO / "bench"))
import step_cost as sc  # noqa: E402

from mgsr.build.student import student_init_path  # noqa: E402
from mgsr.build.teacher import teacher_cache_path  # noqa: E402
from mgsr.build.tokenizer import build_tokenizer  # noqa: E402


def _stage_keys(cfg):
    tok = build_tokenizer(cfg)
    return teacher_cache_path(cfg, tok).name, student_init_path(cfg, tok).name


def test_testbed_start_loads_the_compare_cells_teacher_and_init(tmp_path):
    bench = sc.testbed_config(Namespace(cache_dir=str(tmp_path), overrides=[]))
    # what compare=step_cost runs for its seed-0 cells (conf/compare/step_cost.yaml + results/README.md)
    cell = compose_train(["+experiment=mgsr", "scrg.rollout_batches=4", "seed=0", "logger=csv",
                          f"cache_dir={tmp_path}", "eval.exposure_bias=false"])
    assert _stage_keys(bench) == _stage_keys(cell)
    # and a data override the random-init bench uses would not be the same start
    assert _stage_keys(sc.testbed_config(Namespace(cache_dir=str(tmp_path), overrides=["data.n_train=256"])))[1] \
        != _stage_keys(cell)[1]


def test_grid_periods_cover_whole_generation_cycles():
    assert sc.steps_for("kd", 4) == 4
    assert sc.steps_for("mgsr_k4_n4", 4) == 16 and sc.steps_for("mgsr_k1_n2", 5) == 6 and sc.steps_for("mgsr_k8_n1", 4) == 8


def test_testbed_init_rejects_other_shapes_before_loading_anything():
    r = subprocess.run([sys.executable, str(REPO / "bench" / "step_cost.py"), "--init", "testbed", "--random-init"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--init testbed uses the testbed's own models" in r.stderr
