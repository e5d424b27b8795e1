"""Learning-rate schedules: a function `(optimizer, total_steps) -> scheduler` stepped once per optimiser step.

The recipe chooses a run's schedule (mgsr/build/module.py passes `warmup_cosine` with `optim.warmup_steps` and
`optim.min_lr`); `DistillModule` only calls what it is given. A module built outside the recipe (the cached SFT
stages, tests, benchmarks) gets `warmup_cosine` with its `optim` settings.
"""

from __future__ import annotations

import math

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, *, warmup_steps: int = 0,
                  min_lr: float = 1e-7) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_steps`, then cosine decay from each group's own lr to `min_lr` at `total_steps`
    (DistiLLM's schedule). Each parameter group keeps its own base lr (DAC-KL's f_sub group may differ)."""
    total = max(int(total_steps), 1)
    warm, floor = int(warmup_steps), float(min_lr)

    def schedule(step, base):
        if step < warm:
            return (step + 1) / warm
        t = min((step - warm) / max(total - warm, 1), 1.0)
        return (floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * t))) / base

    def group_lambda(base):  # bind each group's own base lr
        return lambda step: schedule(step, base)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [group_lambda(g["lr"]) for g in optimizer.param_groups])
