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


def test_grid_table_joins_cost_and_quality(tmp_path):
    import grid_table as gt

    def run(commit, ratios):
        return {"machine": {"commit": commit, "cpu": "cpu", "torch_threads": 1, "torch": "2"},
                "steps": [{"method": m, "x_kd": x, "mem_x_kd": 1.0} for m, x in ratios.items()]}

    costs = {"testbed start": run("aaa", {"kd": 1.0, "mgsr_k1_n1": 3.0, "mgsr_k1_n4": 1.7, "gkd": 1.4}),
             "random init": run("bbb", {"kd": 1.0, "mgsr_k1_n1": 4.5, "mgsr_k1_n4": 2.8})}
    report = tmp_path / "report_x.csv"
    report.write_text("method,n_seeds,rougeL_mean,rougeL_ci95_half,diff_mgsr_mean,diff_mgsr_lo,diff_mgsr_hi,"
                      "diff_mgsr_excludes_zero\n"
                      "mgsr,5,56.0,2.0,,,,\n"
                      "mgsr_k1_n4,5,54.0,1.5,-2.0,-3.5,-0.5,True\n")
    (tmp_path / "report_x.stamp.json").write_text('{"commit": "ccc"}')
    text = gt.render(costs, gt.load_quality([report]), [report])
    lines = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| `")}
    assert text.startswith("commit `aaa`") and "random init `bbb`" in text and "report_x.csv `ccc`" in text
    assert lines["| `mgsr_k1_n1` (default)"].endswith("| 3.00 | 4.50 | 1.00 | 56.00 ± 2.00 (5 seeds) | (reference) |")
    assert "-2.00 [-3.50, -0.50]*" in lines["| `mgsr_k1_n4`"]
    assert lines["| `gkd` (baseline)"].endswith("| 1.40 | — | 1.00 | not run |  |")
