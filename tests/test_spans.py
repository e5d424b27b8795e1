"""Span priors: NLTK chunk spans, token mapping, fallback rule, pair mask and its cache."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from mgsr import spans as spans_mod
from mgsr.spans import DEFAULT_GRAMMAR, SpanExtractor

NLTK_DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "nltk_data")
if not Path(NLTK_DATA).is_dir():  # no ../shared: the bundled copy is the same files (test below)
    NLTK_DATA = str(spans_mod.BUNDLED_NLTK_DATA)

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
    assert nltk_ex.backend == "nltk"


def test_nltk_data_dir_does_not_stay_in_the_global_search_path(monkeypatch) -> None:
    import nltk

    # Only the configured directory holds the data: loading must find it there, then leave the list alone.
    monkeypatch.setattr(nltk.data, "path", ["/nonexistent/a", "/nonexistent/b"])
    monkeypatch.setattr(spans_mod, "BUNDLED_NLTK_DATA", Path("/nonexistent/bundled"))
    ex = SpanExtractor(NLTK_DATA)
    assert ex.backend == "nltk"
    assert nltk.data.path == ["/nonexistent/a", "/nonexistent/b"]
    assert ex.char_spans(FOX) == [(0, 19), (20, 25), (26, 43)]  # the loaded models need no file access later


def test_missing_data_falls_back_and_warns_once_per_extractor(monkeypatch, caplog) -> None:
    import nltk

    # Hide every data dir (the bundled copy too) so only the bogus dir is searched.
    monkeypatch.setattr(nltk.data, "path", [])
    monkeypatch.setattr(spans_mod, "BUNDLED_NLTK_DATA", Path("/nonexistent/bundled"))
    caplog.set_level(logging.WARNING, logger="mgsr.spans")
    with pytest.warns(UserWarning, match="span.nltk_data") as record:
        a = SpanExtractor("/nonexistent/nltk_data_dir")
        a.token_spans(FOX_TOKENS)
        a.char_spans(FOX)
    assert a.backend == "fallback"
    assert "not found" in a.fallback_reason
    assert len([w for w in record if "NLTK" in str(w.message)]) == 1
    assert len([r for r in caplog.records if r.name == "mgsr.spans"]) == 1
    assert "fallback rule" in caplog.records[0].getMessage()


def test_warn_once_is_owned_not_global(monkeypatch) -> None:
    import nltk

    monkeypatch.setattr(nltk.data, "path", [])
    monkeypatch.setattr(spans_mod, "BUNDLED_NLTK_DATA", Path("/nonexistent/bundled"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        SpanExtractor("/nonexistent/x")
        SpanExtractor("/nonexistent/x")  # a second, independent extractor says it too
        shared = spans_mod.WarnOnce()
        SpanExtractor("/nonexistent/x", warn_once=shared)
        SpanExtractor("/nonexistent/x", warn_once=shared)  # one shared notice: once for both
    assert len([w for w in record if "fallback rule" in str(w.message)]) == 3
    assert shared.warned
    assert not hasattr(spans_mod, "_fallback_warned")


def test_use_nltk_false_is_fallback_with_warning() -> None:
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


# --- token mapping on the decoded text (offset_mapping), for tokenizers whose pieces do not decode alone --------
@pytest.fixture(scope="module")
def metaspace_tokenizer():
    """SentencePiece-style (LLaMA): Metaspace "\u2581" spaces, byte fallback for unseen characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=["<unk>", "</s>", *bytes_])
    tok.train_from_iterator([FOX, "A cat sat on the mat, and the dog barked loudly.", "The old man drinks tea."] * 5,
                            trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


def _span_texts(ex, tok, ids):
    return [tok.decode(ids[s:e]).strip() for s, e in ex.spans_for_ids(tok, ids)]


def test_metaspace_pieces_do_not_decode_alone(metaspace_tokenizer) -> None:
    # What broke the per-token mapping: "\u2581quick" decodes alone to "quick", so the joined pieces lose every space.
    ids = metaspace_tokenizer(FOX, add_special_tokens=False)["input_ids"]
    joined = "".join(metaspace_tokenizer.decode([i]) for i in ids)
    assert joined != metaspace_tokenizer.decode(ids) == FOX


def test_spans_metaspace_tokenizer(nltk_ex, metaspace_tokenizer) -> None:
    tok = metaspace_tokenizer
    ids = tok(FOX, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # every chunk of the sentence covers >= 2 of this small vocabulary's tokens ("jumps" is j-u-m-p-s)
    assert _span_texts(nltk_ex, tok, ids) == ["The quick brown fox", "jumps", "over the lazy dog"]
    spans = nltk_ex.spans_for_ids(tok, ids)
    assert spans[-1][1] < len(ids) - 1  # neither "." nor EOS is inside a span


def test_spans_metaspace_non_ascii_byte_fallback(nltk_ex, metaspace_tokenizer) -> None:
    tok = metaspace_tokenizer
    text = "The old man drinks \u00fcber-strong tea in the caf\u00e9 \u2603 with the lazy dog."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any(t.startswith("<0x") for t in tok.convert_ids_to_tokens(ids))  # byte fallback is exercised
    # each span decodes to exactly one chunk's text, none shifted by the byte pieces before it
    assert _span_texts(nltk_ex, tok, ids) == ["The old man", "drinks", "\u00fcber-strong tea", "in the caf\u00e9 \u2603",
                                              "with the lazy dog"]


def test_spans_byte_bpe_non_ascii(nltk_ex, hf_tokenizer) -> None:
    # Multi-byte characters split over byte-BPE tokens: alone each piece decodes to U+FFFD, so the joined
    # pieces glued "dog\u2014the" into one word and chunked a text that was never generated.
    tok = hf_tokenizer
    text = "The dog\u2014the cat\u2014sat on the mat."
    ids = tok(text)["input_ids"]
    assert "\ufffd" in "".join(tok.decode([i]) for i in ids)
    chunks = [text[a:b] for a, b in nltk_ex.char_spans(text)]
    assert chunks == ["The dog", "\u2014", "the cat\u2014", "sat", "on the mat"]
    assert _span_texts(nltk_ex, tok, ids) == ["The dog", "\u2014", "the cat\u2014", "on the mat"]  # "sat": 1 token
    text = "The na\u00efve caf\u00e9 owner s\u00e9es the \u00fcber lazy dog over the old mat."
    assert _span_texts(nltk_ex, tok, tok(text)["input_ids"]) == [
        "The na\u00efve caf\u00e9 owner", "s\u00e9es", "the \u00fcber", "lazy dog", "over the old mat"]


def test_spans_non_canonical_sampled_tokens(nltk_ex, hf_tokenizer) -> None:
    # A student may sample " fo" + "x" where the tokenizer would write " fox": the decoded text is the same,
    # the re-encoding is not, so the offsets come from decoding prefixes.
    tok = hf_tokenizer
    canon = tok(FOX)["input_ids"]
    pieces = [tok.get_vocab()[p] for p in ("\u0120fo", "x")]
    assert tok.decode(pieces) == " fox"
    ids = canon[:3] + pieces + canon[4:]
    assert tok.decode(ids) == FOX and tok(FOX)["input_ids"] != ids
    spans = nltk_ex.spans_for_ids(tok, ids)
    assert [tok.decode(ids[s:e]).strip() for s, e in spans] == ["The quick brown fox", "over the lazy dog"]
    assert spans[0] == (0, 5)  # The, quick, brown, fo, x


class _SlowTokenizer:
    """No offsets (is_fast False): per-token decoding is the only mapping."""

    is_fast = False
    all_special_ids = [0]
    vocab = {1: "The", 2: " quick", 3: " brown", 4: " fox", 5: ".", 6: " It", 7: " barks"}

    def batch_decode(self, rows, **kw):
        return ["".join(self.vocab.get(i, "") for i in row) for row in rows]


def test_slow_tokenizer_per_token_fallback(nltk_ex) -> None:
    assert nltk_ex.spans_for_ids(_SlowTokenizer(), [1, 2, 3, 4, 5, 0]) == [(0, 4)]


def test_bundled_data_gives_the_nltk_backend_with_no_environment(tmp_path) -> None:
    """A fresh machine: no NLTK_DATA, an empty HOME, no ../shared beside the working directory. The bundled
    copy alone must give the NLTK backend, and the same spans as the shared data."""
    code = ("import json, nltk; from mgsr.spans import SpanExtractor; ex = SpanExtractor(); "
            f"print(json.dumps([ex.backend, ex.fallback_reason, ex.char_spans({FOX!r}), nltk.data.path]))")
    env = {k: v for k, v in os.environ.items() if k not in ("NLTK_DATA", "MGSR_SHARED")}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True)
    backend, reason, spans, path = json.loads(out.stdout.strip().splitlines()[-1])
    assert (backend, reason) == ("nltk", None), out.stderr
    assert [tuple(s) for s in spans] == [(0, 19), (20, 25), (26, 43)]
    assert not any("shared" in p for p in path)  # nothing of the test environment leaked in


def test_bundled_data_is_byte_identical_to_the_shared_copy() -> None:
    if not Path(NLTK_DATA).is_dir():
        pytest.skip("no ../shared/data/nltk_data to compare with")
    for resource in spans_mod.NLTK_RESOURCES:
        ours, theirs = spans_mod.BUNDLED_NLTK_DATA / resource, Path(NLTK_DATA) / resource
        names = sorted(p.name for p in ours.iterdir())
        assert names and names == sorted(p.name for p in theirs.iterdir())
        for name in names:
            assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name


def test_a_group_writable_checkout_reads_a_private_copy(tmp_path, monkeypatch):
    """NLTK >= 3.10 refuses data that other accounts can write (a checkout made under umask 002): the extractor
    then reads a private copy, and still gets the NLTK backend."""
    shared_copy = tmp_path / "checkout" / "nltk_data"
    import shutil

    shutil.copytree(spans_mod.BUNDLED_NLTK_DATA, shared_copy)
    for p in [shared_copy, *shared_copy.rglob("*")]:
        p.chmod(0o775 if p.is_dir() else 0o664)
    monkeypatch.setattr(spans_mod, "BUNDLED_NLTK_DATA", shared_copy)
    monkeypatch.setenv("MGSR_CACHE", str(tmp_path / "cache"))
    import nltk

    monkeypatch.setattr(nltk.data, "path", [])
    with pytest.warns(RuntimeWarning, match="NLTK will not read"):  # what the private copy is for
        assert SpanExtractor(str(shared_copy), use_nltk=True, warn_once=spans_mod.WarnOnce()).backend == "nltk"
    private = spans_mod.readable_bundled_data()
    assert private != shared_copy and private.parent == tmp_path / "cache"
    assert not spans_mod._writable_by_others(private)
    ex = SpanExtractor()
    assert ex.backend == "nltk", ex.fallback_reason
    assert ex.char_spans(FOX) == [(0, 19), (20, 25), (26, 43)]
    assert spans_mod.readable_bundled_data() == private  # made once
