"""Lightning callbacks: run-level timing / memory figures, progress lines for non-interactive logs (where
sequences come from: mgsr/sequences.py)."""

from __future__ import annotations

import logging
import time

import lightning as L
import torch

log = logging.getLogger("mgsr")


class CostCallback(L.Callback):
    """Training-efficiency figures for reports: s/step, tokens/s, peak memory, share of time in SCRG."""

    def __init__(self):
        self.t_start = None
        self.steps = 0
        self.tokens = 0

    def on_train_start(self, trainer, pl_module):
        self.t_start = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps += 1
        self.tokens += int(batch["attention_mask"].sum())

    def summary(self, pl_module) -> dict:
        if self.t_start is None or self.steps == 0:
            return {}
        wall = time.perf_counter() - self.t_start
        out = {"s_per_step": wall / self.steps, "train_tokens_per_s": self.tokens / wall,
               "scrg_time_share": pl_module.timing["scrg"] / wall}
        out["peak_mem_mb"] = peak_memory_mb()
        return out


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


PROGRESS_EVERY_S = 60.0  # at least one line a minute in a non-interactive log


class ProgressLog(L.Callback):
    """One log line per `every_s` seconds of training (and at the first step): step, loss, s/step, ETA. A cached
    stage runs for minutes with no other output in a non-interactive log; this says it is alive and when it ends."""

    def __init__(self, what: str, every_s: float | None = None):
        self.what, self.every_s = what, PROGRESS_EVERY_S if every_s is None else every_s
        self.t0 = self.last = None

    def on_train_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()
        self.last = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if self.last is not None and now - self.last < self.every_s:
            return
        self.last = now
        step, total = trainer.global_step, trainer.max_steps
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        per_step = (now - self.t0) / max(step, 1)
        log.info("%s: step %d/%d, loss %.4f, %.2f s/step, ETA %s", self.what, step, total,
                 float(loss) if loss is not None else float("nan"), per_step,
                 time.strftime("%M:%S", time.gmtime(per_step * max(total - step, 0))) if total > 0 else "?")
