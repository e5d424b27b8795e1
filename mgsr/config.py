"""Configuration basics every layer uses: the user-facing error type, container conversion, and the message for
removed override names. The checks of a composed config live in `mgsr.build.validate`."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A user-facing configuration mistake (printed as one line by the entry points)."""


def to_container(node):
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


# Override groups that were folded into `loss/distill` (one way to choose a loss): old name -> new option name.
_OLD_DIVERGENCE_LOSSES = ("fkl", "rkl", "skl", "jsd", "tvd", "sfkl", "srkl", "akl")
_RENAMED = {
    "distill": lambda v: v,
    "clip": lambda v: "dac_kl" if v == "learnable" else f"dac_kl_{v}",
    "dac": lambda v: "dac_kl" if v == "full" else f"dac_kl_{v}",
}


def renamed_override(args) -> str | None:
    """The one-line message for a command-line override of a removed config group (`distill=`, `clip=`, `dac=`,
    `loss=<divergence>`), naming the override that replaces it; None when there is none."""
    for arg in args:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep:
            continue
        values = value.split(",")
        if key in _RENAMED:
            new = ",".join(_RENAMED[key](v) for v in values)
            return f"{arg}: the {key} group was folded into loss/distill; use loss/distill={new}"
        if key == "loss" and any(v in _OLD_DIVERGENCE_LOSSES for v in values):
            return (f"{arg}: pure distillation with a divergence is now loss=distill_only loss/distill={value} "
                    "(loss= chooses the objective: mgsr, kd, sft, distill_only)")
    return None
