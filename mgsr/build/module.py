"""The LightningModule of a run: the objectives, SCRG, the sequence source, the samplers and the learning-rate
schedule from config, around student and teacher."""

from __future__ import annotations

from functools import partial

from hydra.utils import instantiate
from omegaconf import DictConfig

from mgsr.config import to_container
from mgsr.generation import SamplingConfig
from mgsr.lr_schedule import warmup_cosine
from mgsr.module import DistillModule
from mgsr.scrg import ScrgConfig
from mgsr.sequences import build_sequence_source


def scrg_config(cfg: DictConfig) -> ScrgConfig:
    s = cfg.scrg
    return ScrgConfig(rounds=s.rounds, mode=s.mode, teacher_token=s.teacher_token, divergence=s.divergence,
                      threshold_mode=s.threshold_mode, threshold=s.threshold, quantile=s.quantile,
                      max_corrections=s.max_corrections, sampler=s.get("sampler", "student"),
                      mix=float(s.get("mix", 0.2)))


def build_module(cfg: DictConfig, student, teacher, tokenizer, dm=None) -> DistillModule:
    """`dm` (the set-up datamodule) lends its training prompts to rollouts made ahead (`scrg.rollout_batches > 1`)."""
    loss = cfg.loss
    distill = instantiate(loss.distill) if loss.get("distill") is not None and loss.distill_weight > 0 else None
    span = instantiate(loss.span) if loss.get("span") is not None and loss.span_weight > 0 else None
    val = SamplingConfig(max_new_tokens=cfg.eval.max_new_tokens, temperature=cfg.eval.temperature,
                         top_k=cfg.eval.top_k, top_p=cfg.eval.top_p)  # no n-gram ban for selection (METHOD.md 7)
    return DistillModule(
        student, tokenizer, teacher=teacher, sft_weight=loss.sft_weight, distill=distill,
        distill_weight=loss.distill_weight, span=span, span_weight=loss.span_weight, scrg=scrg_config(cfg),
        train_sampling=SamplingConfig(**to_container(cfg.scrg.sampling)), val_sampling=val,
        optim=to_container(cfg.optim), val_generate=cfg.val_generate, seed=cfg.seed,
        sequences=build_sequence_source(cfg.scrg, cfg.seed, instantiate=instantiate, prompts=training_prompts(cfg, dm))
        if uses_student_sequences(cfg) else None,
        rollout_engine=rollout_engine_factory(cfg),
        lr_schedule=lr_schedule(cfg),
    )


def rollout_engine_factory(cfg: DictConfig):
    """student -> the rollout engine of `rollout.engine` (None: the HF student samples)."""
    rollout = cfg.get("rollout")
    if rollout is None or rollout.engine == "hf":
        return None
    from mgsr.rollout_vllm import shared_engine

    settings = to_container(rollout.vllm)
    return lambda student: shared_engine(student, seed=int(cfg.seed), **settings)


def lr_schedule(cfg: DictConfig):
    """The run's learning-rate schedule, `(optimizer, total_steps) -> scheduler`: linear warm-up over
    `optim.warmup_steps`, then cosine decay to `optim.min_lr` (DistiLLM's)."""
    return partial(warmup_cosine, warmup_steps=int(cfg.optim.warmup_steps), min_lr=float(cfg.optim.min_lr))


def uses_student_sequences(cfg: DictConfig) -> bool:
    """Whether the run distils on student sequences (a sequence source), rather than always on the gold batch."""
    distills = cfg.loss.distill_weight > 0 or cfg.loss.span_weight > 0
    return bool(distills and cfg.scrg.enabled)


def training_prompts(cfg: DictConfig, dm) -> list | None:
    """The training split's prompt ids, when rollouts are made ahead (the pool of their extra batches)."""
    if int(cfg.scrg.get("rollout_batches", 1)) <= 1 or dm is None:
        return None
    return [f["prompt_ids"] for f in dm.datasets["train"].features]
