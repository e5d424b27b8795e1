"""Span priors: NLTK chunk spans, token mapping, fallback rule, pair mask and its cache."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch

from mgsr import spans as spans_mod
from mgsr.spans import DEFAULT_GRAMMAR, SpanExtractor

NLTK_DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "nltk_data")
if not Path(NLTK_DATA).is_dir():
    NLTK_DATA = "/work/shared/data/nltk_data"

FOX = "The quick brown fox jumps over the lazy dog."
FOX_TOKENS = ["The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", "."]


@pytest.fixture(scope="module")
def nltk_ex() -> SpanExtractor:
    return SpanExtractor(NLTK_DATA)


@pytest.fixture
def fallback_ex() -> SpanExtractor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SpanExtractor(use_nltk=False)


@pytest.fixture(scope="module")
def hf_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [FOX, "A cat sat on the mat, and the dog barked loudly."] * 5
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _texts(text: str, char_spans: list[tuple[int, int]]) -> list[str]:
    return [text[a:b] for a, b in char_spans]


def test_grammar_is_methods() -> None:
    lines = [ln.strip() for ln in DEFAULT_GRAMMAR.strip().splitlines()]
    assert lines == [
        r"NP: {<DT|PRP\$|POS>?<JJ.*|CD|VBN|VBG>*<NN.*>+}",
        r"PP: {<IN|TO><NP>}",
        r"VP: {<MD>?<RB.*>?<VB.*>+<RP>?<RB.*>?}",
    ]


def test_backend_nltk_with_data_dir(nltk_ex: SpanExtractor) -> None:
    import nltk

    assert nltk_ex.backend == "nltk"
    assert nltk.data.path[0] == NLTK_DATA


def test_missing_data_falls_back_and_warns_once(monkeypatch, caplog) -> None:
    import nltk

    # Hide every data dir (including one a previous test inserted) so only the bogus dir is searched.
    monkeypatch.setattr(nltk.data, "path", [])
    spans_mod.reset_fallback_warning()
    caplog.set_level(logging.WARNING, logger="mgsr.spans")
    with pytest.warns(UserWarning, match="span.nltk_data") as record:
        a = SpanExtractor("/nonexistent/nltk_data_dir")
        b = SpanExtractor("/nonexistent/nltk_data_dir")
        a.token_spans(FOX_TOKENS)
        b.char_spans(FOX)
    assert a.backend == b.backend == "fallback"
    assert len([w for w in record if "NLTK" in str(w.message)]) == 1
    assert len([r for r in caplog.records if r.name == "mgsr.spans"]) == 1
    assert "fallback rule" in caplog.records[0].getMessage()
    spans_mod.reset_fallback_warning()


def test_use_nltk_false_is_fallback_with_warning() -> None:
    spans_mod.reset_fallback_warning()
    with pytest.warns(UserWarning, match="use_nltk=False"):
        ex = SpanExtractor(NLTK_DATA, use_nltk=False)
    assert ex.backend == "fallback"


def test_char_spans_fox(nltk_ex: SpanExtractor) -> None:
    got = nltk_ex.char_spans(FOX)
    assert _texts(FOX, got) == ["The quick brown fox", "jumps", "over the lazy dog"]
    assert got == [(0, 19), (20, 25), (26, 43)]


def test_char_spans_second_sentence_offsets_and_quotes(nltk_ex: SpanExtractor) -> None:
    text = FOX + ' He said "hello there" to Dr. Smith\'s cat.'
    got = nltk_ex.char_spans(text)
    assert _texts(text, got) == [
        "The quick brown fox",
        "jumps",
        "over the lazy dog",
        "said",
        "hello",
        "to Dr. Smith",
        "'s cat",
    ]


def test_token_spans_fox(nltk_ex: SpanExtractor) -> None:
    # NP tokens 0-3, VP "jumps" (single token: dropped), PP tokens 5-8; "." joins nothing.
    assert nltk_ex.token_spans(FOX_TOKENS) == [(0, 4), (5, 9)]
    keep_single = SpanExtractor(NLTK_DATA, min_tokens=1)
    assert keep_single.token_spans(FOX_TOKENS) == [(0, 4), (4, 5), (5, 9)]


def test_token_spans_subwords_and_whitespace_tokens(nltk_ex: SpanExtractor) -> None:
    # "will quickly run" (VP) spans a split word; whitespace-only tokens at a chunk edge join nothing.
    toks = ["I", " will", " quick", "ly", " run", " ", " to", " the", " big", " st", "ore", "."]
    assert _texts("".join(toks), nltk_ex.char_spans("".join(toks))) == [
        "will quickly run",
        "to the big store",
    ]
    assert nltk_ex.token_spans(toks) == [(1, 5), (6, 11)]


def test_token_spans_empty_and_special(nltk_ex: SpanExtractor) -> None:
    assert nltk_ex.token_spans([]) == []
    assert nltk_ex.token_spans(["", "", ""]) == []
    assert nltk_ex.token_spans([*FOX_TOKENS[:9], ""]) == [(0, 4), (5, 9)]


def test_fallback_char_spans(fallback_ex: SpanExtractor) -> None:
    text = "The quick brown fox, jumps over the lazy dog.\nIt barks (loudly) at 3.5 cats; it's well-known"
    assert _texts(text, fallback_ex.char_spans(text)) == [
        "The quick brown fox",
        "jumps over the lazy dog",
        "It barks",
        "loudly",
        "at 3",
        "5 cats",
        "it's well-known",
    ]


def test_fallback_token_spans(fallback_ex: SpanExtractor) -> None:
    toks = "The| quick| brown| fox|,| jumps|.|\n|It| barks| (|loud|ly|)| at| 3|.|5| cats| dog.| ok| \n".split(
        "|"
    )
    # Runs: The..fox | jumps (1, dropped) | It barks | loud ly | at 3 | 5 cats ("dog." has punctuation) | ok
    assert fallback_ex.token_spans(toks) == [(0, 4), (8, 10), (11, 13), (14, 16), (17, 19)]
    assert fallback_ex.token_spans(FOX_TOKENS) == [(0, 9)]


def _fox_row(tok) -> list[int]:
    ids = tok(FOX)["input_ids"]
    assert [tok.decode([i]) for i in ids] == FOX_TOKENS  # the test tokenizer splits at words
    return ids


def test_pair_mask_real_tokenizer(nltk_ex: SpanExtractor, hf_tokenizer) -> None:
    eos = hf_tokenizer.eos_token_id
    row0 = _fox_row(hf_tokenizer) + [eos]  # 11 tokens
    row1 = hf_tokenizer("the lazy dog barked.")["input_ids"] + [eos]
    T = len(row0) + 2
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.bool)
    for b, row in enumerate([row0, row1]):
        ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = True
        ids[b, len(row) :] = eos  # padding holds eos ids, as with pad = eos
    out = nltk_ex.pair_mask(hf_tokenizer, ids, mask)
    assert out.shape == (2, T - 1) and out.dtype == torch.bool

    exp0 = torch.zeros(T - 1, dtype=torch.bool)
    exp0[[0, 1, 2, 5, 6, 7]] = True  # pairs inside "The quick brown fox" and "over the lazy dog"
    assert torch.equal(out[0], exp0)
    assert not out[0, 3] and not out[0, 4]  # fox|jumps and jumps|over cross a span boundary
    assert not out[0, 9] and not out[0, 10:].any()  # "."|EOS, EOS|pad, pad|pad

    spans1 = nltk_ex.token_spans([hf_tokenizer.decode([i]) for i in row1[:-1]])
    exp1 = torch.zeros(T - 1, dtype=torch.bool)
    for s, e in spans1:
        exp1[s : e - 1] = True
    assert spans1 and torch.equal(out[1], exp1)
    assert not out[1, len(row1) - 2 :].any()


def test_pair_mask_gap_and_short_rows(nltk_ex: SpanExtractor, hf_tokenizer) -> None:
    row = _fox_row(hf_tokenizer)
    ids = torch.tensor([row, row])
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, 2] = False  # a hole: pairs touching column 2 can never be in-span
    mask[1, 1:] = False  # one token only
    out = nltk_ex.pair_mask(hf_tokenizer, ids, mask)
    assert not out[0, 1] and not out[0, 2]
    assert not out[1].any()
    assert nltk_ex.pair_mask(hf_tokenizer, ids[:, :1], mask[:, :1]).shape == (2, 0)


def test_pair_mask_cache(hf_tokenizer) -> None:
    ex = SpanExtractor(NLTK_DATA, cache_size=2)
    eos = hf_tokenizer.eos_token_id
    ids = torch.tensor([_fox_row(hf_tokenizer) + [eos]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    first = ex.pair_mask(hf_tokenizer, ids, mask)
    assert (ex.cache_hits, ex.cache_misses) == (0, 1)
    second = ex.pair_mask(hf_tokenizer, ids, mask)
    assert (ex.cache_hits, ex.cache_misses) == (1, 1)
    assert torch.equal(first, second)
    # LRU eviction: two new sequences push the first one out.
    for n in (3, 4):
        ex.pair_mask(hf_tokenizer, ids[:, :n], mask[:, :n])
    ex.pair_mask(hf_tokenizer, ids, mask)
    assert (ex.cache_hits, ex.cache_misses) == (1, 4)


def test_pair_mask_fallback(fallback_ex: SpanExtractor, hf_tokenizer) -> None:
    eos = hf_tokenizer.eos_token_id
    ids = torch.tensor([_fox_row(hf_tokenizer) + [eos, eos]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, -1] = False
    out = fallback_ex.pair_mask(hf_tokenizer, ids, mask)
    exp = torch.zeros(1, ids.shape[1] - 1, dtype=torch.bool)
    exp[0, :8] = True  # "The ... dog" is one run; "." and EOS end it
    assert torch.equal(out, exp)
