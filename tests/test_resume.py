"""Kill test: a run SIGKILLed mid-epoch and resumed from its last checkpoint ends exactly like an uninterrupted
run of the same seed (CPU, deterministic): the same student and DAC-KL sub-network (f_sub) weights, optimiser
and scheduler state, SCRG replay buffer, logged last-step losses, validation metrics and final evaluation."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY

MAX_STEPS = 8
# Replay on every other step (scrg.every_n_steps=2) so the buffer and its sampler RNG are exercised;
# checkpoints every 2 steps, validation every 3, one epoch = 8 batches: every kill point is mid-epoch.
RUN = [*TINY, f"trainer.max_steps={MAX_STEPS}", "checkpoint.every_n_train_steps=2", "trainer.val_check_interval=3",
       "trainer.deterministic=true", "eval.exposure_bias=false"]
# the two ways sequences are reused: the replay buffer between triggers, and rollouts made 3 batches ahead (the
# kill at step 2 leaves one of them pending in the checkpoint)
SOURCES = {"replay": ["scrg.every_n_steps=2"], "ahead": ["scrg.every_n_steps=1", "scrg.rollout_batches=3"]}


def _env() -> dict:
    # one thread per run: two runs share the 2 cores, and the thread count is the same in every run
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline",
            "PYTHONUNBUFFERED": "1"}


def _cmd(run_dir: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "train.py", *RUN, f"cache_dir={cache_dir}", f"hydra.run.dir={run_dir}", *extra]


@pytest.fixture(params=list(SOURCES))
def source(request) -> tuple[str, list[str]]:
    return request.param, SOURCES[request.param]


def _run(run_dir: Path, cache_dir: Path, *extra: str) -> str:
    out = subprocess.run(_cmd(run_dir, cache_dir, *extra), cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


def _start_and_kill(run_dir: Path, cache_dir: Path, *extra: str) -> int:
    """Start a run, SIGKILL it as soon as its first step checkpoint exists; returns that checkpoint's step."""
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    with open(run_dir.parent / "killed.log", "w") as log:
        proc = subprocess.Popen(_cmd(run_dir, cache_dir, *extra), cwd=REPO, env=_env(), stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 900
            while not ckpt.exists():  # Lightning writes checkpoints atomically (temp file + rename)
                assert proc.poll() is None, (run_dir.parent / "killed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint appeared"
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "results.json").exists()  # it really died before finishing
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])


def _last_row(run_dir: Path) -> dict:
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    train = [r for r in rows if r.get("train/loss")]
    return train[-1]


def _assert_same(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.slow  # three training subprocesses: ~40 s on an idle 2-core machine, ~100 s on a loaded one
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, cache_dir, source):
    kind, extra = source
    straight, killed = tmp_path / "straight" / "run", tmp_path / "killed" / "run"
    killed.parent.mkdir()
    _run(straight, cache_dir, *extra)  # also fills the tokenizer / teacher cache the other runs use
    step = _start_and_kill(killed, cache_dir, *extra)
    assert 0 < step < MAX_STEPS and step % 2 == 0
    if kind == "ahead":  # killed with rollouts made ahead still in stock
        pending = torch.load(killed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert len(pending["sequence_source"]["pending"]) == (3 - step % 3) % 3 > 0
    log = _run(killed, cache_dir, *extra, f"ckpt_path={killed / 'checkpoints' / 'last.ckpt'}")  # same run dir
    assert "Restored all states from the checkpoint" in log  # resumed, not restarted from step 0

    a, b = (json.loads((d / "results.json").read_text()) for d in (straight, killed))
    assert a["val"] and a["val"] == b["val"]
    scores = [{s: {k: v for k, v in m.items() if k != "tokens_per_s"} for s, m in r["eval"]["per_seed"]["test"].items()}
              for r in (a, b)]  # everything but the wall-clock throughput
    assert scores[0] == scores[1]
    assert a["scrg"] == b["scrg"]  # SCRG statistics over the whole run, not just the resumed part
    assert Path(b["checkpoint"]).parent == killed / "checkpoints"

    ca, cb = (torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
              for d in (straight, killed))
    assert ca["global_step"] == cb["global_step"] == MAX_STEPS
    assert any(k.startswith("distill.head.") for k in ca["state_dict"])  # f_sub is part of the state
    _assert_same(ca["state_dict"], cb["state_dict"], "state_dict")
    _assert_same(ca["optimizer_states"], cb["optimizer_states"], "optimizer")
    _assert_same(ca["lr_schedulers"], cb["lr_schedulers"], "lr_schedulers")
    _assert_same(ca["sequence_source"], cb["sequence_source"], "sequence_source")
    if kind == "replay":
        assert ca["sequence_source"]["counts"]["replay"] > 0  # the replay buffer was used and restored
    else:
        assert ca["sequence_source"]["counts"]["fresh"] == MAX_STEPS  # every step served a rollout made ahead
    _assert_same(ca["rng"], cb["rng"], "rng")

    last_a, last_b = _last_row(straight), _last_row(killed)
    assert last_a["step"] == last_b["step"]
    for key in ("train/loss", "train/sft", "dac/kl", "dac/coverage", "span/loss"):
        assert last_a[key] == last_b[key], key
