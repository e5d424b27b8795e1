"""The student: pruned from the teacher's source, a pretrained model, the run's shared SFT start
(`model.student_init`, cached) or from scratch; after training, the selected checkpoint's weights, exported."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mgsr.build.data import build_datamodule, data_identity
from mgsr.build.trainer import best_checkpoint, last_checkpoint
from mgsr.config import to_container
from mgsr.fsdp2_checkpoint import is_sharded_checkpoint, load_student_state
from mgsr.models import build_from_config, load_model, trim_vocab
from mgsr.prune import prune_layers
from mgsr.sft_stage import fine_tune_cached, stable_hash, tokenizer_digest
from mgsr.sharding import is_sharded

log = logging.getLogger("mgsr")


def build_student(cfg: DictConfig, tokenizer):
    spec = cfg.model.student
    if spec.get("init") == "prune":  # the teacher's (pre-fine-tuning) source with fewer blocks
        source = load_model(cfg.model.teacher.name_or_path, dtype=spec.dtype,
                            trust_remote_code=cfg.model.trust_remote_code)
        keep = spec.keep_layers
        model = prune_layers(trim_vocab(source, len(tokenizer)),
                             OmegaConf.to_container(keep) if OmegaConf.is_config(keep) else keep)
    elif spec.get("name_or_path"):
        model = load_model(spec.name_or_path, dtype=spec.dtype, trust_remote_code=cfg.model.trust_remote_code)
        model = trim_vocab(model, len(tokenizer))
    elif student_init_enabled(cfg):  # the paper's protocol: every method starts from one SFT checkpoint
        model = load_model(str(ensure_student_init(cfg, tokenizer)), dtype=spec.dtype)
    else:  # from scratch
        model = build_from_config(to_container(spec.arch), tokenizer, seed=cfg.seed).to(_dtype(spec.dtype))
    if cfg.model.get("gradient_checkpointing"):  # transformers 5 renamed it activation checkpointing
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    if cfg.model.get("lora") and cfg.model.lora.get("enabled"):
        from peft import LoraConfig, get_peft_model

        lora = {k: v for k, v in to_container(cfg.model.lora).items() if k != "enabled"}
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
    return model


def _dtype(name):
    from mgsr.models import torch_dtype

    return torch_dtype(name)


def student_init_enabled(cfg: DictConfig) -> bool:
    init = cfg.model.get("student_init")
    return bool(init is not None and init.get("enabled") and not cfg.model.student.get("name_or_path"))


def student_init_path(cfg: DictConfig, tokenizer) -> Path:
    init = to_container(cfg.model.student_init)
    key = stable_hash({"arch": to_container(cfg.model.student.arch), "init": {k: v for k, v in init.items() if k != "enabled"},
                 "data": data_identity(cfg), "tok": tokenizer_digest(tokenizer)})
    return Path(cfg.cache_dir) / f"student-sft-{key}"


def ensure_student_init(cfg: DictConfig, tokenizer) -> Path:
    """The SFT checkpoint every method of a run starts from (`model.student_init`): `arch` fine-tuned on the
    run's training split, cached by what determines it. Its seed defaults to the run's, so each training seed
    of a comparison has its own start, shared by all methods at that seed (a paired design)."""
    init = cfg.model.student_init
    return fine_tune_cached(
        student_init_path(cfg, tokenizer),
        lambda: build_from_config(to_container(cfg.model.student.arch), tokenizer, seed=int(init.seed)),
        tokenizer, build_datamodule(cfg, tokenizer, batch_size=int(init.batch_size), shuffle_seed=None),  # see data
        max_steps=int(init.max_steps),
        lr=float(init.lr), seed=int(init.seed), accelerator=cfg.trainer.accelerator, what="student init",
        progress=bool(cfg.trainer.get("enable_progress_bar", True)))


def trained_student(cfg: DictConfig, tokenizer, trainer, module, student, teacher):
    """After fit: (student, teacher, checkpoint). The student holds the selected checkpoint's weights (the best by
    `checkpoint.monitor`), or the weights training ended with when there is none (checkpoint None). A sharded
    strategy rewrote both models in place: the student is a fresh one (from the last checkpoint if there is no
    best) and the teacher None (reloaded if needed later)."""
    best = best_checkpoint(trainer)
    if is_sharded(trainer.strategy):  # FSDP rewrote the student's module tree in place: load into a fresh one
        student = build_student(cfg, tokenizer).to(module.device)
        teacher = None  # rewritten too (and its units all-gather across ranks): reloaded if needed later
        best = best or last_checkpoint(trainer)
        if not best:
            log.warning("sharded strategy and no checkpoint: the trained student cannot be exported")
    if best and Path(best).is_dir() and is_sharded_checkpoint(best):  # FSDP2: shards, read back whole here
        student.load_state_dict(load_student_state(best))
        return student, teacher, best
    if best and Path(best).is_dir():  # DeepSpeed writes a directory of shards: not loadable here
        log.warning("checkpoint %s is a DeepSpeed directory; convert it with lightning.pytorch.utilities.deepspeed."
                    "convert_zero_checkpoint_to_fp32_state_dict and evaluate that (not loaded here)", best)
        best = None
    if best:
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        student.load_state_dict({k[len("student."):]: v for k, v in state.items() if k.startswith("student.")})
    return student, teacher, best


def export_student(student, tokenizer, run_dir: Path):
    """Save the student and the tokenizer to <run_dir>/student (LoRA: the adapter to <run_dir>/student_adapter
    and the merged model to student); returns the saved model."""
    if hasattr(student, "merge_and_unload"):  # LoRA: keep the adapter, export the merged model
        student.save_pretrained(run_dir / "student_adapter")
        student = student.merge_and_unload()
    student.save_pretrained(run_dir / "student")
    tokenizer.save_pretrained(run_dir / "student")
    return student
