"""LightningDataModule over the synthetic task or MiniLLM-format JSONL files, with a train loader that
resumes exactly mid-epoch from a checkpoint."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator

import lightning
import torch
from torch import distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mgsr.data.collate import Collator, encode_records
from mgsr.data.jsonl import load_jsonl_records, normalise_record
from mgsr.data.prompt import format_records
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


class EpochPermutationSampler(DistributedSampler):
    """Yields this rank's share of ``randperm(n, seed + epoch)`` (or ``range(n)`` unshuffled) from position
    `skip` on.

    The order is a pure function of (seed, epoch, rank, world size), which is what makes mid-epoch
    resumption exact. With W processes (`num_replicas`, default: the torch.distributed world size, 1 when
    not initialised) the epoch's order is padded with its own first indices to a multiple of W and rank r
    takes positions r, r+W, r+2W, ... (DistributedSampler's layout): every rank gets ceil(n / W) indices,
    so all ranks run the same number of steps, and the first k samples of all ranks together are exactly
    the first k*W of the single-process order (a DDP step with per-rank batch b sees the single-process
    batch of size b*W). It subclasses DistributedSampler only so that Lightning keeps it as is under
    DDP/FSDP instead of wrapping it (which would lose the resumable position); rank and world size are
    read lazily, once the process group exists.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, num_replicas: int | None = None,
                 rank: int | None = None):  # DistributedSampler.__init__ is not called: it needs a process group
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.skip = 0, 0
        self._num_replicas, self._rank = num_replicas, rank

    @property
    def num_replicas(self) -> int:
        if self._num_replicas is not None:
            return self._num_replicas
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        if self._rank is not None:
            return self._rank
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls it; the loader sets epoch and skip itself
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            full = list(range(self.n))
        else:
            full = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        world = self.num_replicas
        if world == 1:
            return full
        total = len(self) * world
        full = (full * (total // max(len(full), 1) + 1))[:total]  # pad with the epoch's own first indices
        return full[self.rank : total : world]

    def __iter__(self) -> Iterator[int]:
        yield from self.order(self.epoch)[self.skip :]

    def __len__(self) -> int:
        return -(-self.n // self.num_replicas)  # this rank's full epoch: Lightning counts resumed batches against it


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position in training (epoch, batches already yielded in it) is resumable.

    Epoch e visits ``randperm(n, generator seeded with seed + e)`` (``range(n)`` when not shuffling); the
    order is a pure function of (seed, epoch), so a resumed run can continue mid-epoch exactly. Where an
    iteration starts is decided lazily, at its first ``next()``:

    1. `position_fn()`, when given and not None: ``(epoch, batches_done)`` read from the trainer at that
       moment (see `DistillDataModule`). Lightning's own loop counters are then the single source of truth,
       which keeps resumption exact from any checkpoint (mid-epoch, last batch, end of epoch; epoch- or
       step-bounded training), however Lightning chooses to restart its loops;
    2. else a state given to `load_state_dict` (the saved epoch, after its `batches_yielded` batches; a
       finished epoch continues with the next one);
    3. else the epoch after the previous iteration's (0 for the first).

    ``state_dict()`` is ``{"epoch", "batches_yielded"}``; Lightning stores it in the checkpoint (under
    ``loops.fit_loop.state_dict.combined_loader``) since the loader defines both methods, and loads it back
    when it restarts a run mid-epoch. Under DDP/FSDP each rank iterates its own shard (see
    `EpochPermutationSampler`) and the position counts that rank's batches.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int = 1,
        *,
        seed: int = 0,
        shuffle: bool = True,
        position_fn: Callable[[], tuple[int, int] | None] | None = None,
        **kwargs,
    ):
        sampler = EpochPermutationSampler(len(dataset), seed=seed, shuffle=shuffle)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self.seed, self.shuffle, self.position_fn = seed, shuffle, position_fn
        self._epoch = -1  # epoch of the iteration in progress; -1 before the first
        self._batches_yielded = 0
        self._resume: tuple[int, int] | None = None

    def __iter__(self) -> Iterator:
        return _EpochIterator(self)

    def _start_iteration(self) -> Iterator:
        pos = self.position_fn() if self.position_fn is not None else None
        if pos is not None:
            epoch, skip = pos
            self._resume = None
        elif self._resume is not None:
            (epoch, skip), self._resume = self._resume, None
        else:
            epoch, skip = self._epoch + 1, 0
        self._epoch, self._batches_yielded = epoch, skip
        self.sampler.epoch, self.sampler.skip = epoch, skip * self.batch_size
        return DataLoader.__iter__(self)

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


class _EpochIterator:
    """One pass of a `ResumableDataLoader`, started at the first ``next()`` and counting yielded batches."""

    def __init__(self, loader: ResumableDataLoader):
        self.loader = loader
        self.inner: Iterator | None = None

    def __iter__(self) -> _EpochIterator:
        return self

    def __next__(self):
        if self.inner is None:
            self.inner = self.loader._start_iteration()
        batch = next(self.inner)
        self.loader._batches_yielded += 1  # counted when handed out: a state saved while it is used counts it
        return batch


class DistillDataModule(lightning.LightningDataModule):
    """Prompts + gold responses in the canonical batch layout (`mgsr.data.collate`).

    ``source="synthetic"``: the embedded task (`make_synthetic_splits(seed, n_train, n_val, n_test)`).
    ``source="jsonl"``: MiniLLM-format files; `train_file`/`val_file`/`test_file` are relative to `path`
    (unless absolute) and default to the Dolly file names. Only the splits a stage needs are loaded.
    `prompt_format`: `alpaca` (the files' prompts) or `chat` (the tokenizer's chat template, see
    `mgsr.data.prompt.format_records`).

    After ``setup()``: ``self.records[split]`` are the normalised records kept (aligned with the dataset,
    each with `prompt` and `references`), ``self.stats[split]`` counts dropped rows by reason
    (JSONL skip reasons and "prompt_too_long").

    The train loader is a `ResumableDataLoader` that reads its position from the trainer while fitting,
    so ``trainer.fit(..., datamodule=dm, ckpt_path=...)`` replays exactly the batches an uninterrupted run
    would have seen, from any checkpoint (tested in tests/test_data_synthetic.py). Pass the datamodule, not
    its loaders, to `Trainer.fit`: a bare loader falls back to its checkpointed state_dict, which is exact
    for mid-epoch checkpoints but not for ones saved in ``on_train_epoch_end``.
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
        label_noise: float = 0.0,
        prompt_format: str = "alpaca",
        shuffle_seed: int | None = None,
    ):
        super().__init__()
        if source not in ("synthetic", "jsonl"):
            raise ValueError(f"data.source must be 'synthetic' or 'jsonl', got {source!r}")
        self.tokenizer = tokenizer
        self.source, self.path = source, path
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.seed, self.n = seed, {"train": n_train, "val": n_val, "test": n_test}
        # the training loader's order; None: `seed` (the data seed). The SFT stages always pass None: their cache
        # keys do not hold the order.
        self.shuffle_seed = seed if shuffle_seed is None else int(shuffle_seed)
        self.label_noise = float(label_noise or 0.0)
        if self.label_noise and source != "synthetic":
            raise ValueError("data.label_noise applies to the synthetic task only; set it to 0 for JSONL data")
        self.max_prompt_len, self.max_len = max_prompt_len, max_len
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.max_records = {"train": max_train_records, "val": max_eval_records, "test": max_eval_records}
        self.prompt_format = prompt_format  # alpaca | chat (mgsr.data.prompt); chat wants use_prompt_format first
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.collator = Collator(pad)
        self.records: dict[str, list[dict]] = {}
        self.datasets: dict[str, FeatureDataset] = {}
        self.stats: dict[str, dict[str, int]] = {}
        self._synthetic: dict[str, list[dict]] | None = None

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
            self._synthetic = make_synthetic_splits(self.seed, self.n["train"], self.n["val"], self.n["test"],
                                                    label_noise=self.label_noise)
        rows = self._synthetic[split][:limit]
        # not a dropped row: counted so results.json says how noisy the training data was
        stats = Counter({"noisy_response_kept": sum(1 for r in rows if r.get("noisy"))}) if split == "train" \
            and self.label_noise else Counter()
        return [normalise_record(r)[0] for r in rows], stats

    def _setup_split(self, split: str) -> None:
        records, dropped = self._raw_records(split)
        records = format_records(records, self.tokenizer, self.prompt_format)
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
        noisy = self.stats[split].get("noisy_response_kept")
        log.info("%s split: %d records (dropped %s)%s", split, len(kept),
                 {k: v for k, v in self.stats[split].items() if k != "noisy_response_kept"} or "none",
                 f", {noisy} with a corrupted response (data.label_noise={self.label_noise})" if noisy else "")

    def setup(self, stage: str | None = None) -> None:
        for split in _STAGE_SPLITS.get(stage, SPLITS) if stage else SPLITS:
            if split not in self.datasets:
                self._setup_split(split)

    def set_train_responses(self, responses: list[list[int]]) -> None:
        """Train on these response ids instead of the gold ones (SeqKD: the teacher's samples), one per
        training record in order; prompts, validation and test are unchanged."""
        self.setup("fit")
        features = self.datasets["train"].features
        if len(responses) != len(features):
            raise ValueError(f"got {len(responses)} responses for {len(features)} training records")
        self.datasets["train"] = FeatureDataset([dict(f, response_ids=list(r)) for f, r in zip(features, responses)])

    def train_dataloader(self) -> ResumableDataLoader:
        self.setup("fit")
        loader = ResumableDataLoader(self.datasets["train"], batch_size=self.batch_size, seed=self.shuffle_seed,
                                     shuffle=True,
                                     collate_fn=self.collator, num_workers=self.num_workers,
                                     position_fn=self._trainer_position)
        return loader

    def _trainer_position(self) -> tuple[int, int] | None:
        """(epoch, batches already trained in it) from the fitting trainer; None outside `Trainer.fit`.

        Read at the first fetch of an epoch, when the epoch loop's `batch_progress.current.ready` is the
        number of batches it has run in that epoch (0 on a fresh epoch, k when resumed after k).
        """
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return None
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.ready

    def _eval_loader(self, split: str) -> DataLoader:
        if split not in self.datasets:
            self._setup_split(split)
        return DataLoader(self.datasets[split], batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=self.collator, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

