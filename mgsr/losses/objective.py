"""The `Objective` contract: what `DistillModule` (mgsr/module.py) calls on its distillation and span objectives.

Shapes: B rows, P prompt columns, R response columns, V the vocabulary the teacher and student share (the module
cuts both logits to it), L the length of an extra language-modelling batch.

Every training step the module builds one `StepContext` per step (the teacher's and the student's logits over the
response columns of the step's distillation sequences, their mask, the sequences, the gold batch, the step) and
calls, on each objective it holds (`loss.distill`, `loss.span`):

1. `losses(ctx) -> (loss, logs)`: a scalar tensor, weighted by `loss.distill_weight` / `loss.span_weight`, and
   floats logged as `<group>/<key>` (with `<group>/loss`);
2. `after_step(ctx)`: per-step state (TAID's t), once per training micro-batch, after every objective's `losses`;
3. `extra_batch(ctx) -> LmBatch | None` and `extra_losses(lm) -> (loss, logs)`: an extra language-modelling batch
   the objective wants (MiniLLM's `pt_loss`); the module runs the student (and, if asked, the teacher) on it and
   adds the returned loss as it is (not weighted), logging `logs` under the group.

When it builds the optimiser it asks `param_groups()` for the objective's own trainable parameters (DAC-KL's f_sub).
`rollout_logprobs = True` says the student's rollouts must record their behaviour log-probs (MiniLLM's
`old_logprob`, `mix_logprob`; the module then samples with `mgsr.generation.generate_mixed`).

`check(**params)` raises a ValueError naming the config key to change; config validation calls it on the YAML's
parameters before any model loads, and a constructor calls it too: one place for each rule. Parameters a config
leaves out take the constructor's defaults (`defaults()`), so a default is written once, in the signature.

A new objective subclasses `Objective`, sets `group`, implements `losses` (and what hooks it needs), and is named
by a YAML under conf/loss/distill/ (`_target_: <module>.<Class>` plus its parameters): tests/test_objective_contract.py
does exactly that in a copy of the tree.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class StepContext:
    """What an objective sees at one training step.

    teacher_logits  [B, R, V]  the teacher's logits at the response columns (column t predicts response token t),
                               computed without gradients
    student_logits  [B, R, V]  the student's, with gradients
    mask            [B, R]     bool, the real response tokens
    response_ids    [B, R]     the response tokens (columns P: of `seqs["input_ids"]`)
    seqs            the step's distillation sequences in the canonical layout (`input_ids`, `attention_mask`,
                    `response_mask` [B, P + R], `prompt_len` P; rollouts also carry `RESPONSE_EXTRAS` such as
                    `old_logprob`, `mix_logprob` [B, >= R] aligned with the response columns); the gold batch
                    itself when the step distils on it
    batch           the step's gold batch (same layout, plus `prompt_ids`, `references`, ...)
    step            the optimiser step (Lightning's `global_step`)
    tokenizer       the run's tokenizer (span priors, LM text)
    trainer         the Lightning Trainer when there is one (`total_steps`, `accumulate` read it)
    """

    teacher_logits: torch.Tensor
    student_logits: torch.Tensor
    mask: torch.Tensor
    response_ids: torch.Tensor
    seqs: dict
    batch: dict
    step: int = 0
    tokenizer: Any = None
    trainer: Any = field(default=None, repr=False)

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole run (Lightning's estimate); 1 without a Trainer."""
        return int(self.trainer.estimated_stepping_batches) if self.trainer is not None else 1

    @property
    def accumulate(self) -> int:
        """Micro-batches per optimiser step (gradient accumulation); 1 without a Trainer."""
        return self.trainer.accumulate_grad_batches if self.trainer is not None else 1


@dataclass
class LmBatch:
    """An extra language-modelling batch an objective asks for: `input_ids`, `attention_mask` [B, L] (right-padded,
    on the step's device); `with_teacher`: the module also runs the teacher on it."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    with_teacher: bool = False


@dataclass
class LmContext:
    """The extra batch, run: logits at column t predict token t + 1 of the text.

    student_logits  [B, L - 1, V']  (V' = V, the shared vocabulary, when the teacher ran; else the student's own)
    teacher_logits  [B, L - 1, V] | None (no gradients)
    targets         [B, L - 1]      the next tokens
    mask            [B, L - 1]      bool, where both the token and its target are real text
    """

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor | None
    targets: torch.Tensor
    mask: torch.Tensor


class Objective(nn.Module):
    """Base class of the distillation and span objectives (see the module docstring for the contract)."""

    group: str = ""  # the metric group its logs go under (e.g. "dac" -> dac/loss, dac/kl, ...)
    rollout_logprobs: bool = False  # rollouts must record their behaviour log-probs (MiniLLM)

    @classmethod
    def defaults(cls) -> dict:
        """The constructor's keyword defaults: the one place a default is written."""
        return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}

    @classmethod
    def check(cls, **params) -> None:
        """ValueError naming the config key to change; `params` not given take `defaults()`. Nothing to check here."""

    def losses(self, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        """(scalar loss, {name: float}) for this step. A token-level objective's `forward(teacher_logits,
        student_logits, mask)` is called by default."""
        return self(ctx.teacher_logits, ctx.student_logits, ctx.mask)

    def after_step(self, ctx: StepContext) -> None:
        """Per-step state: called once per training micro-batch, after `losses`."""

    def extra_batch(self, ctx: StepContext) -> LmBatch | None:
        """An extra language-modelling batch for this step (None: none)."""
        return None

    def extra_losses(self, lm: LmContext) -> tuple[torch.Tensor, dict]:
        """(loss, logs) on the extra batch; the module adds the loss to the step's total as it is."""
        raise NotImplementedError(f"{type(self).__name__} asked for an extra batch but has no extra_losses")

    def param_groups(self) -> list[dict]:
        """Optimiser groups for the objective's own trainable parameters: `params`, `weight_decay`, and `lr` when it
        has its own (without one, the recipe's `optim.head_lr`, else `optim.lr`)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": 0.0}] if params else []
