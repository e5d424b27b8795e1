"""Multi-GPU strategies from config: FSDP wrap policy by class name, teacher sharded or replicated, and
rollouts (generation outside Lightning's forward) under sharded parameters.

FSDP (Lightning's `FSDPStrategy`, torch FSDP1, `use_orig_params=True`):
- Wrap policy: one FSDP unit per transformer block (`auto_wrap_policy: auto` = the classes listed in the
  teacher's and student's `_no_split_modules`, e.g. GPT2Block, LlamaDecoderLayer; or a list of class names /
  dotted paths), plus one unit per whole model (teacher and student). The per-model units matter: FSDP needs
  one dtype per unit, and the teacher is bf16 while the student is usually fp32; they also let a direct
  `student(...)` call (generation) gather its own parameters.
- Teacher: `teacher: shard` (default) wraps it like the student, so each rank holds 1/W of it; `replicate`
  passes it as `ignored_modules`, so every rank keeps the whole (frozen) teacher and no all-gathers are spent
  on it. The teacher has no gradient and no optimizer state either way.
- Generation: SCRG / student rollouts (the module's sequence source) are direct decode calls, not one forward. With
  `rollout_gather: full` (default) `gathered_for_generation` (mgsr/sharding.py) puts them inside
  `FullyShardedDataParallel.summon_full_params(root, writeback=False)`: parameters are gathered once per
  rollout (one full copy of teacher + student per rank while it runs, freed after). `layer` instead relies
  on each FSDP unit's own forward all-gather (less memory, one all-gather per unit per decoding step).
  Validation generation runs inside the wrapped forward and needs neither.
FSDP2 (`trainer=fsdp2`, mgsr/fsdp2.py): torch `fully_shard` under Lightning's ModelParallelStrategy; runs on CPU
(gloo) and GPUs, so it is the sharding preset that CI runs. FSDP1 and DeepSpeed stay GPU-only (Lightning refuses
them on a CPU accelerator; DeepSpeed is not installed in CI): their configs are composed and built in tests.
DeepSpeed ZeRO-3 partitions parameters too: rollouts are wrapped in `deepspeed.zero.GatheredParameters`
(untested here: DeepSpeed is not installed in CI). ZeRO-2 and DDP keep whole parameters on every rank.
"""

from __future__ import annotations

import importlib
import logging

import lightning as L
from hydra.utils import instantiate

log = logging.getLogger(__name__)

# keys of the `trainer.strategy` config node that are ours, not the strategy class's
OUR_KEYS = ("teacher", "rollout_gather")


def resolve_module_classes(names, models) -> set[type]:
    """Classes named by `names` (str or list): dotted paths are imported; bare names are looked up among the
    classes of the modules inside `models`; "auto" means every class listed in their `_no_split_modules`."""
    names = [names] if isinstance(names, str) else list(names or [])
    present = {type(m).__name__: type(m) for model in models if model is not None for m in model.modules()}
    wanted: list[str] = []
    for name in names:
        if name == "auto":
            for model in models:
                base = getattr(model, "get_base_model", lambda m=model: m)()  # a peft model: its base's list
                wanted.extend(getattr(base, "_no_split_modules", None) or [])
        else:
            wanted.append(name)
    classes = set()
    for name in wanted:
        if "." in name:
            module, _, attr = name.rpartition(".")
            classes.add(getattr(importlib.import_module(module), attr))
        elif name in present:
            classes.add(present[name])
        else:
            raise ValueError(f"wrap policy class {name!r} is not a module of the teacher or student "
                             f"(have e.g. {sorted(present)[:8]}); use its class name or dotted path")
    return classes


def fsdp_policy_classes(pl_module, names) -> set[type]:
    """The FSDP unit classes: the named blocks plus the teacher's and student's own model classes."""
    models = [getattr(pl_module, "student", None), getattr(pl_module, "teacher", None)]
    classes = resolve_module_classes(names, models)
    classes.update(type(m) for m in models if m is not None)
    return classes


def build_strategy(spec: dict, pl_module=None):
    """Instantiate `trainer.strategy` (a dict with `_target_`). FSDP: resolve `auto_wrap_policy` /
    `activation_checkpointing_policy` class names against `pl_module`, and place the teacher per `teacher`."""
    spec = dict(spec)
    if str(spec.get("_target_", "")).endswith("FSDP2Strategy"):
        return _build_fsdp2(spec, pl_module)
    ours = {k: spec.pop(k) for k in OUR_KEYS if k in spec}
    objects = {}  # python objects (classes, modules) go in as kwargs: a config node cannot hold them
    if str(spec.get("_target_", "")).endswith("FSDPStrategy"):
        if pl_module is None:
            raise ValueError("an FSDP strategy needs the module to resolve its wrap policy")
        for key in ("auto_wrap_policy", "activation_checkpointing_policy"):
            names = spec.pop(key, None)
            if names is not None:
                objects[key] = fsdp_policy_classes(pl_module, names) if key == "auto_wrap_policy" else \
                    resolve_module_classes(names, [pl_module.student])
                log.info("FSDP %s: %s", key, sorted(c.__name__ for c in objects[key]))
        placement = ours.get("teacher", "shard")
        if placement not in ("shard", "replicate"):
            raise ValueError(f"trainer.strategy.teacher={placement!r}: choose shard or replicate")
        if placement == "replicate" and getattr(pl_module, "teacher", None) is not None:
            objects["ignored_modules"] = [pl_module.teacher]
    if pl_module is not None and "rollout_gather" in ours:
        if ours["rollout_gather"] not in ("full", "layer"):
            raise ValueError(f"trainer.strategy.rollout_gather={ours['rollout_gather']!r}: choose full or layer")
        pl_module.rollout_gather = ours["rollout_gather"]
    return instantiate(spec, **objects)


def _build_fsdp2(spec: dict, pl_module):
    """FSDP2 (mgsr/fsdp2.py): `shard_classes` names -> classes; the teacher's placement goes to the strategy."""
    from mgsr.fsdp2 import FSDP2Strategy

    if pl_module is None:
        raise ValueError("the FSDP2 strategy needs the module to resolve its shard classes")
    FSDP2Strategy.check(**spec)
    spec.pop("rollout_gather", None)  # always "full" (checked above)
    models = [pl_module.student, getattr(pl_module, "teacher", None)]
    classes = resolve_module_classes(spec.pop("shard_classes", "auto"), models)
    log.info("FSDP2 shard classes: %s", sorted(c.__name__ for c in classes))
    return instantiate(spec, shard_classes=classes)


class ReplicatedTeacherToDevice(L.Callback):
    """FSDP moves only the parameters it manages: a replicated (ignored) teacher is moved here, once the
    strategy has set the device."""

    def on_fit_start(self, trainer, pl_module):
        if getattr(pl_module, "teacher", None) is not None:
            pl_module.teacher.to(trainer.strategy.root_device)


def strategy_callbacks(spec) -> list:
    """Callbacks a strategy config needs (a replicated teacher under FSDP)."""
    if isinstance(spec, dict) and str(spec.get("_target_", "")).endswith("FSDPStrategy") \
            and spec.get("teacher", "shard") == "replicate":
        return [ReplicatedTeacherToDevice()]
    return []
