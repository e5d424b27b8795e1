"""A student that is its teacher with fewer transformer blocks (layer pruning as initialisation).

The pruned model keeps the teacher's embeddings (and GPT-2's learned positions), final norm and LM head, and
the kept blocks in their original order; the others are dropped. It is rebuilt from the teacher's config with
the new depth, so per-layer bookkeeping (each attention's `layer_idx` into the KV cache, Llama's
`layer_types`) is renumbered by transformers itself rather than patched here.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from transformers import AutoModelForCausalLM

from mgsr.config import ConfigError


def spread_layers(n_layers: int, count: int) -> list[int]:
    """`count` block indices spread evenly over `n_layers`, the first and the last always among them."""
    if not 1 <= count <= n_layers:
        raise ConfigError(f"model.student.keep_layers={count}: need 1 <= keep_layers <= {n_layers} (the teacher's "
                          "blocks)")
    if count == 1:
        return [0]
    return [round(i * (n_layers - 1) / (count - 1)) for i in range(count)]


def kept_layers(n_layers: int, keep: int | Sequence[int]) -> list[int]:
    """Block indices to keep: a count (see `spread_layers`) or an explicit increasing list."""
    if isinstance(keep, int):
        return spread_layers(n_layers, keep)
    keep = [int(i) for i in keep]
    if not keep or keep != sorted(set(keep)) or keep[0] < 0 or keep[-1] >= n_layers:
        raise ConfigError(f"model.student.keep_layers={keep}: need distinct increasing block indices in "
                          f"[0, {n_layers - 1}]")
    return keep


def _blocks_prefix(model) -> str:
    """State-dict prefix of the block list (`transformer.h` in GPT-2, `model.layers` in Llama, ...)."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return name
    raise ValueError(f"{type(model).__name__}: no list of {n} blocks found to prune")


def prune_layers(model, keep: int | Sequence[int]):
    """A new model: `model` with only the blocks `keep` (see `kept_layers`); `model` is left unchanged."""
    n = model.config.num_hidden_layers
    idx = kept_layers(n, keep)
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(idx)  # GPT-2's n_layer through its attribute map
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in idx]
    prefix = _blocks_prefix(model) + "."
    new_of_old = {old: new for new, old in enumerate(idx)}
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefix):
            old, _, rest = key[len(prefix):].partition(".")
            if int(old) not in new_of_old:
                continue
            key = f"{prefix}{new_of_old[int(old)]}.{rest}"
        state[key] = value
    dtype = next(model.parameters()).dtype
    pruned = AutoModelForCausalLM.from_config(config, dtype=dtype)
    pruned.load_state_dict(state, strict=True)
    return pruned.to(next(model.parameters()).device)


def check_prune_depth(cfg) -> None:
    """`model.student.keep_layers` against the teacher's depth, read from its config alone (no weights)."""
    spec = cfg.model.student
    if spec.get("init") != "prune":
        return
    from omegaconf import OmegaConf
    from transformers import AutoConfig

    name = cfg.model.teacher.name_or_path
    try:
        teacher = AutoConfig.from_pretrained(name, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.student.init=prune: cannot read the teacher's config at {name} "
                          f"({type(e).__name__}); point model.teacher.name_or_path at a model") from None
    keep = spec.keep_layers
    kept_layers(teacher.num_hidden_layers, OmegaConf.to_container(keep) if OmegaConf.is_config(keep) else keep)
