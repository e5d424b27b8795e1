"""The real pair's comparison preset (conf/compare/real_smollm2.yaml) and its GPU script: every row composes into a
valid run of the real_smollm2 preset, and the script says in one line why it cannot run on a machine without CUDA."""

from __future__ import annotations

import subprocess

import pytest
import torch
import yaml
from conftest import REPO, SHARED, compose_train, require_real_model

from mgsr.build.validate import validate

SPEC = yaml.safe_load((REPO / "conf" / "compare" / "real_smollm2.yaml").read_text())


@pytest.mark.parametrize("method", list(SPEC["methods"]))
def test_every_row_is_a_valid_real_smollm2_run(method):
    require_real_model()
    cfg = compose_train([*SPEC["methods"][method], "seed=1", *SPEC["overrides"]])
    validate(cfg)
    assert cfg.data.source == "jsonl" and cfg.model.student.init == "prune"  # the real pair on Dolly, every row
    assert cfg.data.max_eval_records >= 200 and list(cfg.eval.seeds) == [10, 20, 30, 40, 50]
    assert cfg.data.shuffle_seed == 1  # the training seed sets the data order (the pruned start does not vary)
    trained = {"sft": (1.0, 0.0, False), "kd": (0.5, 0.5, False), "mgsr": (1.0, 1.0, True)}
    if method in trained:
        assert (cfg.loss.sft_weight, cfg.loss.distill_weight, bool(cfg.scrg.enabled)) == trained[method]
        assert cfg.eval_only is None and cfg.name == method
    else:
        assert cfg.eval_only == {"teacher": "teacher", "init": "student_init"}[method]


@pytest.mark.real_model
def test_the_final_test_set_keeps_at_least_200_prompts(real_cache, monkeypatch):
    """data.max_eval_records counts records read; prompts over max_prompt_len are dropped after that, so the
    preset reads enough of them for >= 200 to survive under the real tokenizer's chat template."""
    from mgsr.build.data import build_datamodule, resolve_data_path
    from mgsr.build.tokenizer import build_tokenizer
    from mgsr.sources import resolve_model_sources

    monkeypatch.setenv("MGSR_DATA", str(SHARED / "data"))
    cfg = compose_train([*SPEC["methods"]["mgsr"], "seed=0", *SPEC["overrides"], f"cache_dir={real_cache}"])
    resolve_model_sources(cfg)
    resolve_data_path(cfg)
    dm = build_datamodule(cfg, build_tokenizer(cfg))
    dm.setup("test")
    kept, dropped = len(dm.records["test"]), dm.stats["test"].get("prompt_too_long", 0)
    assert kept + dropped == cfg.data.max_eval_records and kept >= 200, (kept, dropped)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run")
def test_gpu_script_exits_with_one_line_without_cuda():
    out = subprocess.run(["bash", "bench/gpu_real_table.sh"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "gpu_real_table: no CUDA device (torch.cuda.is_available() is false): run it on a GPU machine"]
