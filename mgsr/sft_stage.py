"""The cached SFT stages that run before distillation.

- the teacher's fine-tuning, when no teacher checkpoint is given (the tiny default): `arch` trained with
  SFT on the teacher's corpus (`model.teacher_sft`);
- the student's initialisation (`model.student_init`): the paper's protocol (MiniLLM, DistiLLM, GKD) starts
  every method from one SFT checkpoint of the student, so a comparison measures what each method adds to
  a fine-tuned student, not how fast it learns the task from scratch.

Each stage's output is an HF directory under `cache_dir`, named by a hash of exactly what determines the
weights (architecture, stage settings, the training data's identity, the tokenizer), and nothing else: the
run's batch size, workers or logging do not retrain it, and two stages that differ in any input never share
a directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch

from mgsr.callbacks import ProgressLog

log = logging.getLogger("mgsr")


def stable_hash(obj) -> str:
    """12 hex digits of the SHA-1 of `obj` as canonical JSON (the cache keys)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def tokenizer_digest(tokenizer) -> str:
    return stable_hash({"vocab": tokenizer.get_vocab(), "eos": tokenizer.eos_token, "pad": tokenizer.pad_token})


def fine_tune_cached(path: Path, build_model, tokenizer, datamodule, *, max_steps: int, lr: float, seed: int,
                     accelerator: str = "cpu", progress: bool = True, what: str = "model") -> Path:
    """Train `build_model()` with SFT for `max_steps` on `datamodule`'s train split and save it (with the
    tokenizer) at `path`, unless `path` already holds one. Returns `path`.

    The directory appears atomically (written beside, then renamed): a killed run never leaves half a model
    that a later run would take for a finished one."""
    from mgsr.module import DistillModule

    if (path / "config.json").is_file():
        log.info("%s: using cached %s", what, path)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with stage_lock(path):  # two runs sharing a cache (compare's parallel cells) train a stage once
        if (path / "config.json").is_file():
            log.info("%s: using cached %s (made by another run while this one waited)", what, path)
            return path
        return _fine_tune(path, build_model, tokenizer, datamodule, max_steps=max_steps, lr=lr, seed=seed,
                          accelerator=accelerator, progress=progress, what=what, module_cls=DistillModule)


@contextmanager
def stage_lock(path: Path):
    """An exclusive advisory lock beside `path` (released when the process dies, so never stale)."""
    import fcntl

    with open(path.with_name("." + path.name + ".lock"), "w") as fh:  # hidden: `teacher-*` globs see stages only
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another run to finish %s", path.name)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _fine_tune(path: Path, build_model, tokenizer, datamodule, *, max_steps, lr, seed, accelerator, progress, what,
               module_cls) -> Path:
    log.info("%s: SFT for %d steps (cached at %s)", what, max_steps, path)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # the stage's own stream: the run's RNG is not moved
        torch.manual_seed(seed)
        model = build_model()
        module = module_cls(model, tokenizer, sft_weight=1.0, distill_weight=0.0, span_weight=0.0,
                               optim={"lr": lr}, val_generate=0, seed=seed)
        trainer = L.Trainer(accelerator=accelerator, devices=1, max_steps=max_steps, max_epochs=-1, logger=False,
                            enable_checkpointing=False, gradient_clip_val=1.0, limit_val_batches=0,
                            enable_progress_bar=progress, enable_model_summary=False, callbacks=[ProgressLog(what)])
        trainer.fit(module, datamodule=datamodule)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "mgsr_stage.json").write_text(json.dumps({"what": what, "max_steps": max_steps, "lr": lr, "seed": seed,
                                                     "seconds": time.perf_counter() - t0}, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    log.info("%s: fine-tuned in %.0fs, saved to %s", what, time.perf_counter() - t0, path)
    return path
