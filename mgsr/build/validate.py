"""Config validation: every mistake found here is one line that says what to change, before any model loads.

Each rule lives with what it configures (the loss objects' `check`, ScrgConfig, SamplingConfig, the prompt formats,
the model sources); this module asks each of them, cheaply: nothing is loaded or built here.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mgsr.config import ConfigError, to_container


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).exists()


def check_model_source(role: str, spec) -> None:
    from mgsr.sources import gguf_path, is_gguf_source

    if is_gguf_source(spec):
        gguf_path(spec, role)  # the file (or package) exists, and transformers can read GGUF
        return
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
        if weights[f"{part}_weight"] > 0:
            check_loss_node(loss[part], f"loss.{part}")

    s = cfg.scrg
    if int(s.every_n_steps) <= 0:
        raise ConfigError(f"scrg.every_n_steps={s.every_n_steps}: must be >= 1 (1 = fresh rollouts every step)")
    if int(s.sampling.max_new_tokens) <= 0:
        raise ConfigError(f"scrg.sampling.max_new_tokens={s.sampling.max_new_tokens}: must be > 0")
    if int(cfg.eval.max_new_tokens) <= 0:
        raise ConfigError(f"eval.max_new_tokens={cfg.eval.max_new_tokens}: must be > 0")
    if int(s.get("reuse_rollouts", 1)) <= 0:
        raise ConfigError(f"scrg.reuse_rollouts={s.reuse_rollouts}: must be >= 1 (1 = each rollout serves one step)")
    if int(s.get("rollout_batches", 1)) <= 0:
        raise ConfigError(f"scrg.rollout_batches={s.rollout_batches}: must be >= 1 (1 = rollouts on each batch's prompts)")
    if int(s.buffer_capacity) <= 0:
        raise ConfigError(f"scrg.buffer_capacity={s.buffer_capacity}: must be > 0")
    _check_switches(cfg, weights)

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
    student = cfg.model.student
    if student.get("init") not in (None, "prune"):
        raise ConfigError(f"model.student.init={student.init!r}: use prune, or null (name_or_path or arch decide)")
    prune = student.get("init") == "prune"
    if cfg.model.teacher is not None and (weights["distill_weight"] + weights["span_weight"] > 0 or seqkd_on or prune):
        check_model_source("teacher", cfg.model.teacher)
    if prune:
        _check_prune(cfg)
    else:
        check_model_source("student", student)
    from mgsr.data.prompt import PROMPT_FORMATS

    if data.get("prompt_format", "alpaca") not in PROMPT_FORMATS:
        raise ConfigError(f"data.prompt_format={data.prompt_format!r}: choose one of {', '.join(PROMPT_FORMATS)}")

    _check_rollout(cfg)
    tr = cfg.trainer
    if OmegaConf.is_dict(tr.get("strategy")) and tr.strategy.get("_target_"):  # e.g. FSDP2Strategy.check
        check_loss_node(tr.strategy, "trainer.strategy")
    strategy = str(tr.get("strategy", "auto"))
    if strategy.startswith("fsdp") and tr.get("accelerator") == "cpu" and int(tr.get("devices", 1)) < 2 \
            and not os.environ.get("WORLD_SIZE"):
        raise ConfigError("trainer.strategy=fsdp on CPU needs a process group: set trainer.devices>=2 "
                          "(gloo) or launch with torchrun")


def _check_rollout(cfg: DictConfig) -> None:
    """`rollout.engine`: hf, or vllm with the extra installed, one training process and no n-gram ban."""
    rollout = cfg.get("rollout")
    engine = "hf" if rollout is None else rollout.get("engine", "hf")
    if engine not in ("hf", "vllm"):
        raise ConfigError(f"rollout.engine={engine!r}: choose hf or vllm")
    if engine == "hf":
        return
    from mgsr.generation import SamplingConfig
    from mgsr.rollout_vllm import check_sampling, vllm_missing

    missing = vllm_missing()
    if missing:
        raise ConfigError(missing)
    try:
        check_sampling(SamplingConfig(**to_container(cfg.scrg.sampling)))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    devices = cfg.trainer.get("devices", 1)
    if (isinstance(devices, int) and devices != 1) or os.environ.get("WORLD_SIZE", "1") != "1":
        raise ConfigError("rollout.engine=vllm runs one in-process engine beside one training process: set "
                          "trainer.devices=1 (with FSDP2/DDP each rank would need its own engine; not built yet)")


def _check_prune(cfg: DictConfig) -> None:
    """`model.student.init=prune`: the teacher's pretrained source with fewer blocks (mgsr/prune.py); the count's
    upper bound is checked against the teacher's config once its source is resolved (check_prune_depth)."""
    teacher, keep = cfg.model.teacher, cfg.model.student.get("keep_layers")
    if teacher is None or not teacher.get("name_or_path"):
        raise ConfigError("model.student.init=prune copies blocks from the teacher's weights: set "
                          "model.teacher.name_or_path (a pretrained teacher)")
    keep = OmegaConf.to_container(keep) if OmegaConf.is_config(keep) else keep
    ok = (isinstance(keep, int) and not isinstance(keep, bool) and keep >= 1) or (
        isinstance(keep, list) and keep and all(isinstance(i, int) and i >= 0 for i in keep))
    if not ok:
        raise ConfigError(f"model.student.keep_layers={keep}: give a block count >= 1 or a list of block indices")


def check_loss_node(node, where: str) -> None:
    """A loss option or strategy (`_target_` + parameters) checked by its own class's static `check` (mgsr/objectives.py),
    the rule the constructor applies, without building it."""
    from hydra.utils import get_class

    params = {k: v for k, v in to_container(node).items() if not k.startswith("_")}
    try:
        cls = get_class(node._target_)
    except Exception as e:  # noqa: BLE001 - a typo in _target_: say which node
        raise ConfigError(f"{where}._target_={node.get('_target_')!r}: not importable ({e})") from None
    check = getattr(cls, "check", None)
    if check is not None:
        try:
            check(**params)
        except (ValueError, TypeError) as e:
            raise ConfigError(str(e)) from None


def _check_switches(cfg: DictConfig, weights: dict) -> None:
    """Named options and ranges that ScrgConfig and SamplingConfig would otherwise reject only after the teacher
    has loaded."""
    from mgsr.fsdp2_checkpoint import is_sharded_checkpoint
    from mgsr.generation import SamplingConfig
    from mgsr.scrg import ScrgConfig

    s = cfg.scrg
    try:
        ScrgConfig(**{k: s[k] for k in ScrgConfig.__dataclass_fields__ if k in s})  # messages name scrg.<key>
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    try:
        SamplingConfig(**to_container(s.get("sampling") or {}))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"scrg.sampling: {e}") from None
    if not 0.0 <= float(s.get("student_prob", 1.0)) <= 1.0:
        raise ConfigError(f"scrg.student_prob={s.student_prob}: must be in [0, 1]")

    ckpt = cfg.get("ckpt_path")
    if ckpt not in (None, "last") and not Path(os.path.expanduser(str(ckpt))).is_file() \
            and not is_sharded_checkpoint(os.path.expanduser(str(ckpt))):
        raise ConfigError(f"ckpt_path={ckpt}: no checkpoint there (use a .ckpt file, or 'last' for this run dir's)")
