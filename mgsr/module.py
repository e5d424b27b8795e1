"""DistillModule: wires a frozen teacher, a student and the objectives. No math of its own.

    L = w_sft * L_SFT(gold) + w_distill * L_distill(distillation sequences) + w_span * L_span(same) [+ extra terms]

Each step asks its `SequenceSource` (mgsr/sequences.py) for the distillation sequences: SCRG-revised student
rollouts, a replay batch, or None for the gold batch; without a source (KD) they are always the gold batch. The
distillation and span objectives are `Objective`s (mgsr/losses/objective.py): the module runs teacher and student on
the sequences, hands each objective one `StepContext`, and calls its hooks (per-step state, an extra LM batch,
parameter groups) the same way whatever the objective is. The learning-rate schedule is the recipe's (`lr_schedule`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from functools import partial

import lightning as L
import torch

from mgsr.evaluation.metrics import rouge_l_per_example
from mgsr.generation import (
    SamplingConfig,
    generate,
    generate_mixed,
    position_ids,
    response_logits,
)
from mgsr.losses.divergences import align_vocab
from mgsr.losses.objective import LmBatch, LmContext, Objective, StepContext
from mgsr.losses.sft import sft_loss
from mgsr.lr_schedule import warmup_cosine
from mgsr.models import shared_vocab_size
from mgsr.rng import DeviceGenerators, StepRngStream
from mgsr.scrg import RevisionStats, ScrgConfig, rollout_and_revise
from mgsr.sharding import gathered_for_generation


def _batch_to(seqs: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in seqs.items()}


# The optimiser settings conf/train.yaml's `optim` gives a run; here for a module built without Hydra (tests, bench).
DEFAULT_OPTIM = {"lr": 5e-4, "weight_decay": 0.01, "betas": (0.9, 0.999), "warmup_steps": 0, "min_lr": 1e-7,
                 "head_lr": None}
VAL_SEED_STRIDE = 1000  # validation batch i of a run with seed s samples with seed s * 1000 + i: fixed per batch


class DistillModule(L.LightningModule):
    def __init__(self, student, tokenizer, *, teacher=None, sft_weight: float = 1.0, distill=None,
                 distill_weight: float = 1.0, span=None, span_weight: float = 1.0, scrg: ScrgConfig | None = None,
                 train_sampling: SamplingConfig | None = None, val_sampling: SamplingConfig | None = None,
                 optim: dict | None = None, val_generate: int = 64, seed: int = 0, sequences=None,
                 rollout_engine=None, lr_schedule=None):
        """`distill`, `span`: `Objective`s (mgsr/objectives.py); `optim`: AdamW settings (DEFAULT_OPTIM's keys);
        `lr_schedule`: `(optimizer, total_steps) -> scheduler`, stepped every optimiser step (None: `warmup_cosine`
        with `optim`'s warmup_steps and min_lr, what the recipe passes too); `rollout_engine`: `student -> engine`
        for student rollouts (mgsr/rollout_vllm.py; None: the HF student samples)."""
        super().__init__()
        self.student, self.teacher, self.tokenizer = student, teacher, tokenizer
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            self.vocab = shared_vocab_size(tokenizer, teacher, student)
        self.sft_weight, self.distill_weight, self.span_weight = sft_weight, distill_weight, span_weight
        self.distill = distill if distill_weight > 0 else None
        self.span = span if span_weight > 0 else None
        if (self.distill is not None or self.span is not None) and teacher is None:
            raise ValueError("distillation losses need a teacher: set model.teacher or use loss=sft")
        self.scrg = scrg or ScrgConfig()
        self.train_sampling = train_sampling or SamplingConfig()
        self.val_sampling = val_sampling or SamplingConfig()
        self.optim = {**DEFAULT_OPTIM, **(optim or {})}
        self.lr_schedule = lr_schedule or partial(warmup_cosine, warmup_steps=self.optim["warmup_steps"],
                                                  min_lr=self.optim["min_lr"])
        self.val_generate, self.seed = val_generate, seed
        self.pad_id, self.eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        self.sequences = sequences  # SequenceSource | None (the gold batch every step)
        # student -> engine for rollouts and SCRG re-generation (mgsr/rollout_vllm.py), built at the first rollout;
        # None: the HF student samples
        self.rollout_engine_factory, self._rollout_engine = rollout_engine, None
        self.timing = defaultdict(float)
        self.sample_gens = DeviceGenerators(seed)  # rollouts / SCRG sampling, one generator per device
        self.train_rng = StepRngStream()  # what the training steps draw (dropout): see StepRngStream
        self._val_scores: list[float] = []
        self.scrg_history = defaultdict(list)  # per-revision SCRG summaries, averaged into results.json
        self.dac_history = defaultdict(list)  # per-step DAC-KL figures (kept classes, l, u, coverage), likewise

    # -- keep the teacher frozen whatever Lightning does to the train/eval mode ----------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    @property
    def sample_gen(self) -> torch.Generator:
        """The sampling generator of the device the module is on now."""
        return self.sample_gens.get(self.device)

    # -- distillation sequences -----------------------------------------------------------------------------
    @torch.no_grad()
    def make_student_sequences(self, batch: dict) -> dict:
        """Student rollouts on the batch's prompts, revised by `scrg.rounds` SCRG rounds."""
        was_training = self.student.training
        self.student.eval()
        stats = RevisionStats()
        try:
            with gathered_for_generation(self):  # FSDP / ZeRO-3: outside forward, parameters are sharded
                if self.scrg.sampler == "teacher_mix" or any(o.rollout_logprobs for o in self.objectives):
                    # MiniLLM: tokens from mix p + (1 - mix) q with the behaviour log-probs (mix 0: the student)
                    mix = float(self.scrg.mix) if self.scrg.sampler == "teacher_mix" else 0.0
                    return generate_mixed(self.teacher, self.student, batch["prompt_ids"],
                                          batch["prompt_attention_mask"], self.train_sampling, mix=mix,
                                          eos_id=self.eos_id, pad_id=self.pad_id, generator=self.sample_gen,
                                          vocab=self.vocab)
                seqs = rollout_and_revise(
                    self.teacher, self.student, batch["prompt_ids"], batch["prompt_attention_mask"], self.scrg,
                    self.train_sampling, eos_id=self.eos_id, pad_id=self.pad_id, generator=self.sample_gen,
                    stats=stats, engine=self.rollout_engine(),
                )
        finally:
            self.student.train(was_training)
        for k, v in stats.summary().items():
            self.log(f"scrg/{k}", v, on_step=True, batch_size=batch["input_ids"].shape[0])
            self.scrg_history[k].append(v)
        return seqs

    def rollout_engine(self):
        """The rollout engine holding this step's student weights (pushed once per optimiser step); None: HF."""
        if self.rollout_engine_factory is None:
            return None
        if self._rollout_engine is None:
            self._rollout_engine = self.rollout_engine_factory(self.student)
        self._rollout_engine.sync(self.student, version=self.global_step)
        return self._rollout_engine

    def distillation_sequences(self, batch: dict) -> dict | None:
        """This step's sequences from the source (None: the gold batch)."""
        if self.sequences is None:
            return None
        step, total = self.global_step, self.total_steps()
        t0 = time.perf_counter()
        source, seqs = self.sequences.next(batch, step=step, total=total, rollout=self.make_student_sequences,
                                           pad_id=self.pad_id, device=self.device)
        logs = self.sequences.schedule_logs(step, total)
        if logs:
            self.log_dict(logs, on_step=True, batch_size=batch["input_ids"].shape[0])
        if source != "gold":
            self.timing["scrg"] += time.perf_counter() - t0
        return seqs

    def total_steps(self) -> int:
        t = self.trainer
        return int(t.max_steps) if t.max_steps and t.max_steps > 0 else int(t.estimated_stepping_batches)

    # -- training -------------------------------------------------------------------------------------------
    @property
    def objectives(self) -> list[Objective]:
        """The objectives in use, in the order their terms are added: distillation, then span."""
        return [o for o in (self.distill, self.span) if o is not None]

    def step_context(self, seqs: dict, batch: dict, student_logits=None) -> StepContext:
        """Teacher and student on the response columns of `seqs` (`student_logits`: the student's, when the caller
        has them already), cut to the shared vocabulary, with what else an objective may read."""
        P = seqs["prompt_len"]
        mask = seqs["response_mask"][:, P:]
        with torch.no_grad():
            t_logits = response_logits(self.teacher, seqs)
        s_logits = response_logits(self.student, seqs) if student_logits is None else student_logits
        t_logits, s_logits = align_vocab(t_logits, s_logits, self.vocab)
        return StepContext(teacher_logits=t_logits, student_logits=s_logits, mask=mask,
                           response_ids=seqs["input_ids"][:, P:], seqs=seqs, batch=batch, step=self.global_step,
                           tokenizer=self.tokenizer, trainer=self._trainer)

    def objective_terms(self, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        """w_distill * L_distill + w_span * L_span on one context, and their logs (`<group>/loss`, `<group>/<key>`)."""
        total, logs = ctx.student_logits.new_zeros(()).float(), {}
        for objective, weight in ((self.distill, self.distill_weight), (self.span, self.span_weight)):
            if objective is None:
                continue
            loss, parts = objective.losses(ctx)
            total = total + weight * loss
            logs[f"{objective.group}/loss"] = float(loss.detach())
            logs.update({f"{objective.group}/{k}": v for k, v in parts.items()})
            if objective is self.distill and objective.group == "dac" and self.training:
                for k, v in parts.items():
                    self.dac_history[k].append(v)
        return total, logs

    def _distill_terms(self, seqs: dict, student_logits=None) -> tuple[torch.Tensor, dict]:
        """`objective_terms` on `seqs` taken as the step's gold batch too."""
        return self.objective_terms(self.step_context(seqs, seqs, student_logits))

    def extra_terms(self, objective: Objective, lm: LmBatch) -> tuple[torch.Tensor, dict]:
        """The student (and the teacher, if asked) on an objective's extra LM batch, then its `extra_losses`."""
        ids, attn = lm.input_ids, lm.attention_mask.long()
        kw = dict(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn))
        s_logits = self.student(**kw).logits[:, :-1]
        t_logits = None
        if lm.with_teacher:
            with torch.no_grad():
                t_logits = self.teacher(**kw).logits[:, :-1]
            t_logits, s_logits = align_vocab(t_logits, s_logits, self.vocab)
        mask = attn[:, 1:].bool() & attn[:, :-1].bool()
        return objective.extra_losses(LmContext(s_logits, t_logits, ids[:, 1:], mask))

    def training_step(self, batch, batch_idx):
        bsz = batch["input_ids"].shape[0]
        P = batch["prompt_len"]
        total, logs = 0.0, {}
        gold_logits = None
        if self.sft_weight > 0:
            gold_logits = response_logits(self.student, batch)
            l_sft = sft_loss(gold_logits, batch["input_ids"][:, P:], batch["response_mask"][:, P:])
            total = total + self.sft_weight * l_sft
            logs["train/sft"] = float(l_sft.detach())
        if self.objectives:
            seqs = self.distillation_sequences(batch)
            if seqs is None:  # teacher-forced on the gold response: re-use the student forward above
                seqs = batch
            else:
                gold_logits = None
                seqs = _batch_to(seqs, self.device)
            ctx = self.step_context(seqs, batch, gold_logits if seqs is batch else None)
            l_distill, parts = self.objective_terms(ctx)
            total = total + l_distill
            for objective in self.objectives:  # per-step state (TAID's t): once per micro-batch
                objective.after_step(ctx)
            logs.update(parts)
            for objective in self.objectives:  # an extra LM batch (MiniLLM's language-modelling loss)
                lm = objective.extra_batch(ctx)
                if lm is not None:
                    l_extra, extra_logs = self.extra_terms(objective, lm)
                    total = total + l_extra
                    logs.update({f"{objective.group}/{k}": v for k, v in extra_logs.items()})
            logs["train/distill_tokens"] = float(seqs["response_mask"].sum()) / bsz
        self.log("train/loss", total, prog_bar=True, on_step=True, batch_size=bsz)
        self.log_dict(logs, on_step=True, batch_size=bsz)
        return total

    # -- validation: teacher-forced loss + sampled ROUGE-L on the first `val_generate` prompts --------------
    def validation_step(self, batch, batch_idx):
        P, bsz = batch["prompt_len"], batch["input_ids"].shape[0]
        logits = response_logits(self.student, batch)
        self.log("val/sft", sft_loss(logits, batch["input_ids"][:, P:], batch["response_mask"][:, P:]),
                 batch_size=bsz, sync_dist=True)
        seen = batch_idx * bsz
        if seen < self.val_generate:
            n = min(bsz, self.val_generate - seen)
            gen = torch.Generator(self.device).manual_seed(self.seed * VAL_SEED_STRIDE + batch_idx)
            out = generate(self.student, batch["prompt_ids"][:n], batch["prompt_attention_mask"][:n],
                           self.val_sampling, eos_id=self.eos_id, pad_id=self.pad_id, generator=gen)
            texts = self.decode_responses(out)
            self._val_scores.extend(rouge_l_per_example(texts, batch["references"][:n]))

    def on_validation_epoch_end(self):
        if self._val_scores:
            score = torch.tensor(sum(self._val_scores) / len(self._val_scores), device=self.device)
            self.log("val/rougeL", score, prog_bar=True, sync_dist=True)
        self._val_scores = []

    def decode_responses(self, seqs: dict) -> list[str]:
        P = seqs["prompt_len"]
        ids = seqs["input_ids"][:, P:].masked_fill(~seqs["response_mask"][:, P:], self.pad_id)
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    # -- optimisation ----------------------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """The student's matrices (weight decay) and other parameters (none), then each objective's own groups (an
        objective's group without its own `lr` takes `optim.head_lr`, else `optim.lr`)."""
        o = self.optim
        decay = [p for n, p in self.student.named_parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for n, p in self.student.named_parameters() if p.requires_grad and p.ndim < 2]
        groups = [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
        for objective in self.objectives:
            groups.extend({**g, "lr": g.get("lr") or o["head_lr"] or o["lr"]} for g in objective.param_groups())
        return groups

    def configure_optimizers(self):
        o = self.optim
        opt = torch.optim.AdamW(self.param_groups(), lr=o["lr"], betas=tuple(o["betas"]), foreach=True)
        sched = self.lr_schedule(opt, max(int(self.trainer.estimated_stepping_batches), 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- the sequence source's schedule hears the validation loss (DistiLLM), also once before training -------
    def on_train_start(self):
        if self.sequences is not None and self.sequences.wants_reference:
            loss = self.validation_loss()
            if loss is not None:
                self.sequences.schedule.observe(loss)

    def on_validation_end(self):
        if self.sequences is not None and not self.trainer.sanity_checking:
            self.sequences.observe(self.trainer.callback_metrics)

    @torch.no_grad()
    def validation_loss(self) -> float | None:
        """`val/sft` as validation would log it (batch-size weighted, over `limit_val_batches`), computed now."""
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            return None
        limit = self.trainer.limit_val_batches
        was_training = self.training
        self.eval()
        total, n = 0.0, 0
        try:
            loader = dm.val_dataloader()
            max_batches = len(loader) if isinstance(limit, float) and limit >= 1.0 else \
                (int(limit * len(loader)) if isinstance(limit, float) else int(limit))
            for i, batch in enumerate(loader):
                if i >= max(max_batches, 1):
                    break
                batch = _batch_to(batch, self.device)
                bsz, P = batch["input_ids"].shape[0], batch["prompt_len"]
                logits = response_logits(self.student, batch)
                total += float(sft_loss(logits, batch["input_ids"][:, P:], batch["response_mask"][:, P:])) * bsz
                n += bsz
        finally:
            self.train(was_training)
        return total / n if n else None

    # -- the training steps draw from their own stream (StepRngStream), so resuming from a step checkpoint is exact
    def on_train_batch_start(self, batch, batch_idx):
        self.train_rng.enter()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.train_rng.exit()

    # -- checkpoints: no teacher weights (reloaded from their source), RNG states for exact resume -----------
    def on_save_checkpoint(self, checkpoint):
        sd = checkpoint["state_dict"]
        for k in [k for k in sd if k.startswith("teacher.")]:
            del sd[k]
        checkpoint["student_config"] = self.student.config.to_dict()
        checkpoint["rng"] = {**self.train_rng.state_dict(), "sample_gens": self.sample_gens.state_dict()}
        checkpoint["scrg_history"] = {k: list(v) for k, v in self.scrg_history.items()}  # results.json averages
        checkpoint["dac_history"] = {k: list(v) for k, v in self.dac_history.items()}
        if self.sequences is not None:  # replay buffer, coin flips, schedule: what the next steps draw
            checkpoint["sequence_source"] = self.sequences.state_dict()

    def on_load_checkpoint(self, checkpoint):
        if self.teacher is not None:  # the teacher is not stored; put the loaded one back so loading is strict
            checkpoint["state_dict"].update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
        if "scrg_history" in checkpoint:  # a resumed run reports SCRG statistics over the whole run
            self.scrg_history = defaultdict(list, {k: list(v) for k, v in checkpoint["scrg_history"].items()})
        self.dac_history = defaultdict(list, {k: list(v) for k, v in checkpoint.get("dac_history", {}).items()})
        if any("ScrgCallback" in k for k in checkpoint.get("callbacks", {})):
            raise ValueError("this checkpoint was written by an older mgsr (a ScrgCallback fed the sequences), which "
                             "this version cannot resume; start the run again")
        if self.sequences is not None and checkpoint.get("sequence_source") is not None:
            self.sequences.load_state_dict(checkpoint["sequence_source"])
        rng = checkpoint.get("rng")
        if rng:
            self.train_rng.load_state_dict(rng)
            self.sample_gens.load_state_dict(rng["sample_gens"] if "sample_gens" in rng else rng["sample_gen"])
