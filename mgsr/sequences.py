"""Where each training step's distillation sequences come from: one object the module calls in `training_step`.

Per step a *schedule* picks one source:

    "gold"    the batch's ground-truth responses, teacher-forced (the module re-uses its SFT forward)
    "fresh"   new student rollouts on the batch's prompts, revised by `scrg.rounds` SCRG rounds (0: as sampled);
              they also go into the replay buffer
    "replay"  a batch drawn from the replay buffer of earlier fresh rollouts (off-policy re-use)

Teacher samples (SeqKD) are not a per-step source: they replace the gold responses once, in the datamodule
(mgsr/seqkd.py). Every method's schedule is a configuration of this one object (conf/scrg/, conf/experiment/):

- `EveryNSteps` (MGSR, SCRG every n, GKD): fresh rollouts on every n-th step, replay between; with
  `student_prob < 1` a step uses student data only with that probability, gold otherwise (GKD's lambda).
- `LinearStudentProb` (ImitKD): P(student data) rises linearly from `start` to `end` over training (the
  probability of gold data decays; Lin et al. 2020, the linear shape is ours).
- `AdaptiveOffPolicy` (DistiLLM, Ko et al. 2024 Sec. 3.2, following its official `finetune.py`): phi starts at
  `init` and rises by `step` (capped at `max_prob`) whenever the validation loss is at least `eps` above the
  reference loss, which is then reset to it; the reference starts as the validation loss before training. Each
  step draws u ~ U(0, 1): fresh when u < phi * r(t) (r(t) = 1 - t/T for `replay_ratio: decreasing`) or when
  u < phi and the buffer is not yet full; replay when u < phi otherwise; gold else.

Rollouts ahead (`scrg.rollout_batches = k`): a fresh request with no pending rollouts generates, in ONE decode
call over k x batch prompts, the rollouts (and their SCRG revision) of this batch's prompts and of k - 1 more batches
of training prompts drawn by the source's own seeded stream; the later requests are served from that stock. Decode
cost is paid once per k batches (fixed per-call overhead, better batching on a GPU); the price is staleness: a
served rollout was made by the policy of up to k - 1 fresh requests earlier (`seq/staleness`, in optimiser steps,
is logged). k = 1 is plain on-policy generation on the batch's prompts.

Schedules and the source are plain objects with `state_dict` / `load_state_dict` (no Lightning); the module saves
the source's state (buffer, coin-flip generator, schedule, counts) in its checkpoints, so a resume is exact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mgsr.data.collate import pad_rows
from mgsr.generation import RESPONSE_EXTRAS
from mgsr.replay import ReplayBuffer

SOURCES = ("gold", "fresh", "replay")
COIN_SEED_OFFSET = 7  # the coin-flip generator's seed is the run's + 7: a stream apart from the replay buffer's
PROMPT_SEED_OFFSET = 11  # the stream that draws the extra prompts of rollouts made ahead


class EveryNSteps:
    """Fresh rollouts on trigger steps (every `every_n_steps`, or while the buffer is empty), replay between; with
    `student_prob < 1`, gold data on a step with probability 1 - student_prob (a coin is drawn only then)."""

    monitor = None        # no validation feedback
    logs_schedule = False  # nothing varies over training: no sched/* metrics

    def __init__(self, student_prob: float = 1.0):
        if not 0.0 <= student_prob <= 1.0:
            raise ValueError(f"scrg.student_prob must be in [0, 1], got {student_prob}")
        self.student_prob = float(student_prob)

    def prob(self, step: int, total: int) -> float:
        return self.student_prob

    def decide(self, draw: Callable[[], float], *, step: int, total: int, buffer_len: int, capacity: int,
               trigger: bool) -> str:
        if self.student_prob < 1.0 and draw() >= self.student_prob:
            return "gold"
        return "fresh" if trigger or buffer_len == 0 else "replay"

    def observe(self, val_loss: float) -> bool:
        return False

    def state_dict(self) -> dict:
        return {"student_prob": self.student_prob}

    def load_state_dict(self, state: dict) -> None:
        self.student_prob = float(state["student_prob"])


class LinearStudentProb:
    """ImitKD: P(student data) = start + (end - start) * min(t / T, 1); fresh samples on trigger steps."""

    monitor = None
    logs_schedule = True

    def __init__(self, start: float = 0.0, end: float = 1.0):
        for name, v in (("start", start), ("end", end)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"scrg.schedule.{name} must be in [0, 1], got {v}")
        self.start, self.end = float(start), float(end)

    def prob(self, step: int, total: int) -> float:
        frac = min(step / max(total, 1), 1.0)
        return self.start + (self.end - self.start) * frac

    def decide(self, draw: Callable[[], float], *, step: int, total: int, buffer_len: int, capacity: int,
               trigger: bool) -> str:
        if draw() >= self.prob(step, total):
            return "gold"
        return "fresh" if trigger or buffer_len == 0 else "replay"

    def observe(self, val_loss: float) -> bool:
        return False

    def state_dict(self) -> dict:
        return {"start": self.start, "end": self.end}

    def load_state_dict(self, state: dict) -> None:
        self.start, self.end = state["start"], state["end"]


class AdaptiveOffPolicy:
    """DistiLLM's adaptive off-policy schedule (rule in the module docstring). `phi` (the current probability of
    student data) and `reference` (the validation loss it is compared with) must survive a resume."""

    logs_schedule = True

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

    def decide(self, draw: Callable[[], float], *, step: int, total: int, buffer_len: int, capacity: int,
               trigger: bool = True) -> str:
        u = draw()
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


class SequenceSource:
    """Serves each training step its distillation sequences (None = the gold batch) by the schedule's choice.

    `rollout(batch)` makes fresh sequences (the module's student rollouts + SCRG revision). The coin flips come
    from the source's own generator, the replay draws from the buffer's, so neither moves the training stream.
    """

    def __init__(self, schedule=None, *, every_n_steps: int = 1, buffer_capacity: int = 256, seed: int = 0,
                 rollout_batches: int = 1, prompts: list | None = None, reuse_rollouts: int = 1):
        if reuse_rollouts <= 0:
            raise ValueError(f"scrg.reuse_rollouts must be >= 1, got {reuse_rollouts}")
        if every_n_steps <= 0:
            raise ValueError(f"scrg.every_n_steps must be >= 1, got {every_n_steps}")
        if rollout_batches <= 0:
            raise ValueError(f"scrg.rollout_batches must be >= 1, got {rollout_batches}")
        if rollout_batches > 1 and not prompts:
            raise ValueError("scrg.rollout_batches > 1 needs the training prompts to draw the extra batches from")
        self.schedule = schedule if schedule is not None else EveryNSteps()
        self.every_n_steps = every_n_steps
        self.buffer = ReplayBuffer(buffer_capacity, seed=seed)
        self._gen = torch.Generator().manual_seed(seed + COIN_SEED_OFFSET)
        self.counts = dict.fromkeys(SOURCES, 0)
        self.rollout_batches = rollout_batches
        self.prompts = prompts  # training prompt ids (lists or 1-d tensors): the pool of the k - 1 extra batches
        self._prompt_gen = torch.Generator().manual_seed(seed + PROMPT_SEED_OFFSET)
        self.pending: list[dict] = []  # rollouts made ahead, CPU tensors, oldest first; each has "made_at"
        self.last_staleness = 0
        self.reuse_rollouts = reuse_rollouts
        self.reused: dict | None = None  # the fresh rollout being served again (CPU tensors)
        self.reuse_left = 0  # further fresh requests it answers

    @property
    def wants_reference(self) -> bool:
        """True when the schedule needs the validation loss before training (DistiLLM) and has none yet."""
        return bool(getattr(self.schedule, "reference_at_start", False)) and self.schedule.reference is None

    def choose(self, step: int, total: int) -> str:
        source = self.schedule.decide(lambda: float(torch.rand((), generator=self._gen)), step=step, total=total,
                                      buffer_len=len(self.buffer), capacity=self.buffer.capacity,
                                      trigger=step % self.every_n_steps == 0)
        self.counts[source] += 1
        return source

    def next(self, batch: dict, *, step: int, total: int, rollout: Callable[[dict], dict], pad_id: int,
             device=None) -> tuple[str, dict | None]:
        """(source, sequences) for this step; sequences is None for "gold"."""
        source = self.choose(step, total)
        if source == "gold":
            return source, None
        if source == "fresh":
            if self.reuse_left > 0 and self.reused is not None:  # an inner epoch over the same rollout
                self.reuse_left -= 1
                return source, _to_device(self.reused, device)
            seqs = self._fresh(batch, step, rollout, pad_id, device) if self.rollout_batches > 1 else rollout(batch)
            self.buffer.add(seqs)
            if self.reuse_rollouts > 1:
                self.reused = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in seqs.items()}
                self.reuse_left = self.reuse_rollouts - 1
            return source, seqs
        return source, self.buffer.sample(batch["input_ids"].shape[0], pad_id=pad_id, device=device)

    def _fresh(self, batch: dict, step: int, rollout, pad_id: int, device) -> dict:
        """The next rollout from the stock made ahead; an empty stock is refilled with one decode call over this
        batch's prompts and k - 1 batches of drawn training prompts (served in that order)."""
        if not self.pending:
            bsz = batch["prompt_ids"].shape[0]
            own = [row[mask.bool()].cpu() for row, mask in zip(batch["prompt_ids"], batch["prompt_attention_mask"])]
            idx = torch.randint(len(self.prompts), ((self.rollout_batches - 1) * bsz,), generator=self._prompt_gen)
            extra = [torch.as_tensor(self.prompts[i], dtype=torch.long) for i in idx.tolist()]
            empty = torch.empty(0, dtype=torch.long)
            prompts = pad_rows([(p, empty) for p in own + extra], pad_id=pad_id)  # the prompt columns are used
            ids, mask = prompts["prompt_ids"], prompts["prompt_attention_mask"]
            dev = batch["prompt_ids"].device
            seqs = rollout({"prompt_ids": ids.to(dev), "prompt_attention_mask": mask.to(dev), "input_ids": ids})
            self.pending = [dict(_rows(seqs, slice(i, i + bsz)), made_at=step) for i in range(0, ids.shape[0], bsz)]
        out = self.pending.pop(0)
        self.last_staleness = step - out.pop("made_at")
        return _to_device(out, device)

    def schedule_logs(self, step: int, total: int) -> dict[str, float]:
        logs = {"seq/staleness": float(self.last_staleness)} if self.rollout_batches > 1 else {}
        if not getattr(self.schedule, "logs_schedule", False):
            return logs
        return logs | {"sched/student_prob": self.schedule.prob(step, total), "sched/fresh_steps": float(self.counts["fresh"]),
                "sched/replay_steps": float(self.counts["replay"])}

    def observe(self, metrics) -> None:
        """After a validation: feed the schedule its monitored value (DistiLLM's val/sft), if it has one."""
        monitor = getattr(self.schedule, "monitor", None)
        value = metrics.get(monitor) if monitor is not None else None
        if value is not None:
            self.schedule.observe(float(value))

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.state_dict(), "gen": self._gen.get_state(), "counts": dict(self.counts),
                "schedule": self.schedule.state_dict(), "pending": [dict(p) for p in self.pending],
                "prompt_gen": self._prompt_gen.get_state(), "last_staleness": self.last_staleness,
                "reused": dict(self.reused) if self.reused is not None else None, "reuse_left": self.reuse_left}

    def load_state_dict(self, state: dict) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self._gen.set_state(state["gen"])
        self.counts = dict(state["counts"])
        if "schedule" in state:
            self.schedule.load_state_dict(state["schedule"])
        self.pending = [dict(p) for p in state.get("pending", [])]
        if "prompt_gen" in state:
            self._prompt_gen.set_state(state["prompt_gen"])
        self.last_staleness = int(state.get("last_staleness", 0))
        self.reused = dict(state["reused"]) if state.get("reused") is not None else None
        self.reuse_left = int(state.get("reuse_left", 0))


def _to_device(seqs: dict, device) -> dict:
    return seqs if device is None else {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in seqs.items()}


def _rows(seqs: dict, rows: slice) -> dict:
    """Rows of a canonical-layout batch, on the CPU, without the response columns that none of them uses."""
    P = seqs["prompt_len"]
    width = P + max(int(seqs["response_mask"][rows, P:].sum(-1).max()), 1)
    out = {k: v[rows, :width].cpu() for k, v in seqs.items() if k in ("input_ids", "attention_mask", "response_mask")}
    out |= {k: seqs[k][rows, :width - P].cpu() for k in RESPONSE_EXTRAS if k in seqs}
    return out | {"prompt_len": P, "prompt_ids": out["input_ids"][:, :P], "prompt_attention_mask": out["attention_mask"][:, :P]}


def build_sequence_source(scrg, seed: int, *, instantiate=None, prompts=None) -> SequenceSource:
    """The source a run's `scrg` config describes: `scrg.schedule` (a `_target_` node, built with `instantiate`)
    or, without one, `EveryNSteps(scrg.student_prob)`; `prompts`: the training prompts (for rollouts made ahead)."""
    schedule = instantiate(scrg.schedule) if scrg.get("schedule") is not None else \
        EveryNSteps(float(scrg.get("student_prob", 1.0)))
    return SequenceSource(schedule, every_n_steps=int(scrg.every_n_steps), buffer_capacity=int(scrg.buffer_capacity),
                          seed=seed, rollout_batches=int(scrg.get("rollout_batches", 1)), prompts=prompts,
                          reuse_rollouts=int(scrg.get("reuse_rollouts", 1)))
