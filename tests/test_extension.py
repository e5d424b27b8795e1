"""Adding a divergence is one function + one YAML: in a copy of the tree, a Hellinger distance registered in
losses/divergences.py and described by conf/loss/distill/hellinger.yaml runs through KD, SCRG's error ranking
and a baseline (GKD), each a real `train.py` run on the tiny budget."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, copy_of_the_tree

pytestmark = pytest.mark.slow  # each test is a train.py run

HELLINGER = '''

@register_divergence("hellinger")
def hellinger(teacher_logits: torch.Tensor, student_logits: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """H^2(p, q) = 1 - sum_v sqrt(p_v q_v), times `scale`. Returns [B, T]."""
    lp, lq = teacher_student_log_probs(teacher_logits, student_logits)
    out = scale * (1.0 - torch.exp(0.5 * (lp + lq)).sum(-1))
    log = os.environ.get("HELLINGER_CALLS")
    if log:  # the test's witness: who called (the loss has gradients on, SCRG's ranking does not)
        with open(log, "a") as f:
            f.write("grad\\n" if torch.is_grad_enabled() else "nograd\\n")
    return out
'''

YAML = "# Hellinger distance (squared), a test's divergence\n_target_: mgsr.objectives.Divergence\nname: hellinger\n"


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = copy_of_the_tree(tmp_path_factory)
    div = root / "mgsr" / "losses" / "divergences.py"
    div.write_text(div.read_text().replace("import inspect\n", "import inspect\nimport os\n", 1) + HELLINGER)
    (root / "conf" / "loss" / "distill" / "hellinger.yaml").write_text(YAML)
    return root


def _train(tree: Path, tmp_path: Path, cache_dir, *overrides) -> tuple[dict, list[str], list[dict]]:
    calls = tmp_path / "calls.txt"
    run = tmp_path / "run"
    env = {**os.environ, "HELLINGER_CALLS": str(calls), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "train.py", *TINY, f"cache_dir={cache_dir}", f"hydra.run.dir={run}",
                          "eval.exposure_bias=false", *overrides], cwd=tree, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = list(csv.DictReader(open(run / "csv" / "metrics.csv")))
    return json.loads((run / "results.json").read_text()), calls.read_text().split() if calls.exists() else [], rows


def _logged(rows, key) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def test_hellinger_as_the_kd_loss(tree, tmp_path, cache_dir):
    _, calls, rows = _train(tree, tmp_path, cache_dir, "+experiment=baseline_kd", "loss/distill=hellinger")
    values = _logged(rows, "kd/hellinger")
    assert values and all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values)
    assert set(calls) == {"grad"}  # the loss only: KD has no SCRG


def test_hellinger_ranks_scrg_errors(tree, tmp_path, cache_dir):
    res, calls, _ = _train(tree, tmp_path, cache_dir, "+experiment=mgsr", "scrg.divergence=hellinger")
    assert "nograd" in calls and "grad" not in calls  # DAC-KL is the loss; Hellinger only ranks SCRG's errors
    assert res["scrg"]["unchanged_share"] < 1.0  # SCRG revised rows with that ranking


def test_hellinger_in_a_baseline(tree, tmp_path, cache_dir):
    _, calls, rows = _train(tree, tmp_path, cache_dir, "+experiment=baseline_gkd", "loss/distill=hellinger",
                            "+loss.distill.scale=2.0")
    assert _logged(rows, "kd/hellinger") and "grad" in calls
    assert all(0.0 <= v <= 2.0 for v in _logged(rows, "kd/hellinger"))
