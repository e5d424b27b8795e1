"""The training recipe, top to bottom: tokenizer -> data -> teacher (fine-tuned and cached if needed) ->
student -> Lightning fit -> evaluation of the selected checkpoint -> results on disk.

Each stage lives in `mgsr.build` (one module per job); this file only orders them. `train.py` is a thin Hydra
wrapper around `run(cfg)`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf

from mgsr.build.data import build_datamodule, check_epoch_length, eval_sets, resolve_data_path
from mgsr.build.evaluate import (
    EVAL_ONLY,
    evaluate_reference,
    exposure_bias,
    final_evaluation,
    teacher_forced,
    write_results,
)
from mgsr.build.module import build_module
from mgsr.build.student import build_student, export_student, trained_student
from mgsr.build.teacher import ensure_teacher
from mgsr.build.tokenizer import build_tokenizer
from mgsr.build.trainer import (
    build_loggers,
    build_trainer,
    finish_wandb,
    log_summary,
    resume_checkpoint,
    wandb_offline_dir,
)
from mgsr.build.validate import validate
from mgsr.callbacks import CostCallback
from mgsr.config import ConfigError
from mgsr.data.prompt import use_prompt_format
from mgsr.prune import check_prune_depth
from mgsr.sources import resolve_model_sources

log = logging.getLogger("mgsr")


def run(cfg: DictConfig, run_dir: Path) -> dict:
    t_start = time.perf_counter()
    prepare(cfg, run_dir)

    # tokenizer and data
    try:
        tokenizer = use_prompt_format(build_tokenizer(cfg), cfg.data.get("prompt_format", "alpaca"))
        dm = build_datamodule(cfg, tokenizer)
        dm.setup("fit")
    except ConfigError:
        raise
    except (FileNotFoundError, ValueError) as e:  # e.g. an empty split: one line, before any model loads
        raise ConfigError(f"data: {e}") from None
    check_epoch_length(cfg, len(dm.datasets["train"]))
    final_sets = eval_sets(dm, cfg) if cfg.eval.enabled else None  # a missing eval file fails before training
    if cfg.get("eval_only"):
        if cfg.eval_only not in EVAL_ONLY or not cfg.eval.enabled:
            raise ConfigError(f"eval_only={cfg.eval_only}: choose one of {', '.join(EVAL_ONLY)} (with eval.enabled=true)")
        return evaluate_reference(cfg, run_dir, tokenizer, dm, final_sets, t_start)

    # teacher (and SeqKD's data from it), student, module
    distills = cfg.loss.distill_weight > 0 or cfg.loss.span_weight > 0
    teacher = ensure_teacher(cfg, tokenizer, dm) if distills else None
    seqkd_stats = seqkd_data(cfg, tokenizer, dm, teacher)
    student = build_student(cfg, tokenizer)
    module = build_module(cfg, student, teacher, tokenizer, dm)

    # fit
    trainer, cost, loggers = fit(cfg, run_dir, module, dm)
    results = fit_results(cfg, run_dir, dm, trainer, module, cost, loggers, seqkd_stats)
    student, teacher, best = trained_student(cfg, tokenizer, trainer, module, student, teacher)
    results["evaluated"] = evaluated_checkpoint(cfg, best, trainer)
    if best:
        results["checkpoint"] = best

    # export, evaluate, report
    if trainer.is_global_zero:
        student = export_student(student, tokenizer, run_dir)
        if cfg.eval.enabled:
            final_evaluation(cfg, student, tokenizer, final_sets, results)
            if cfg.eval.get("teacher_forced"):
                results["teacher_forced"] = teacher_forced(cfg, student, teacher, tokenizer, dm, final_sets)
            if cfg.eval.get("exposure_bias"):
                results["exposure"] = exposure_bias(cfg, student, teacher, tokenizer, dm)
        write_results(run_dir, results, t_start)
        log_summary(loggers, results)
    finish_wandb(loggers)  # a sweep runs its jobs in one process: the next job must get a fresh W&B run
    return results


def prepare(cfg: DictConfig, run_dir: Path) -> None:
    """Everything checked or resolved before anything loads, the seed, and the run's config.yaml."""
    resolve_data_path(cfg)  # data.hub: no local copy -> fetched once into the cache
    validate(cfg)  # before anything loads
    resolve_model_sources(cfg)  # GGUF / packaged weights -> a converted directory in the cache (once)
    check_prune_depth(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def seqkd_data(cfg: DictConfig, tokenizer, dm, teacher) -> dict | None:
    """`seqkd.enabled`: train on cached teacher samples (SeqKD; the teacher loads only to sample them).
    Returns SeqKD's stats for results.json, None without SeqKD."""
    if cfg.get("seqkd") is not None and cfg.seqkd.get("enabled"):
        from mgsr.seqkd import apply_seqkd

        return apply_seqkd(cfg, tokenizer, dm,
                           lambda: teacher if teacher is not None else ensure_teacher(cfg, tokenizer, dm))
    return None


def fit(cfg: DictConfig, run_dir: Path, module, dm):
    """Train `module` on `dm` (resuming per `ckpt_path`); returns (trainer, cost callback, loggers)."""
    cost = CostCallback()
    callbacks = [cost]  # where each step's sequences come from is the module's own SequenceSource
    loggers = build_loggers(cfg, run_dir)
    trainer = build_trainer(cfg, run_dir, callbacks, loggers, module=module)
    ckpt = resume_checkpoint(cfg.ckpt_path, run_dir)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt, weights_only=True)  # checkpoints hold tensors and primitives
    return trainer, cost, loggers


def fit_results(cfg: DictConfig, run_dir: Path, dm, trainer, module, cost, loggers, seqkd_stats) -> dict:
    """results.json as training leaves it: data, cost, validation, SeqKD, W&B and SCRG facts."""
    results = {"name": cfg.name, "seed": cfg.seed, "run_dir": str(run_dir), "data_stats": dm.stats,
               "train_cost": cost.summary(module), "val": {k: float(v) for k, v in trainer.callback_metrics.items()
                                                           if k.startswith("val/")}}
    if seqkd_stats is not None:
        results["seqkd"] = seqkd_stats
    offline = wandb_offline_dir(loggers)
    if offline:
        results["wandb_offline_dir"] = offline
        log.info("W&B offline run: %s (upload with: wandb sync %s)", offline, offline)
    results["span_backend"] = span_backend(module)
    if getattr(module, "scrg_history", None):  # what SCRG did over training (e.g. corrected tokens per sequence)
        results["scrg"] = {k: sum(v) / len(v) for k, v in module.scrg_history.items() if v}
    if getattr(module, "dac_history", None):  # what DAC-KL kept over training (classes per token, mean l and u)
        results["dac"] = {k: sum(v) / len(v) for k, v in module.dac_history.items() if v}
    return results


def evaluated_checkpoint(cfg: DictConfig, best: str | None, trainer) -> dict:
    """What the final evaluation scored: the checkpoint selected by `checkpoint.monitor` and its training step,
    or the weights training ended with (selection "end of training"), so selection noise can be measured."""
    if best and Path(best).is_file():
        import torch

        step = torch.load(best, map_location="cpu", weights_only=True, mmap=True).get("global_step")
        how = "last checkpoint" if Path(best).stem == "last" else f"best {cfg.checkpoint.monitor}"
        return {"selection": how, "path": best, "step": step}
    return {"selection": "end of training", "path": None, "step": int(trainer.global_step)}


def span_backend(module) -> dict:
    """Which span rule the span loss trained with: {"backend": "nltk" | "fallback" | "none", "reason": ...}.
    "none": the run has no span loss. A fallback is recorded with its reason, so no cell hides it."""
    span = getattr(module, "span", None)
    extractor = getattr(span, "extractor", None)
    if extractor is None:
        return {"backend": "none"}
    out = {"backend": extractor.backend}
    if extractor.fallback_reason:
        out["reason"] = extractor.fallback_reason
    return out


__all__ = ["run", "ConfigError"]
