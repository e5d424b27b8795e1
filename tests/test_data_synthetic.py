"""The embedded synthetic task, the datamodule over it, and exact mid-epoch resumption of its train loader
(standalone and through Lightning checkpoints)."""

import functools
import logging
import re
import warnings
from collections import Counter

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from mgsr.data.datamodule import (
    DistillDataModule,
    EpochPermutationSampler,
    FeatureDataset,
    ResumableDataLoader,
)
from mgsr.data.synthetic import (
    FAMILIES,
    build_prompt,  # the synthetic task's short template
    make_synthetic_splits,
    synthetic_corpus,
)
from mgsr.data.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def splits():
    return make_synthetic_splits(seed=0)


@pytest.fixture(scope="module")
def tok(splits):
    return build_tokenizer(synthetic_corpus(splits["train"][:600]), vocab_size=800)


def _outputs(rec) -> list[str]:
    return rec["output"] if isinstance(rec["output"], list) else [rec["output"]]


def test_sizes_and_fields(splits):
    assert {k: len(v) for k, v in splits.items()} == {"train": 4000, "val": 200, "test": 200}
    for rec in (r for v in splits.values() for r in v):
        assert set(rec) == {"instruction", "input", "output", "prompt", "family"}
        assert rec["prompt"] == build_prompt(rec["instruction"], rec["input"])
        assert all(isinstance(o, str) and o for o in _outputs(rec))


def test_deterministic_for_a_seed_and_seeds_differ(splits):
    assert make_synthetic_splits(seed=0) == splits
    other = make_synthetic_splits(seed=1)
    assert [r["prompt"] for r in other["train"][:50]] != [r["prompt"] for r in splits["train"][:50]]
    assert [r["prompt"] for r in other["test"]] != [r["prompt"] for r in splits["test"]]


def test_splits_share_no_prompt(splits):
    prompts = {k: {r["prompt"] for r in v} for k, v in splits.items()}
    assert not prompts["train"] & prompts["val"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]
    # eval prompts are unique within their split; train keeps repeats on purpose (multi-modal targets)
    assert len(prompts["val"]) == 200 and len(prompts["test"]) == 200
    assert len(prompts["train"]) < 4000


def test_families_present_in_every_split(splits):
    assert len(FAMILIES) >= 6
    for v in splits.values():
        counts = Counter(r["family"] for r in v)
        assert set(counts) == set(FAMILIES)
        assert min(counts.values()) >= 5


def test_multi_reference_records(splits):
    for split in ("val", "test"):
        multi = [r for r in splits[split] if isinstance(r["output"], list)]
        assert len(multi) >= 20 and all(len(r["output"]) >= 2 for r in multi)
        assert len({r["family"] for r in multi}) >= 3
    assert all(isinstance(r["output"], str) for r in splits["train"])
    # a repeated train prompt of a multi-answer family carries different sampled answers
    answers: dict[str, set] = {}
    for r in splits["train"]:
        if r["family"] == "category":
            answers.setdefault(r["prompt"], set()).add(r["output"])
    assert any(len(a) >= 2 for a in answers.values())


def test_answer_lengths_vary_within_bounds(splits):
    lengths = [len(o.split()) for v in splits.values() for r in v for o in _outputs(r)]
    assert min(lengths) >= 1 and max(lengths) <= 40
    assert Counter(lengths)[1] > 0 and max(lengths) >= 25
    assert len(set(lengths)) >= 15


def test_vocabulary_is_small(splits):
    words = {w.lower() for v in splits.values() for r in v for t in [r["prompt"], *_outputs(r)]
             for w in re.findall(r"[A-Za-z]+", t)}
    assert 200 <= len(words) <= 800


def test_corpus_has_one_text_per_reference(splits):
    texts = list(synthetic_corpus(splits["test"]))
    assert len(texts) == sum(len(_outputs(r)) for r in splits["test"])
    assert texts[0] == splits["test"][0]["prompt"] + _outputs(splits["test"][0])[0]


# ---------------------------------------------------------------- datamodule over the synthetic task


def test_datamodule_batches_and_records(tok):
    dm = DistillDataModule(tok, n_train=64, n_val=16, n_test=16, batch_size=8, eval_batch_size=16)
    dm.setup()
    assert {k: len(v) for k, v in dm.records.items()} == {"train": 64, "val": 16, "test": 16}
    assert dm.stats == {"train": {}, "val": {}, "test": {}}
    batch = next(iter(dm.val_dataloader()))
    p = batch["prompt_len"]
    assert batch["input_ids"].shape[0] == 16 and batch["response_mask"][:, :p].sum() == 0
    # val is not shuffled: rows follow the records, whose references are all kept
    assert batch["prompts"] == [r["prompt"] for r in dm.records["val"]]
    assert batch["references"] == [r["references"] for r in dm.records["val"]]
    assert any(len(r) > 1 for r in batch["references"])
    train = next(iter(dm.train_dataloader()))
    assert train["input_ids"].shape[0] == 8 and train["response_mask"].sum(1).min() >= 2


def test_datamodule_counts_prompt_too_long(tok):
    dm = DistillDataModule(tok, n_train=64, n_val=16, n_test=16, max_prompt_len=55)
    dm.setup()
    dropped = dm.stats["train"].get("prompt_too_long", 0)
    assert 0 < dropped < 64 and len(dm.records["train"]) == 64 - dropped
    assert all(len(f["prompt_ids"]) <= 55 for f in dm.datasets["train"].features)


# ---------------------------------------------------------------- resumable train loader


def _loader(n=37, bs=4, seed=3):
    ds = FeatureDataset([{"i": i} for i in range(n)])
    return ResumableDataLoader(ds, batch_size=bs, seed=seed, collate_fn=lambda f: [x["i"] for x in f])


def test_epochs_are_seeded_permutations():
    loader = _loader()
    e0, e1 = [sum(iter(loader), [])] + [sum(iter(loader), [])]
    assert sorted(e0) == sorted(e1) == list(range(37)) and e0 != e1
    sampler = EpochPermutationSampler(37, seed=3)
    assert e0 == sampler.order(0) and e1 == sampler.order(1)
    assert sum(iter(_loader()), []) == e0  # a pure function of (seed, epoch)
    assert sum(iter(_loader(seed=4)), []) != e0


def test_resume_mid_epoch_equals_uninterrupted():
    ref = _loader()
    uninterrupted = list(ref) + list(ref)  # two epochs, 10 batches each

    first = _loader()
    it = iter(first)
    head = [next(it) for _ in range(3)]
    state = first.state_dict()
    assert state == {"epoch": 0, "batches_yielded": 3}

    resumed = _loader()
    resumed.load_state_dict(state)
    tail = list(resumed) + list(resumed)
    assert head + tail == uninterrupted[: 3 + len(tail)] and len(head + tail) == 20
    assert resumed.state_dict() == {"epoch": 1, "batches_yielded": 10}


def test_resume_from_a_finished_epoch_starts_the_next():
    ref = _loader()
    uninterrupted = list(ref) + list(ref)
    first = _loader()
    list(first)
    resumed = _loader()
    resumed.load_state_dict(first.state_dict())
    assert list(resumed) == uninterrupted[10:]


class _Recorder(L.LightningModule):
    def __init__(self, vocab: int):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 2)
        self.seen: list[tuple] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch_idx, tuple(batch["prompts"])))
        return self.emb(batch["input_ids"]).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("limits", [{"max_epochs": 3}, {"max_epochs": -1, "max_steps": 15}])
def test_lightning_resume_is_exact(tmp_path, tok, limits, request):
    """Resuming from mid-epoch, last-batch and end-of-epoch checkpoints replays exactly the batches
    (and Lightning's epoch/batch indices) of the uninterrupted run."""
    quiet = logging.getLogger("lightning.pytorch")
    request.addfinalizer(functools.partial(quiet.setLevel, quiet.level))  # a leaked level silences later tests
    quiet.setLevel(logging.ERROR)

    def fit(model, ckpt_path=None, callbacks=()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                                num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu",
                                default_root_dir=str(tmp_path), callbacks=list(callbacks), **limits)
            dm = DistillDataModule(tok, n_train=36, n_val=4, n_test=4, batch_size=8)  # 5 batches, last partial
            trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model.seen

    ckpts = [ModelCheckpoint(dirpath=tmp_path / "s", every_n_train_steps=1, save_top_k=-1, filename="{step}"),
             ModelCheckpoint(dirpath=tmp_path / "e", every_n_epochs=1, save_top_k=-1, filename="{epoch}",
                             save_on_train_epoch_end=True)]
    ref = fit(_Recorder(len(tok)), callbacks=ckpts)
    assert len(ref) == 15
    for path, done in [("s/step=3.ckpt", 3), ("s/step=5.ckpt", 5), ("e/epoch=0.ckpt", 5), ("s/step=7.ckpt", 7)]:
        state = torch.load(tmp_path / path, weights_only=False)["loops"]["fit_loop"]["state_dict"]
        assert state["combined_loader"] == [{"epoch": (done - 1) // 5, "batches_yielded": (done - 1) % 5 + 1}]
        assert fit(_Recorder(len(tok)), ckpt_path=str(tmp_path / path)) == ref[done:], path


def test_label_noise_corrupts_training_responses_only_and_is_a_prefix_property():
    from mgsr.data.synthetic import add_label_noise

    clean = make_synthetic_splits(3, 600, 50, 50)
    noisy = make_synthetic_splits(3, 600, 50, 50, label_noise=0.3)
    changed = [i for i, (a, b) in enumerate(zip(clean["train"], noisy["train"])) if a["output"] != b["output"]]
    assert 0.2 * 600 < len(changed) < 0.35 * 600  # ~30%, minus draws whose donor said the same thing
    assert all(noisy["train"][i].get("noisy") for i in changed)
    assert [r["prompt"] for r in clean["train"]] == [r["prompt"] for r in noisy["train"]]
    assert clean["val"] == noisy["val"] and clean["test"] == noisy["test"]
    for i in changed:  # a fluent answer of the same family, taken from another record of the split
        rec = noisy["train"][i]
        assert any(r["output"] == rec["output"] and r["family"] == rec["family"]
                   for j, r in enumerate(clean["train"]) if j != i)
    longer = make_synthetic_splits(3, 900, 0, 0, label_noise=0.3)["train"][:600]
    assert [r["output"] for r in longer] == [r["output"] for r in noisy["train"]]
    with pytest.raises(ValueError, match="label_noise"):
        add_label_noise(clean["train"], 1.0, 0)


def test_datamodule_counts_noisy_training_rows(tok):
    dm = DistillDataModule(tok, n_train=200, n_val=8, n_test=8, label_noise=0.3)
    dm.setup("fit")
    assert 30 < dm.stats["train"]["noisy_response_kept"] < 80
    assert len(dm.datasets["train"]) == 200  # counted, not dropped


def _first_batches(dm, n=3):
    it = iter(dm.train_dataloader())
    return [next(it)["input_ids"].tolist() for _ in range(n)]


def test_shuffle_seed_sets_the_training_order_and_only_it(tok):
    """data.shuffle_seed (e.g. ${seed}) changes the order of the same training rows; null keeps data.seed's."""
    kw = dict(n_train=64, n_val=8, n_test=8, batch_size=8)
    base = DistillDataModule(tok, seed=3, **kw)
    same = DistillDataModule(tok, seed=3, shuffle_seed=3, **kw)
    other = DistillDataModule(tok, seed=3, shuffle_seed=4, **kw)
    for dm in (base, same, other):
        dm.setup("fit")
    assert base.records["train"] == other.records["train"]  # the same split ...
    assert _first_batches(base) == _first_batches(same)
    assert _first_batches(base) != _first_batches(other)    # ... in another order
