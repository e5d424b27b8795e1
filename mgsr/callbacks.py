"""Lightning callbacks: run-level timing / memory figures (where sequences come from: mgsr/sequences.py)."""

from __future__ import annotations

import time

import lightning as L
import torch


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
