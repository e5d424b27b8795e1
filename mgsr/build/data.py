"""The run's data: what identifies the training split (the SFT stages' cache keys), the datamodule, the final
evaluation's sets, and the checks that need the split's size."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mgsr.build.tokenizer import file_digest, train_file
from mgsr.config import ConfigError, to_container
from mgsr.data.datamodule import DOLLY_FILES, DistillDataModule
from mgsr.data.prompt import format_records
from mgsr.data.synthetic import SYNTHETIC_VERSION

log = logging.getLogger("mgsr")


def data_identity(cfg: DictConfig, n_train: int | None = None, label_noise: float | None = None) -> dict:
    """What determines the training split's token sequences: the key part of every cached SFT stage. Batch
    size, workers and the eval splits do not change the training data, so they are not in it."""
    d = cfg.data
    label_noise = float(d.get("label_noise") or 0.0) if label_noise is None else float(label_noise)
    ident = {"source": d.source, "max_len": int(d.max_len), "max_prompt_len": int(d.max_prompt_len),
             "prompt_format": d.get("prompt_format")}
    if d.source == "jsonl":
        ident |= {"train": file_digest(train_file(cfg)), "max_train_records": d.get("max_train_records")}
    else:
        ident |= {"seed": int(d.seed), "n_train": int(n_train or d.n_train), "generator": SYNTHETIC_VERSION,
                  "max_train_records": d.get("max_train_records"), "label_noise": label_noise}
    return ident


# data-config keys that describe the run rather than the datamodule (see conf/data/dolly.yaml)
DATA_RUN_KEYS = ("tokenizer_vocab_size", "eval_sets", "hub")


def resolve_data_path(cfg: DictConfig) -> None:
    """JSONL data with `data.hub` set and no local copy at `data.path`: download MiniLLM's split from the hub
    into the cache (mgsr/data/hub.py) and point `data.path` there. A local copy always wins."""
    d = cfg.data
    if d.source != "jsonl" or not d.get("hub") or (d.get("path") and Path(d.path).is_dir()):
        return
    from omegaconf import open_dict

    from mgsr.data.hub import fetch_minillm_dolly

    try:
        path = fetch_minillm_dolly(d.hub, cfg.cache_dir)
    except Exception as e:  # noqa: BLE001 - offline, no such repo, ...: one line saying what to set
        raise ConfigError(f"data.path={d.get('path')} not found and fetching {d.hub} from the hub failed "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          "point data.path at a local copy") from None
    log.info("data: no local copy at %s, using %s from the hub (%s)", d.get("path"), d.hub, path)
    with open_dict(cfg):
        cfg.data.path = str(path)
        dolly = cfg.get("sets", {}).get("dolly")
        if dolly is not None and not Path(dolly.path).is_file():  # the Dolly eval set is that split's test file
            dolly.path = str(path / DOLLY_FILES["test"])


def build_datamodule(cfg: DictConfig, tokenizer, **overrides) -> DistillDataModule:
    d = {k: v for k, v in to_container(cfg.data).items() if not k.startswith("_") and k not in DATA_RUN_KEYS}
    d.update(overrides)
    return DistillDataModule(tokenizer=tokenizer, **d)


def eval_sets(dm: DistillDataModule, cfg: DictConfig | None = None) -> tuple[dict[str, list[dict]], dict, dict]:
    """The final evaluation's sets: (records per set, display labels, skipped-row counts).

    Names come from `eval.sets`, else the data config's `eval_sets` (data=dolly: the paper's five), and are
    looked up in the `sets` registry shared with evaluate.py (conf/sets/); "test" (the default) is the
    datamodule's test split. Missing files fail here, which `run` calls before training."""
    names = (cfg.eval.get("sets") or cfg.data.get("eval_sets")) if cfg is not None else None
    names = list(names or ["test"])
    sets, labels, skipped = {}, {}, {}
    others = [n for n in names if n != "test"]
    if others:
        from mgsr.evaluation.entry import load_eval_sets

        registry = cfg.get("sets") or {}
        loaded = load_eval_sets(OmegaConf.create({"eval_sets": others, "sets": to_container(registry)}))
        sets, labels, skipped = (dict(x) for x in loaded)
        sets = {k: format_records(v, dm.tokenizer, dm.prompt_format) for k, v in sets.items()}
    out = ({}, {}, {})
    for name in names:  # keep the requested order
        if name == "test":
            if "test" not in dm.records:
                dm.setup("test")
            out[0]["test"], out[1]["test"], out[2]["test"] = dm.records["test"], "test", dm.stats.get("test", {})
        else:
            out[0][name], out[1][name], out[2][name] = sets[name], labels[name], skipped[name]
    return out


def check_epoch_length(cfg: DictConfig, n_train: int) -> None:
    """Lightning would only say this after the models load (or, for max_epochs, not at all)."""
    t = cfg.trainer
    batches = -(-n_train // int(cfg.data.batch_size))  # per epoch, single process
    vci = t.get("val_check_interval")
    if isinstance(vci, int) and t.get("check_val_every_n_epoch") is not None and vci > batches:
        raise ConfigError(f"trainer.val_check_interval={vci} is more than the {batches} batches of one epoch; lower "
                          "it or set trainer.check_val_every_n_epoch=null to count batches across epochs")
    max_steps, max_epochs = int(t.get("max_steps") or -1), t.get("max_epochs")
    epoch_steps = -(-batches // int(t.get("accumulate_grad_batches") or 1))  # a partial accumulation steps too
    if max_steps > 0 and max_epochs is not None and 0 < int(max_epochs) * epoch_steps < max_steps:
        log.warning("trainer.max_epochs=%s stops training after %d steps, before trainer.max_steps=%d "
                    "(set trainer.max_epochs=-1 to train for max_steps)", max_epochs, int(max_epochs) * epoch_steps,
                    max_steps)
