"""Sharded (FSDP2) checkpoints: Lightning's directory layout of `torch.distributed.checkpoint` shards plus
`meta.pt`, read back into a sharded module (resume) or whole into one process (export). No Lightning import, so
config validation can recognise such a checkpoint cheaply."""

from __future__ import annotations

from pathlib import Path

import torch

METADATA = "meta.pt"  # Lightning's name for the non-tensor part; rank 0 writes it after every shard is written


def load_sharded(model, optimizers, path: Path, *, skip_prefix: str) -> dict:
    """Load a Lightning sharded checkpoint into the sharded `model` and its optimizers, except the keys starting
    with `skip_prefix` (not stored); returns the metadata (`meta.pt`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = {k: v for k, v in get_model_state_dict(model).items() if not k.startswith(skip_prefix)}
    dcp.load({"state_dict": state}, checkpoint_id=path)
    missing = set_model_state_dict(model, state, options=StateDictOptions(strict=False)).missing_keys
    unexpected = [k for k in missing if not k.startswith(skip_prefix)]
    if unexpected:
        raise RuntimeError(f"sharded checkpoint {path} lacks {unexpected[:5]}")
    for i, optimizer in enumerate(optimizers):
        optim_state = {f"optimizer_{i}": get_optimizer_state_dict(model, optimizer)}
        dcp.load(optim_state, checkpoint_id=path)
        set_optimizer_state_dict(model, optimizer, optim_state_dict=optim_state[f"optimizer_{i}"],
                                 options=StateDictOptions(cpu_offload=True))
    return torch.load(path / METADATA, weights_only=True)  # as every checkpoint load here: tensors, primitives


def is_sharded_checkpoint(path) -> bool:
    return Path(path).is_dir() and (Path(path) / METADATA).is_file()


def load_student_state(path) -> dict[str, torch.Tensor]:
    """The student's whole weights (keys without `student.`) from a sharded checkpoint, read in this process
    alone (no process group needed)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    # the public `dcp.load` fills only the keys it is given (none here); this is how torch's own
    # format_utils.dcp_to_torch_save rebuilds a whole state dict from the checkpoint's metadata
    state: dict = {}
    _load_state_dict(state, storage_reader=FileSystemReader(str(path)),
                     planner=_EmptyStateDictLoadPlanner(keys={"state_dict"}), no_dist=True)
    return {k[len("student."):]: v for k, v in state["state_dict"].items() if k.startswith("student.")}
