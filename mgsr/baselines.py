"""Where each step's distillation sequences come from, for the baselines that mix data sources.

A *schedule* decides, once per training batch, between three sources:

    "gold"    the batch's ground-truth responses, teacher-forced (the module's fallback)
    "fresh"   new student samples on the batch's prompts (then stored in the replay buffer)
    "replay"  a batch drawn from the replay buffer of earlier student samples

Schedules are plain Python objects with `state_dict` / `load_state_dict` (no Lightning, no tensors), so
they are unit-testable; `ScheduledScrgCallback` applies one and saves it, with the buffer, in checkpoints.

- GKD (constant lambda) needs no schedule: `ScrgCallback(student_prob=lambda)` already does it.
- `LinearStudentProb`: ImitKD. The probability of student data rises linearly from `start` to `end`
  over training, i.e. the probability of gold data decays (Lin et al. 2020; the linear shape is ours).
- `AdaptiveOffPolicy`: DistiLLM's adaptive off-policy approach (Ko et al. 2024, Sec. 3.2, following its
  official `finetune.py`): the probability phi of student data starts at `init` and rises by `step` (capped
  at `max_prob`) whenever the validation loss is at least `eps` above the reference loss, which is then
  reset to it; the reference starts as the validation loss before training. Each step draws u ~ U(0, 1):
  fresh student samples when u < phi * r(t) (r(t) = 1 - t/T for `replay_ratio: decreasing`) or when u < phi
  and the buffer is not yet full; a replay batch when u < phi otherwise; gold data else.
"""

from __future__ import annotations

import time

import torch

from mgsr.callbacks import ScrgCallback
from mgsr.generation import response_logits
from mgsr.losses.sft import sft_loss

SOURCES = ("gold", "fresh", "replay")


class LinearStudentProb:
    """ImitKD: P(student data) = start + (end - start) * min(t / T, 1); fresh samples on trigger steps."""

    monitor = None  # no validation feedback

    def __init__(self, start: float = 0.0, end: float = 1.0):
        for name, v in (("start", start), ("end", end)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"scrg.schedule.{name} must be in [0, 1], got {v}")
        self.start, self.end = float(start), float(end)

    def prob(self, step: int, total: int) -> float:
        frac = min(step / max(total, 1), 1.0)
        return self.start + (self.end - self.start) * frac

    def decide(self, u: float, *, step: int, total: int, buffer_len: int, capacity: int, trigger: bool) -> str:
        if u >= self.prob(step, total):
            return "gold"
        return "fresh" if trigger or buffer_len == 0 else "replay"

    def observe(self, val_loss: float) -> bool:
        return False

    def state_dict(self) -> dict:
        return {"start": self.start, "end": self.end}

    def load_state_dict(self, state: dict) -> None:
        self.start, self.end = state["start"], state["end"]


class AdaptiveOffPolicy:
    """DistiLLM's adaptive off-policy schedule (see the module docstring for the rule).

    `phi` (the current probability of student data) and `reference` (the validation loss it is compared
    with) are the state that must survive a resume.
    """

    def __init__(self, init: float = 0.0, step: float = 0.1, eps: float = 0.1, max_prob: float = 1.0,
                 replay_ratio: str = "decreasing", monitor: str = "val/sft", reference_at_start: bool = True):
        if not 0.0 <= init <= max_prob <= 1.0:
            raise ValueError(f"scrg.schedule: need 0 <= init <= max_prob <= 1, got init={init}, max_prob={max_prob}")
        if step < 0 or eps < 0:
            raise ValueError(f"scrg.schedule: step and eps must be >= 0, got step={step}, eps={eps}")
        if replay_ratio not in ("decreasing", "constant", "increasing"):
            raise ValueError(f"scrg.schedule.replay_ratio must be decreasing|constant|increasing, got {replay_ratio!r}")
        self.phi, self.step_size, self.eps, self.max_prob = float(init), float(step), float(eps), float(max_prob)
        self.replay_ratio, self.monitor, self.reference_at_start = replay_ratio, monitor, reference_at_start
        self.reference: float | None = None
        self.history: list[tuple[float, float]] = []  # (val loss, phi after it), for logs and tests

    def prob(self, step: int, total: int) -> float:
        return self.phi

    def fresh_threshold(self, step: int, total: int) -> float:
        """phi * r(t): below it a step samples fresh student data even when the buffer is full."""
        frac = min(step / max(total, 1), 1.0)
        ratio = {"decreasing": 1.0 - frac, "constant": 0.5, "increasing": frac}[self.replay_ratio]
        return self.phi * ratio

    def decide(self, u: float, *, step: int, total: int, buffer_len: int, capacity: int, trigger: bool = True) -> str:
        if u < self.fresh_threshold(step, total) or (u < self.phi and buffer_len < capacity):
            return "fresh"
        if u < self.phi:
            return "replay"
        return "gold"

    def observe(self, val_loss: float) -> bool:
        """Feed one validation loss; returns True when phi rose."""
        rose = False
        if self.reference is None:
            self.reference = val_loss
        elif val_loss >= self.reference + self.eps:
            self.phi = min(self.phi + self.step_size, self.max_prob)
            self.reference = val_loss
            rose = True
        self.history.append((float(val_loss), self.phi))
        return rose

    def state_dict(self) -> dict:
        return {"phi": self.phi, "reference": self.reference, "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.phi, self.reference = float(state["phi"]), state["reference"]
        self.history = [tuple(h) for h in state["history"]]


class ScheduledScrgCallback(ScrgCallback):
    """`ScrgCallback` whose per-step choice gold / fresh / replay comes from a schedule (ImitKD, DistiLLM).

    Fresh sequences are the module's student rollouts (with `scrg.rounds` SCRG rounds; 0 for the baselines).
    The schedule sees the monitored validation loss after each validation, and its state, the replay buffer
    and the coin-flip generator are saved in checkpoints and restored on resume.
    """

    def __init__(self, schedule, every_n_steps: int = 1, buffer_capacity: int = 256, seed: int = 0):
        super().__init__(every_n_steps=every_n_steps, buffer_capacity=buffer_capacity, student_prob=1.0, seed=seed)
        self.schedule = schedule
        self.counts = dict.fromkeys(SOURCES, 0)

    @staticmethod
    def total_steps(trainer) -> int:
        return int(trainer.max_steps) if trainer.max_steps and trainer.max_steps > 0 \
            else int(trainer.estimated_stepping_batches)

    def on_train_start(self, trainer, pl_module):
        # DistiLLM measures the validation loss once before training; a resumed run has it in its state.
        if getattr(self.schedule, "reference_at_start", False) and self.schedule.reference is None:
            loss = validation_loss(trainer, pl_module)
            if loss is not None:
                self.schedule.observe(loss)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step, total = trainer.global_step, self.total_steps(trainer)
        u = float(torch.rand((), generator=self._gen))
        source = self.schedule.decide(u, step=step, total=total, buffer_len=len(self.buffer),
                                      capacity=self.buffer.capacity, trigger=step % self.every_n_steps == 0)
        self.counts[source] += 1
        bsz = batch["input_ids"].shape[0]
        pl_module.log("sched/student_prob", self.schedule.prob(step, total), on_step=True, batch_size=bsz)
        pl_module.log("sched/fresh_steps", float(self.counts["fresh"]), on_step=True, batch_size=bsz)
        pl_module.log("sched/replay_steps", float(self.counts["replay"]), on_step=True, batch_size=bsz)
        if source == "gold":
            pl_module.distill_sequences = None
            return
        t0 = time.perf_counter()
        if source == "fresh":
            seqs = pl_module.make_student_sequences(batch)
            self.buffer.add(seqs)
            self.triggers += 1
        else:
            seqs = self.buffer.sample(bsz, pad_id=pl_module.pad_id, device=pl_module.device)
            self.replays += 1
        pl_module.distill_sequences = seqs
        pl_module.timing["scrg"] += time.perf_counter() - t0

    def on_validation_end(self, trainer, pl_module):
        monitor = getattr(self.schedule, "monitor", None)
        if trainer.sanity_checking or monitor is None:
            return
        value = trainer.callback_metrics.get(monitor)
        if value is not None:
            self.schedule.observe(float(value))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "schedule": self.schedule.state_dict(), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.schedule.load_state_dict(state["schedule"])
        self.counts = dict(state["counts"])


@torch.no_grad()
def validation_loss(trainer, pl_module) -> float | None:
    """The monitored `val/sft` before training: the module's own validation loss, batch-size weighted as
    Lightning averages it, over the batches validation would use (`limit_val_batches`)."""
    dm = getattr(trainer, "datamodule", None)
    if dm is None:
        return None
    limit = trainer.limit_val_batches
    was_training = pl_module.training
    pl_module.eval()
    total, n = 0.0, 0
    try:
        loader = dm.val_dataloader()
        max_batches = len(loader) if isinstance(limit, float) and limit >= 1.0 else \
            (int(limit * len(loader)) if isinstance(limit, float) else int(limit))
        for i, batch in enumerate(loader):
            if i >= max(max_batches, 1):
                break
            batch = {k: (v.to(pl_module.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            bsz = batch["input_ids"].shape[0]
            P = batch["prompt_len"]
            logits = response_logits(pl_module.student, batch)
            total += float(sft_loss(logits, batch["input_ids"][:, P:], batch["response_mask"][:, P:])) * bsz
            n += bsz
    finally:
        pl_module.train(was_training)
    return total / n if n else None


def build_sequence_callback(cfg, seed: int) -> ScrgCallback:
    """The callback that feeds distillation sequences: plain `ScrgCallback` (MGSR, GKD) or a scheduled one."""
    from hydra.utils import instantiate

    s = cfg.scrg
    if s.get("schedule") is None:
        return ScrgCallback(every_n_steps=s.every_n_steps, buffer_capacity=s.buffer_capacity,
                            student_prob=s.student_prob, seed=seed)
    return ScheduledScrgCallback(instantiate(s.schedule), every_n_steps=s.every_n_steps,
                                 buffer_capacity=s.buffer_capacity, seed=seed)
