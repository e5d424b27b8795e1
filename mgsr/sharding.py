"""Calling sharded modules directly (generation outside Lightning's forward) and telling whether a strategy
shards: the part of mgsr/strategies.py that the module needs, without the strategy builders (see there)."""

from __future__ import annotations

import contextlib

import torch


def is_sharded(strategy) -> bool:
    """True when the strategy rewrites or partitions the module's parameters (FSDP1, FSDP2, DeepSpeed ZeRO-3):
    the student object then has to be rebuilt from a checkpoint to be saved or evaluated."""
    name = type(strategy).__name__
    return name.startswith("FSDP") or (name.startswith("DeepSpeed") and bool(getattr(strategy, "zero_stage_3", 0)))


def fsdp2_modules(wrapper) -> list:
    """The FSDP2 (`fully_shard`) modules inside `wrapper`, in `modules()` order (the same on every rank)."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in wrapper.modules() if isinstance(m, FSDPModule)] if isinstance(wrapper, torch.nn.Module) else []


@contextlib.contextmanager
def fsdp2_gathered(modules):
    """Every FSDP2 group in `modules` all-gathered once and kept whole until exit.

    Generation decodes a rank-dependent number of steps (finished rows leave the batch), so it must not
    all-gather per forward call: a rank that stops early would leave the others waiting in a collective.
    Here the only collectives are the unshards on entry, in the same order on every rank; inside, forward
    calls find their parameters already whole and communicate nothing. Requires that every group was
    built with `reshard_after_forward=True` (mgsr/fsdp2.py), which is what exit restores.
    """
    for m in modules:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        with torch.no_grad():
            yield
    finally:
        for m in modules:
            m.set_reshard_after_forward(True, recurse=False)
            m.reshard()


@contextlib.contextmanager
def unsharded(wrapper, *, gather: str = "full"):
    """Context in which the modules inside `wrapper` can be called directly (generation outside forward).

    `wrapper`: the strategy's wrapped model (`trainer.strategy.model`); anything that is not an FSDP module
    (DDP, a plain module, None) needs nothing. FSDP2: every group gathered for the duration (`fsdp2_gathered`). FSDP, gather="full": all parameters gathered once, no
    write-back (generation never changes them); gather="layer": nothing here, each unit gathers its own.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    fsdp2 = fsdp2_modules(wrapper)
    if fsdp2:  # FSDP2 gathers whole or not at all (see fsdp2_gathered; mgsr/fsdp2.py refuses "layer")
        with fsdp2_gathered(fsdp2):
            yield
        return
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
