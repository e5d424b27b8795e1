"""Dolly's MiniLLM split from the Hugging Face hub, for machines without a local copy.

The hub dataset `MiniLLM/dolly` holds `raw.jsonl` (12,435 rows: MiniLLM's processing takes the first 1,000 as
the validation split, `--dev-num 1000`, and the rest, 11,435, as training) and `valid.jsonl` (the 500-row
Dolly evaluation set). `fetch_minillm_dolly` writes them under the file names `conf/data/dolly.yaml` reads,
so the same datamodule serves a local copy and the hub. The training rows come in raw.jsonl's order (the
local copy is in MiniLLM's processed order; the set of rows is the same).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mgsr.data.datamodule import DOLLY_FILES

log = logging.getLogger(__name__)

DEV_NUM = 1000  # MiniLLM process_data_dolly --dev-num


def split_minillm_raw(raw_path: str, valid_path: str, out_dir: str, dev_num: int = DEV_NUM) -> Path:
    """Write `out_dir`/minillm_{train,dev,test}.jsonl: dev = the first `dev_num` non-blank lines of raw.jsonl,
    train = the rest, test = valid.jsonl. Lines are copied unchanged (malformed ones are the loader's job)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(raw_path, encoding="utf-8") as f:
        lines = [line if line.endswith("\n") else line + "\n" for line in f if line.strip()]
    if len(lines) <= dev_num:
        raise ValueError(f"{raw_path}: {len(lines)} rows, need more than dev_num={dev_num}")
    tmp = {split: out / (name + ".tmp") for split, name in DOLLY_FILES.items()}
    tmp["val"].write_text("".join(lines[:dev_num]), encoding="utf-8")
    tmp["train"].write_text("".join(lines[dev_num:]), encoding="utf-8")
    tmp["test"].write_bytes(Path(valid_path).read_bytes())
    for split, name in DOLLY_FILES.items():  # complete files only: an interrupted run leaves no half split
        os.replace(tmp[split], out / name)
    return out


def fetch_minillm_dolly(repo_id: str, cache_dir: str, revision: str | None = None) -> Path:
    """Download MiniLLM's Dolly files from the hub (once) and return a directory in the local layout."""
    out = Path(cache_dir) / ("hub-" + repo_id.replace("/", "--") + (f"@{revision}" if revision else ""))
    if all((out / name).is_file() for name in DOLLY_FILES.values()):
        return out
    from huggingface_hub import hf_hub_download

    log.info("downloading %s (raw.jsonl, valid.jsonl) from the hub into %s", repo_id, out)
    raw = hf_hub_download(repo_id, "raw.jsonl", repo_type="dataset", revision=revision)
    valid = hf_hub_download(repo_id, "valid.jsonl", repo_type="dataset", revision=revision)
    return split_minillm_raw(raw, valid, str(out))
