"""The frozen teacher: a pretrained one (checked against the run's tokenizer, optionally LoRA-merged and
fine-tuned), or `arch` fine-tuned on the training data; fine-tuned teachers are cached by what determines them."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig

from mgsr.build.data import build_datamodule, data_identity
from mgsr.build.tokenizer import teacher_corpus_size
from mgsr.config import ConfigError, to_container
from mgsr.data.datamodule import DistillDataModule
from mgsr.models import (
    build_from_config,
    check_tokenizers,
    freeze,
    load_model,
    load_tokenizer,
    merge_lora,
    trim_vocab,
)
from mgsr.sft_stage import fine_tune_cached, stable_hash, tokenizer_digest

log = logging.getLogger("mgsr")


def check_teacher_tokenizer(name_or_path: str, tokenizer, *, trust_remote_code: bool = False) -> None:
    """Token-level distillation needs the teacher's vocabulary to be the run's (padding rows past it are
    fine, see `shared_vocab_size`); a real mismatch is one ConfigError line, raised before any weights load."""
    try:
        teacher_tok = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # a weights-only directory: nothing to compare against
        log.warning("teacher %s has no loadable tokenizer (%s); assuming it shares the run's", name_or_path, e)
        return
    try:
        check_tokenizers(teacher_tok, tokenizer)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _pretrained_teacher(cfg: DictConfig, tokenizer, dtype: str):
    spec = cfg.model.teacher
    teacher = load_model(spec.name_or_path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    if spec.get("lora_path"):  # a LoRA-fine-tuned teacher: merge once, then it is a plain model
        teacher = merge_lora(teacher, spec.lora_path)
    return trim_vocab(teacher, len(tokenizer))


def _source_key(name: str):
    """What identifies a pretrained source in a cache key: a hub name as is; a local directory by its files'
    names, sizes and mtimes (a GGUF conversion's directory name already holds the file's hash)."""
    path = Path(os.path.expanduser(name))
    if not path.is_dir():
        return name
    return {"path": str(path.resolve()), "files": sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                                                         for f in path.iterdir() if f.is_file())}


def ensure_teacher(cfg: DictConfig, tokenizer, dm: DistillDataModule):
    """The frozen teacher. With no `name_or_path`, fine-tune `arch` on the training split with SFT first; a
    pretrained teacher is fine-tuned the same way when `teacher_sft.max_steps > 0` (the MiniLLM protocol).
    The result is cached by what determines it (a second run with the same settings skips that stage)."""
    spec = cfg.model.teacher
    sft = to_container(cfg.model.teacher_sft)
    pretrained = bool(spec.get("name_or_path"))
    if pretrained:
        check_teacher_tokenizer(spec.name_or_path, tokenizer, trust_remote_code=cfg.model.trust_remote_code)
        if int(sft.get("max_steps") or 0) <= 0:  # used as given
            return freeze(_pretrained_teacher(cfg, tokenizer, spec.dtype))
        build = lambda: _pretrained_teacher(cfg, tokenizer, "float32")  # noqa: E731 - trained in float32
    else:
        build = lambda: build_from_config(to_container(spec.arch), tokenizer, seed=sft["seed"])  # noqa: E731
    overrides = {"batch_size": sft["batch_size"], "shuffle_seed": None}  # the cache key holds no order
    if cfg.data.source != "jsonl":  # the teacher's own corpus: longer, and as clean as teacher_sft says
        overrides |= {"n_train": teacher_corpus_size(cfg) or cfg.data.n_train,
                      "label_noise": float(sft.get("label_noise") or 0.0)}
    path = fine_tune_cached(
        teacher_cache_path(cfg, tokenizer), build, tokenizer, build_datamodule(cfg, tokenizer, **overrides),
        max_steps=sft["max_steps"], lr=sft["lr"], seed=sft["seed"], accelerator=cfg.trainer.accelerator,
        what="teacher", progress=bool(cfg.trainer.get("enable_progress_bar", True)))
    return freeze(load_model(str(path), dtype=spec.dtype))


def teacher_cache_path(cfg: DictConfig, tokenizer) -> Path:
    """Where the fine-tuned tiny teacher lives: keyed on its architecture, its SFT settings, the identity of its
    corpus and the tokenizer, and on nothing else (not the run's batch size, workers or the student's split)."""
    sft, spec = to_container(cfg.model.teacher_sft), cfg.model.teacher
    data = data_identity(cfg, teacher_corpus_size(cfg), float(sft.get("label_noise") or 0.0))
    origin = ({"source": _source_key(spec.name_or_path), "lora": spec.get("lora_path")} if spec.get("name_or_path")
              else {"arch": to_container(spec.arch)})
    key = stable_hash({**origin, "sft": sft, "data": data, "tok": tokenizer_digest(tokenizer)})
    return Path(cfg.cache_dir) / f"teacher-{key}"
