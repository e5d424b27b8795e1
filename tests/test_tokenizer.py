"""The offline byte-level BPE tokenizer: lossless round trip, offsets, GPT-2 special-token conventions,
save/load."""

import pytest
from transformers import AutoTokenizer

from mgsr.data.synthetic import make_synthetic_splits, synthetic_corpus
from mgsr.data.tokenizer import EOS_TOKEN, build_tokenizer, load_or_build_tokenizer


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    splits = make_synthetic_splits(seed=0, n_train=300, n_val=20, n_test=20)
    return list(synthetic_corpus(splits["train"]))


@pytest.fixture(scope="module")
def tok(corpus):
    return build_tokenizer(corpus, vocab_size=600)


TEXTS = [
    "Below is an instruction that describes a task.\n\n### Response:\nA fox is a small red mammal.",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nwindows newlines\n\n\n",
    "unseen bytes: café, naïve, 日本語, emoji 🦊, <|endoftext|> as text",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_is_lossless(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_special_tokens_follow_gpt2_convention(tok):
    assert tok.eos_token == tok.bos_token == tok.pad_token == EOS_TOKEN
    assert tok.eos_token_id == tok.pad_token_id == tok.convert_tokens_to_ids(EOS_TOKEN)
    assert tok.padding_side == "left"
    # no BOS/EOS is added implicitly: the data layer appends EOS itself
    assert tok("a fox", add_special_tokens=True)["input_ids"] == tok("a fox", add_special_tokens=False)["input_ids"]
    assert tok.eos_token_id not in tok("a fox")["input_ids"]


def test_vocab_size_bounded_and_words_are_merged(tok, corpus):
    assert len(tok) <= 600
    # the task's words are frequent: BPE must have merged them well below one token per byte
    text = corpus[0]
    assert len(tok(text)["input_ids"]) < len(text.encode()) / 2


def test_offsets_mapping_covers_the_text(tok):
    text = "The fox eats mice in the forest.\nIt is small."
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    assert len(offsets) == len(enc["input_ids"])
    # contiguous, non-overlapping spans from 0 to len(text), each matching the token's decoded text
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
    for (s0, e0), (s1, _) in zip(offsets, offsets[1:]):
        assert e0 == s1 and s0 < e0
    for (s, e), i in zip(offsets, enc["input_ids"]):
        assert text[s:e] == tok.decode([i])


def test_left_padding(tok):
    batch = tok(["a fox", "a small red fox lives here"], padding=True)
    short, long_ = batch["input_ids"]
    n = sum(batch["attention_mask"][0])
    assert short[: len(short) - n] == [tok.pad_token_id] * (len(short) - n)
    assert batch["attention_mask"][0][: len(short) - n] == [0] * (len(short) - n)
    assert len(short) == len(long_) and sum(batch["attention_mask"][1]) == len(long_)


def test_training_is_deterministic(corpus, tok):
    again = build_tokenizer(corpus, vocab_size=600)
    assert again.get_vocab() == tok.get_vocab()


def test_save_and_reload_give_identical_ids(tmp_path, corpus):
    built = build_tokenizer(corpus, vocab_size=600, save_dir=str(tmp_path / "tok"))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert loaded.padding_side == "left" and loaded.pad_token_id == built.pad_token_id
    for text in TEXTS + corpus[:20]:
        assert loaded(text)["input_ids"] == built(text)["input_ids"]


def test_load_or_build_builds_once_then_loads(tmp_path, corpus):
    calls = []

    def texts_fn():
        calls.append(1)
        return iter(corpus)

    first = load_or_build_tokenizer(str(tmp_path / "t"), texts_fn, vocab_size=600)
    second = load_or_build_tokenizer(str(tmp_path / "t"), texts_fn, vocab_size=600)
    assert calls == [1]  # the corpus thunk is not evaluated when a saved tokenizer exists
    assert (tmp_path / "t" / "tokenizer.json").is_file()
    assert second.get_vocab() == first.get_vocab()
    assert second(corpus[0])["input_ids"] == first(corpus[0])["input_ids"]
