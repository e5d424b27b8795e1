"""The run's tokenizer: the named one (`model.tokenizer`, else the student's), or offline a BPE trained on the
run's training text and cached by what determines it; and the facts about the training data that its cache
key (and every SFT stage's, `mgsr.build.data.data_identity`) is made of."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from omegaconf import DictConfig

from mgsr.config import ConfigError
from mgsr.data.datamodule import DOLLY_FILES
from mgsr.data.synthetic import SYNTHETIC_VERSION, make_synthetic_splits, synthetic_corpus
from mgsr.data.tokenizer import load_or_build_tokenizer
from mgsr.models import load_tokenizer
from mgsr.sft_stage import stable_hash


def build_tokenizer(cfg: DictConfig):
    spec = cfg.model.tokenizer
    if spec.get("name_or_path"):
        return load_tokenizer(spec.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.model.student.get("name_or_path"):
        return load_tokenizer(cfg.model.student.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    # Offline: a BPE trained on the run's training text (the synthetic corpus, or the train split's prompt +
    # output for JSONL data such as Dolly), cached by what determines it.
    vocab = int(cfg.data.get("tokenizer_vocab_size") or spec.vocab_size)
    if cfg.data.source == "jsonl":
        path = train_file(cfg)
        key = stable_hash({"vocab": vocab, "source": "jsonl", "train": file_digest(path)})
        texts = lambda: _jsonl_corpus(path)  # noqa: E731
    else:  # the teacher's corpus is a superset of the run's split: one tokenizer covers both
        n = max(int(cfg.data.n_train), teacher_corpus_size(cfg) or 0)
        key = stable_hash({"vocab": vocab, "data_seed": cfg.data.seed, "n_train": n, "generator": SYNTHETIC_VERSION})
        texts = lambda: synthetic_corpus(make_synthetic_splits(cfg.data.seed, n, 0, 0)["train"])  # noqa: E731
    return load_or_build_tokenizer(str(Path(cfg.cache_dir) / f"tokenizer-{key}"), texts, vocab)


def train_file(cfg: DictConfig) -> str:
    name = cfg.data.get("train_file") or DOLLY_FILES["train"]
    return name if os.path.isabs(name) or not cfg.data.get("path") else os.path.join(cfg.data.path, name)


def teacher_corpus_size(cfg: DictConfig) -> int | None:
    """Synthetic data only: the size of the teacher's own training corpus (its "pretraining", a longer draw of
    the same train prompt space whose first `data.n_train` records are the run's split); None: the run's split."""
    n = (cfg.model.get("teacher_sft") or {}).get("n_train")
    return int(n) if n and cfg.data.source != "jsonl" else None


def file_digest(path: str) -> str:
    if not os.path.isfile(path):
        raise ConfigError(f"training data file not found: {path} (set data.path / data.train_file)")
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def _jsonl_corpus(path: str):
    """Prompt + output texts of every usable training row (all of them, whatever max_train_records says,
    so one cached tokenizer serves runs of any length)."""
    from mgsr.data.jsonl import load_jsonl_records

    for rec in load_jsonl_records(path).records:
        yield rec["prompt"] + rec["references"][0]
