"""tools/noise_levers.py: the rescoring on the first prompts and the unpaired decoding variance, by hand, and one
run over two tiny cell sets."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import noise_levers  # noqa: E402


def test_first_prompts_rescore_each_eval_seed():
    r = {"eval": {"per_prompt": {"test": {"10": [10.0, 20.0, 90.0], "20": [30.0, 40.0, 0.0]}}}}
    assert noise_levers.first_prompts(r, 2) == {"10": 15.0, "20": 35.0}
    assert noise_levers.first_prompts({"eval": {}}, 2) is None


def test_unpaired_eval_variance_adds_each_cells_own():
    a = {0: {"10": 1.0, "20": 3.0}}   # var 2 -> 2/2 = 1
    b = {0: {"10": 0.0, "20": 4.0}}   # var 8 -> 8/2 = 4
    assert noise_levers.unpaired_eval_var(a, b) == pytest.approx(5.0)


def _cell(root: Path, method: str, seed: int, per_seed: dict, fkl: float):
    d = root / "runs" / method / f"seed{seed}"
    d.mkdir(parents=True)
    res = {"eval": {"per_seed": {"test": {j: {"rougeL": v} for j, v in per_seed.items()}},
                    "per_prompt": {"test": {j: [v, v] for j, v in per_seed.items()}}},
           "teacher_forced": {"test": {"nll": 1.0, "fkl": fkl}}}
    (d / "results.json").write_text(json.dumps(res))


def test_a_run_over_two_cell_sets_writes_a_stamped_table(tmp_path):
    b_scores = [(1.0, 2.0), (2.0, 3.0), (1.0, 2.0)]
    for s, (x, y) in enumerate([(3.0, 5.0), (4.0, 4.0), (6.0, 5.0)]):  # e = [2, 3], [2, 1], [5, 3]
        _cell(tmp_path / "v2", "a", s, {"10": x, "20": y}, fkl=0.5 + 0.1 * s)
        _cell(tmp_path / "v2", "b", s, {"10": b_scores[s][0], "20": b_scores[s][1]}, fkl=0.5)
    (tmp_path / "v1").mkdir()
    out = subprocess.run([sys.executable, "tools/noise_levers.py", "--pairs", "a:b", "--v1", str(tmp_path / "v1"),
                          "--v2", str(tmp_path / "v2"), "--json", str(tmp_path / "l.json"),
                          "--md", str(tmp_path / "l.md")], cwd=REPO, capture_output=True, text=True, check=True)
    md = (tmp_path / "l.md").read_text()
    assert md.splitlines()[2].startswith("commit `")
    # per-seed differences 2.5, 1.5, 4.0 (tests/test_noise_budget.py): sd sqrt(19/12)
    row = next(x for x in md.splitlines() if x.startswith("| a − b | v2 (resolution protocol)"))
    assert f"| {math.sqrt(19 / 12):.2f} |" in row and f"| {0.5 ** 0.5:.2f} |" in row
    fkl = next(x for x in md.splitlines() if x.startswith("| a − b | v2 teacher-forced FKL"))
    assert "| +0.100 |" in fkl and "| 0.000 |" in fkl  # mean difference 0.1, no evaluation noise
    assert out.returncode == 0
