"""The cached SFT stages: progress lines a non-interactive log can show, and one stage trained once when two
runs share a cache."""

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mgsr.data.datamodule import DistillDataModule
from mgsr.data.tokenizer import build_tokenizer
from mgsr.models import build_from_config
from mgsr.sft_stage import fine_tune_cached

REPO = Path(__file__).resolve().parents[1]
ARCH = {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 512}


@pytest.fixture(scope="module")
def tok_dm():
    from mgsr.data.synthetic import make_synthetic_splits, synthetic_corpus

    tok = build_tokenizer(list(synthetic_corpus(make_synthetic_splits(0, 40, 0, 0)["train"])), vocab_size=300)
    dm = DistillDataModule(tok, source="synthetic", n_train=16, n_val=4, n_test=4, batch_size=4)
    return tok, dm


def test_progress_is_logged_with_step_loss_and_eta(tmp_path, tok_dm, caplog, monkeypatch):
    import mgsr.callbacks as callbacks

    monkeypatch.setattr(callbacks, "PROGRESS_EVERY_S", 0.0)  # a line per step, so a 3-step stage shows them all
    caplog.set_level(logging.INFO, logger="mgsr")
    tok, dm = tok_dm
    fine_tune_cached(tmp_path / "stage", lambda: build_from_config(ARCH, tok), tok, dm, max_steps=3, lr=1e-3, seed=0,
                     progress=False, what="toy stage")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("toy stage: step")]
    assert [line.split(",")[0] for line in lines] == ["toy stage: step 1/3", "toy stage: step 2/3",
                                                       "toy stage: step 3/3"]
    assert all("loss " in line and "s/step" in line and "ETA" in line for line in lines)
    assert (tmp_path / "stage" / "config.json").is_file()


@pytest.mark.slow  # two processes training a stage
def test_a_stage_another_run_is_making_is_waited_for_not_trained_again(tmp_path, tok_dm, caplog):
    tok, dm = tok_dm
    path = tmp_path / "stage"
    # Another process holds the stage's lock and finishes the stage 3 s later.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time, pathlib; from mgsr.sft_stage import stage_lock\n"
        f"p = pathlib.Path({str(path)!r})\n"
        "with stage_lock(p):\n"
        "    print('locked', flush=True); time.sleep(3); p.mkdir(); (p / 'config.json').write_text('{}')\n")],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"

    def must_not_build():
        raise AssertionError("the stage was trained a second time")

    caplog.set_level(logging.INFO, logger="mgsr")
    t0 = time.perf_counter()
    assert fine_tune_cached(path, must_not_build, tok, dm, max_steps=3, lr=1e-3, seed=0, what="toy") == path
    assert time.perf_counter() - t0 > 1.0  # it waited for the lock
    assert any("made by another run" in r.getMessage() for r in caplog.records)
    assert holder.wait(timeout=30) == 0
