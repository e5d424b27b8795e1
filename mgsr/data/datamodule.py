"""LightningDataModule over the synthetic task or MiniLLM-format JSONL files, with a train loader that
resumes exactly mid-epoch from a checkpoint."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator

import lightning
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mgsr.data.collate import Collator, encode_records
from mgsr.data.jsonl import load_jsonl_records, normalise_record
from mgsr.data.synthetic import make_synthetic_splits

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DOLLY_FILES = {"train": "minillm_train.jsonl", "val": "minillm_dev.jsonl", "test": "minillm_test.jsonl"}
_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


class FeatureDataset(Dataset):
    """A list of encoded feature dicts (see `mgsr.data.collate.encode_record`)."""

    def __init__(self, features: list[dict]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict:
        return self.features[i]


class EpochPermutationSampler(Sampler[int]):
    """Yields ``randperm(n, seed + epoch)`` (or ``range(n)`` unshuffled) from position `skip` on.

    The order is a pure function of (seed, epoch), which is what makes mid-epoch resumption exact.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.skip = 0, 0

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def __iter__(self) -> Iterator[int]:
        yield from self.order(self.epoch)[self.skip :]

    def __len__(self) -> int:
        return self.n  # the full epoch: Lightning counts resumed batches against it


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position (epoch, batches yielded in it) is checkpointable.

    Every ``iter()`` starts a new epoch (0, 1, 2, ...) with the permutation ``randperm(n, seed + epoch)``,
    unless `load_state_dict` was called since: then the next ``iter()`` continues the saved epoch, skipping
    the batches it had already yielded, so an interrupted run sees exactly the batches an uninterrupted one
    would. Lightning's fit loop saves ``state_dict()`` of a train loader that has both methods in the
    checkpoint (``loops.fit_loop.state_dict.combined_loader``) and restores it before the first ``iter()``
    of a resumed mid-epoch run; `DistillDataModule` also carries the state, which covers resumption from an
    end-of-epoch checkpoint. Single-process sampling only (no DistributedSampler).
    """

    def __init__(self, dataset: Dataset, batch_size: int = 1, *, seed: int = 0, shuffle: bool = True, **kwargs):
        sampler = EpochPermutationSampler(len(dataset), seed=seed, shuffle=shuffle)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self.seed, self.shuffle = seed, shuffle
        self._epoch = -1  # epoch of the iteration in progress; -1 before the first
        self._batches_yielded = 0
        self._resume: tuple[int, int] | None = None

    def __iter__(self) -> Iterator:
        if self._resume is not None:
            epoch, skip = self._resume
            self._resume = None
        else:
            epoch, skip = self._epoch + 1, 0
        self._epoch, self._batches_yielded = epoch, skip
        self.sampler.epoch, self.sampler.skip = epoch, skip * self.batch_size
        return self._counted(super().__iter__())

    def _counted(self, it: Iterator) -> Iterator:
        for batch in it:
            self._batches_yielded += 1  # before the yield: a state saved while the batch is used counts it
            yield batch

    def state_dict(self) -> dict[str, int]:
        if self._resume is not None:
            return {"epoch": self._resume[0], "batches_yielded": self._resume[1]}
        if self._epoch < 0:
            return {"epoch": 0, "batches_yielded": 0}
        return {"epoch": self._epoch, "batches_yielded": self._batches_yielded}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        epoch, done = int(state_dict["epoch"]), int(state_dict["batches_yielded"])
        if done >= len(self):  # that epoch was finished: the next iteration starts the following one
            epoch, done = epoch + 1, 0
        self._resume = (epoch, done)


class DistillDataModule(lightning.LightningDataModule):
    """Prompts + gold responses in the canonical batch layout (`mgsr.data.collate`).

    ``source="synthetic"``: the embedded task (`make_synthetic_splits(seed, n_train, n_val, n_test)`).
    ``source="jsonl"``: MiniLLM-format files; `train_file`/`val_file`/`test_file` are relative to `path`
    (unless absolute) and default to the Dolly file names. Only the splits a stage needs are loaded.

    After ``setup()``: ``self.records[split]`` are the normalised records kept (aligned with the dataset,
    each with `prompt` and `references`), ``self.stats[split]`` counts dropped rows by reason
    (JSONL skip reasons and "prompt_too_long").
    """

    def __init__(
        self,
        tokenizer,
        source: str = "synthetic",
        path: str | None = None,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        seed: int = 0,
        n_train: int = 4000,
        n_val: int = 200,
        n_test: int = 200,
        max_prompt_len: int = 256,
        max_len: int = 512,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        max_train_records: int | None = None,
        max_eval_records: int | None = None,
    ):
        super().__init__()
        if source not in ("synthetic", "jsonl"):
            raise ValueError(f"data.source must be 'synthetic' or 'jsonl', got {source!r}")
        self.tokenizer = tokenizer
        self.source, self.path = source, path
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.seed, self.n = seed, {"train": n_train, "val": n_val, "test": n_test}
        self.max_prompt_len, self.max_len = max_prompt_len, max_len
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.max_records = {"train": max_train_records, "val": max_eval_records, "test": max_eval_records}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.collator = Collator(pad)
        self.records: dict[str, list[dict]] = {}
        self.datasets: dict[str, FeatureDataset] = {}
        self.stats: dict[str, dict[str, int]] = {}
        self._synthetic: dict[str, list[dict]] | None = None
        self._train_loader: ResumableDataLoader | None = None
        self._pending_train_state: dict | None = None

    def split_path(self, split: str) -> str:
        name = self.files[split] or DOLLY_FILES[split]
        if os.path.isabs(name) or self.path is None:
            return name
        return os.path.join(self.path, name)

    def _raw_records(self, split: str) -> tuple[list[dict], Counter]:
        limit = self.max_records[split]
        if self.source == "jsonl":
            res = load_jsonl_records(self.split_path(split), max_records=limit)
            return res.records, Counter(res.skipped)
        if self._synthetic is None:
            self._synthetic = make_synthetic_splits(self.seed, self.n["train"], self.n["val"], self.n["test"])
        rows = self._synthetic[split][:limit]
        return [normalise_record(r)[0] for r in rows], Counter()

    def _setup_split(self, split: str) -> None:
        records, dropped = self._raw_records(split)
        features = encode_records(self.tokenizer, records, max_prompt_len=self.max_prompt_len,
                                  max_len=self.max_len, train=split == "train")
        kept = [(r, f) for r, f in zip(records, features) if f is not None]
        if len(kept) < len(records):
            dropped["prompt_too_long"] += len(records) - len(kept)
            log.warning("%s: dropped %d records whose prompt exceeds %d tokens", split, len(records) - len(kept),
                        self.max_prompt_len)
        if not kept:
            raise ValueError(f"{split} split has no usable records (dropped: {dict(dropped)})")
        self.records[split] = [r for r, _ in kept]
        self.datasets[split] = FeatureDataset([f for _, f in kept])
        self.stats[split] = dict(sorted(dropped.items()))
        log.info("%s split: %d records (dropped %s)", split, len(kept), self.stats[split] or "none")

    def setup(self, stage: str | None = None) -> None:
        for split in _STAGE_SPLITS.get(stage, SPLITS) if stage else SPLITS:
            if split not in self.datasets:
                self._setup_split(split)

    def train_dataloader(self) -> ResumableDataLoader:
        self.setup("fit")
        loader = ResumableDataLoader(self.datasets["train"], batch_size=self.batch_size, seed=self.seed, shuffle=True,
                                     collate_fn=self.collator, num_workers=self.num_workers)
        if self._pending_train_state is not None:
            loader.load_state_dict(self._pending_train_state)
            self._pending_train_state = None
        self._train_loader = loader
        return loader

    def _eval_loader(self, split: str) -> DataLoader:
        if split not in self.datasets:
            self._setup_split(split)
        return DataLoader(self.datasets[split], batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=self.collator, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def state_dict(self) -> dict:
        """The train loader's position, so that even a resumption Lightning does not treat as mid-epoch
        (an end-of-epoch checkpoint) continues with the next epoch's permutation."""
        if self._pending_train_state is not None:
            return {"train_loader": dict(self._pending_train_state)}
        if self._train_loader is not None:
            return {"train_loader": self._train_loader.state_dict()}
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        # applied to the loader the next train_dataloader() call builds (Lightning restores the datamodule
        # before it requests the loader)
        if "train_loader" in state_dict:
            self._pending_train_state = dict(state_dict["train_loader"])
