"""Data layer: the prompt template, the embedded synthetic task, JSONL loading, tokenizer, collation and
the LightningDataModule."""

from mgsr.data.collate import Collator, encode_record, encode_records
from mgsr.data.datamodule import DistillDataModule, ResumableDataLoader
from mgsr.data.jsonl import LoadResult, load_jsonl_records, normalise_record
from mgsr.data.prompt import build_prompt
from mgsr.data.synthetic import make_synthetic_splits, synthetic_corpus
from mgsr.data.tokenizer import build_tokenizer, load_or_build_tokenizer

__all__ = [
    "Collator",
    "DistillDataModule",
    "LoadResult",
    "ResumableDataLoader",
    "build_prompt",
    "build_tokenizer",
    "encode_record",
    "encode_records",
    "load_jsonl_records",
    "load_or_build_tokenizer",
    "make_synthetic_splits",
    "normalise_record",
    "synthetic_corpus",
]
