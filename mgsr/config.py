"""Config validation: every mistake found here is one line that says what to change, before any model loads."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A user-facing configuration mistake (printed as one line by the entry points)."""


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).exists()


def check_model_source(role: str, spec) -> None:
    name = spec.get("name_or_path")
    if name is None:
        if not spec.get("arch"):
            raise ConfigError(f"model.{role}: set name_or_path (hub name or local dir) or arch (build from config)")
        return
    path = Path(os.path.expanduser(name))
    if _looks_local(name) and not (path / "config.json").is_file():
        raise ConfigError(f"model.{role}.name_or_path={name}: no model directory there (config.json missing); "
                          "point it at a saved model or a hub name")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError on the first mistake. Cheap checks only: nothing is loaded or built here."""
    loss = cfg.loss
    weights = {k: float(loss.get(k, 0.0)) for k in ("sft_weight", "distill_weight", "span_weight")}
    for k, w in weights.items():
        if w < 0:
            raise ConfigError(f"loss.{k}={w}: loss weights must be >= 0")
    if sum(weights.values()) == 0:
        raise ConfigError("loss weights are all zero: set at least one of loss.sft_weight, loss.distill_weight, "
                          "loss.span_weight > 0")
    for part in ("distill", "span"):
        if weights[f"{part}_weight"] > 0 and loss.get(part) is None:
            raise ConfigError(f"loss.{part}_weight > 0 but loss.{part} is null: choose a loss group that defines it")
    d = loss.get("distill")
    if d is not None and d.get("head") == "fixed":
        lo, hi = float(d.lower), float(d.upper)
        if not (0.0 <= lo < hi <= 1.0):
            raise ConfigError(f"loss.distill: quantiles must satisfy 0 <= lower < upper <= 1, got lower={lo}, "
                              f"upper={hi}")
    if d is not None and d.get("head") == "learnable":
        for key in ("lower_range", "upper_range"):
            a, b = (float(x) for x in d[key])
            if not (0.0 <= a < b <= 1.0):
                raise ConfigError(f"loss.distill.{key}={[a, b]}: need 0 <= low < high <= 1")
        if float(d.lower_range[1]) > float(d.upper_range[0]):
            raise ConfigError("loss.distill: lower_range must lie below upper_range (lower quantile < upper)")

    s = cfg.scrg
    if int(s.every_n_steps) <= 0:
        raise ConfigError(f"scrg.every_n_steps={s.every_n_steps}: must be >= 1 (1 = fresh rollouts every step)")
    if int(s.sampling.max_new_tokens) <= 0:
        raise ConfigError(f"scrg.sampling.max_new_tokens={s.sampling.max_new_tokens}: must be > 0")
    if int(cfg.eval.max_new_tokens) <= 0:
        raise ConfigError(f"eval.max_new_tokens={cfg.eval.max_new_tokens}: must be > 0")
    if int(s.buffer_capacity) <= 0:
        raise ConfigError(f"scrg.buffer_capacity={s.buffer_capacity}: must be > 0")

    data = cfg.data
    if data.source not in ("synthetic", "jsonl"):
        raise ConfigError(f"data.source={data.source!r}: choose synthetic or jsonl")
    if data.source == "jsonl":
        if not data.get("path") or not Path(data.path).is_dir():
            raise ConfigError(f"data.path={data.get('path')}: directory not found; point it at the folder holding "
                              "the JSONL splits (e.g. ../shared/data/dolly)")
    if int(data.max_prompt_len) <= 0 or int(data.max_len) <= int(data.max_prompt_len):
        raise ConfigError(f"data: need 0 < max_prompt_len < max_len, got {data.max_prompt_len} and {data.max_len}")

    seqkd = cfg.get("seqkd")
    seqkd_on = seqkd is not None and bool(seqkd.get("enabled"))
    if seqkd_on and int(seqkd.sampling.max_new_tokens) <= 0:
        raise ConfigError(f"seqkd.sampling.max_new_tokens={seqkd.sampling.max_new_tokens}: must be > 0")
    if cfg.model.teacher is not None and (weights["distill_weight"] + weights["span_weight"] > 0 or seqkd_on):
        check_model_source("teacher", cfg.model.teacher)
    check_model_source("student", cfg.model.student)

    tr = cfg.trainer
    strategy = str(tr.get("strategy", "auto"))
    if strategy.startswith("fsdp") and tr.get("accelerator") == "cpu" and int(tr.get("devices", 1)) < 2 \
            and not os.environ.get("WORLD_SIZE"):
        raise ConfigError("trainer.strategy=fsdp on CPU needs a process group: set trainer.devices>=2 "
                          "(gloo) or launch with torchrun")


def to_container(node):
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
