"""Lightning callbacks: when SCRG revises (ScrgCallback), and run-level timing / memory figures."""

from __future__ import annotations

import time

import lightning as L
import torch

from mgsr.replay import ReplayBuffer


class ScrgCallback(L.Callback):
    """Decides when the module produces fresh distillation sequences and feeds them to each step.

    Every `every_n_steps` optimiser steps (a trigger) the module rolls out the student on the batch's prompts,
    revises them with `rounds` SCRG rounds (set on the module's ScrgConfig) and the result goes to the replay
    buffer and into this step. Other steps draw a batch from the buffer (off-policy re-use). With
    `student_prob < 1` a step uses student sequences only with that probability, gold responses otherwise
    (GKD's lambda / ImitKD-style mixing).
    """

    def __init__(self, every_n_steps: int = 1, buffer_capacity: int = 256, student_prob: float = 1.0, seed: int = 0):
        if every_n_steps <= 0:
            raise ValueError(f"scrg.every_n_steps must be >= 1, got {every_n_steps}")
        if not 0.0 <= student_prob <= 1.0:
            raise ValueError(f"student_prob must be in [0, 1], got {student_prob}")
        self.every_n_steps = every_n_steps
        self.student_prob = student_prob
        self.buffer = ReplayBuffer(buffer_capacity, seed=seed)
        self._gen = torch.Generator().manual_seed(seed + 7)  # step-level coin flips, saved with the state
        self.triggers = 0
        self.replays = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        use_student = self.student_prob >= 1.0 or bool(torch.rand((), generator=self._gen) < self.student_prob)
        if not use_student:
            pl_module.distill_sequences = None  # the module falls back to the gold batch
            return
        t0 = time.perf_counter()
        if step % self.every_n_steps == 0 or len(self.buffer) == 0:
            seqs = pl_module.make_student_sequences(batch)
            self.buffer.add(seqs)
            self.triggers += 1
        else:
            seqs = self.buffer.sample(batch["input_ids"].shape[0], pad_id=pl_module.pad_id, device=pl_module.device)
            self.replays += 1
        pl_module.distill_sequences = seqs
        pl_module.timing["scrg"] += time.perf_counter() - t0

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.state_dict(), "gen": self._gen.get_state(), "triggers": self.triggers,
                "replays": self.replays}

    def load_state_dict(self, state: dict) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self._gen.set_state(state["gen"])
        self.triggers, self.replays = state["triggers"], state["replays"]


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
