"""Calling sharded modules directly (generation outside Lightning's forward) and telling whether a strategy
shards: the part of mgsr/strategies.py that the module needs, without the strategy builders (see there)."""

from __future__ import annotations

import contextlib

import torch


def is_sharded(strategy) -> bool:
    """True when the strategy rewrites or partitions the module's parameters (FSDP, DeepSpeed ZeRO-3):
    the student object then has to be rebuilt from a checkpoint to be saved or evaluated."""
    name = type(strategy).__name__
    return name.startswith("FSDP") or (name.startswith("DeepSpeed") and bool(getattr(strategy, "zero_stage_3", 0)))


@contextlib.contextmanager
def unsharded(wrapper, *, gather: str = "full"):
    """Context in which the modules inside `wrapper` can be called directly (generation outside forward).

    `wrapper`: the strategy's wrapped model (`trainer.strategy.model`); anything that is not an FSDP module
    (DDP, a plain module, None) needs nothing. FSDP, gather="full": all parameters gathered once, no
    write-back (generation never changes them); gather="layer": nothing here, each unit gathers its own.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(wrapper, FSDP) and gather == "full":
        with torch.no_grad(), FSDP.summon_full_params(wrapper, writeback=False, recurse=True):
            yield
        return
    yield


def gathered_for_generation(pl_module):
    """`unsharded` for a LightningModule attached to a trainer (no trainer: a no-op context)."""
    trainer = getattr(pl_module, "_trainer", None)
    strategy = getattr(trainer, "strategy", None)
    if strategy is None:
        return contextlib.nullcontext()
    if type(strategy).__name__.startswith("DeepSpeed") and getattr(strategy, "zero_stage_3", False):
        import deepspeed  # only reachable when the DeepSpeed strategy is in use

        return deepspeed.zero.GatheredParameters(list(pl_module.parameters()), modifier_rank=None)
    return unsharded(strategy.model, gather=getattr(pl_module, "rollout_gather", "full"))
