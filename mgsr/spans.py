"""Span priors for the span-level loss (METHOD.md section 4, step 1).

A *span* is a run of response tokens that belong to one syntactic chunk; the span loss only looks at
adjacent token pairs (i, i+1) inside a span.

NLTK backend (default): the text is split into sentences with Punkt (``punkt_tab``), each sentence into
words with NLTK's Treebank word tokenizer (what ``word_tokenize`` uses), the words are tagged with the
averaged-perceptron tagger (``averaged_perceptron_tagger_eng``) and chunked by ``RegexpParser`` with
``DEFAULT_GRAMMAR``. Every top-level NP / PP / VP subtree is a chunk; its character span runs from its
first to its last word as found in the text (found by a forward search, because the word tokenizer
rewrites quotes to ``\\`\\``` / ``''``; words that cannot be found are skipped).

Chunks are mapped to tokens by character overlap on the decoded text (``token_offsets``): token k covers
``[a_k, b_k)`` of the text, minus leading/trailing whitespace; a token belongs to a chunk when that trimmed
range overlaps the chunk (whitespace-only and special tokens belong to none). A chunk gives the token
range ``[first, last + 1)`` and is kept when it overlaps ``>= min_tokens`` tokens. A token that straddles
two chunks belongs to both, so spans may share their edge token; byte-fallback / byte-BPE pieces of one
character all cover that character. Where the ``[a_k, b_k)`` come from (fast and slow tokenizers), and the
other token / text alignment helpers: mgsr/span_alignment.py.

NLTK data is never downloaded. The two English resources ship with the project (``BUNDLED_NLTK_DATA``,
mgsr/assets/nltk_data, licences in its README), so the NLTK backend needs no ``NLTK_DATA`` and no ``../shared``.
``nltk_data_dir`` (config key ``span.nltk_data``) is searched first, then the bundled copy, then NLTK's own
path, while the models load; ``nltk.data.path`` is left as it was (NLTK only reads data it finds through that list, so the
directory is put there for the loading and taken out again). If the resources are missing, or
``use_nltk=False``, the **fallback rule** is used and a warning is emitted once per ``WarnOnce`` object
(each extractor has its own unless one is passed in, so a run warns once):

    Fallback rule: spans are maximal runs of consecutive tokens whose text contains at least one
    alphanumeric character and none of the sentence punctuation characters ``. , ; : ! ?`` or a newline,
    kept when the run has ``>= min_tokens`` tokens.

(``char_spans`` under the fallback applies the rule to the raw text: maximal runs of words -- letters and
digits, with inner ``'`` or ``-`` -- separated only by spaces or tabs; any other character or a newline
ends a run.)

Spans are cached per sequence of token ids (LRU), because they only change when SCRG changes a sequence.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import stat
import warnings
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import torch

from mgsr.span_alignment import align_words, is_word_token, token_offsets, true_runs

log = logging.getLogger(__name__)

DEFAULT_GRAMMAR = r"""
NP: {<DT|PRP\$|POS>?<JJ.*|CD|VBN|VBG>*<NN.*>+}
PP: {<IN|TO><NP>}
VP: {<MD>?<RB.*>?<VB.*>+<RP>?<RB.*>?}
"""

CHUNK_LABELS = frozenset({"NP", "PP", "VP"})
NLTK_RESOURCES = ("tokenizers/punkt_tab/english/", "taggers/averaged_perceptron_tagger_eng/")
# Pinned copies of exactly NLTK_RESOURCES: the method's span rule must not depend on what a machine has installed.
BUNDLED_NLTK_DATA = Path(__file__).resolve().parent / "assets" / "nltk_data"
# LRU entries (one per distinct response id sequence) kept by default; spans change only when SCRG
# revises a sequence, so most lookups hit and skip the chunker.
DEFAULT_CACHE_SIZE = 65536

# Fallback pieces of raw text: words (letters/digits, inner ' or - allowed) and single other characters.
_FALLBACK_PIECE = re.compile(r"\w+(?:['\u2019-]\w+)*|\S")

class WarnOnce:
    """A message logged and warned the first time only. Share one instance between objects that should
    warn once together; each SpanExtractor otherwise owns its own."""

    def __init__(self):
        self.warned = False

    def __call__(self, msg: str) -> None:
        if self.warned:
            return
        self.warned = True
        log.warning(msg)
        warnings.warn(msg, UserWarning, stacklevel=4)


def _fallback_message(reason: str) -> str:
    return (
        f"Span priors: {reason}; using the fallback rule instead of NLTK chunking (spans = maximal runs of "
        "tokens with an alphanumeric character and no sentence punctuation . , ; : ! ? or newline). "
        "The project ships both resources in mgsr/assets/nltk_data: reinstall mgsr if they are missing, or "
        "point `span.nltk_data` to an nltk_data directory holding punkt_tab and averaged_perceptron_tagger_eng."
    )


@contextmanager
def _nltk_search_path(nltk, data_dir: str | None):
    """`nltk.data.path` with `data_dir` first and the bundled copy second, only while the models load, then
    exactly as before.

    NLTK finds (and, since 3.9, authorises reads of) its data only through that global list; the loaded
    Punkt parameters and tagger weights live in memory, so nothing needs the entry afterwards.
    """
    saved = list(nltk.data.path)
    nltk.data.path.insert(0, str(readable_bundled_data()))
    if data_dir is not None:
        nltk.data.path.insert(0, data_dir)
    try:
        yield
    finally:
        nltk.data.path[:] = saved


def _writable_by_others(root: Path) -> bool:
    return any(p.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH) for p in [root, *root.rglob("*")])


def readable_bundled_data() -> Path:
    """The bundled NLTK data, or a private copy of it when the checkout is group- or world-writable: NLTK >= 3.10
    refuses to read data that other accounts could have changed, and a checkout made under umask 002 is."""
    if not BUNDLED_NLTK_DATA.is_dir() or not _writable_by_others(BUNDLED_NLTK_DATA):
        return BUNDLED_NLTK_DATA
    digest = hashlib.sha1("".join(sorted(str(p.relative_to(BUNDLED_NLTK_DATA)) + str(p.stat().st_size)
                                         for p in BUNDLED_NLTK_DATA.rglob("*"))).encode()).hexdigest()[:12]
    private = Path(os.environ.get("MGSR_CACHE") or Path.home() / ".cache" / "mgsr") / f"nltk_data-{digest}"
    if not (private / "done").is_file():
        tmp = private.with_name(private.name + f".tmp{os.getpid()}")
        shutil.copytree(BUNDLED_NLTK_DATA, tmp, dirs_exist_ok=True)
        for p in [tmp, *tmp.rglob("*")]:
            p.chmod(0o700 if p.is_dir() else 0o600)
        (tmp / "done").write_text("")
        shutil.rmtree(private, ignore_errors=True)
        tmp.rename(private)
    private.chmod(0o700)
    log.info("span priors: the bundled NLTK data is writable by other accounts; reading a private copy at %s", private)
    return private


class SpanExtractor:
    """Syntactic span priors for response tokens; see the module docstring for the rules."""

    def __init__(
        self,
        nltk_data_dir: str | None = None,
        *,
        min_tokens: int = 2,
        grammar: str = DEFAULT_GRAMMAR,
        use_nltk: bool = True,
        cache_size: int = DEFAULT_CACHE_SIZE,
        warn_once: WarnOnce | None = None,
    ):
        self.warn_once = warn_once if warn_once is not None else WarnOnce()
        self.min_tokens = min_tokens
        self.cache_size = cache_size
        self.cache_hits = 0
        self.cache_misses = 0
        self._cache: OrderedDict[tuple[int, ...], list[tuple[int, int]]] = OrderedDict()
        self._backend = "fallback"
        self.fallback_reason: str | None = None  # why the fallback rule is in use (results.json records it)
        if not use_nltk:
            self.fallback_reason = "NLTK chunking disabled (use_nltk=False)"
            self.warn_once(_fallback_message(self.fallback_reason))
            return
        reason = self._load_nltk(nltk_data_dir, grammar)
        if reason is None:
            self._backend = "nltk"
        else:
            self.fallback_reason = reason
            self.warn_once(_fallback_message(reason))

    def _load_nltk(self, nltk_data_dir: str | None, grammar: str) -> str | None:
        """Load Punkt, the tagger and the chunker; returns why not, or None on success."""
        try:
            import nltk
            from nltk.tag.perceptron import PerceptronTagger
            from nltk.tokenize import NLTKWordTokenizer
            from nltk.tokenize.punkt import PunktTokenizer
        except ImportError:
            return "nltk is not installed"
        if nltk_data_dir is not None:
            nltk_data_dir = str(nltk_data_dir)
        try:
            with _nltk_search_path(nltk, nltk_data_dir):
                for resource in NLTK_RESOURCES:
                    nltk.data.find(resource)
                self._sentences = PunktTokenizer("english")
                self._tagger = PerceptronTagger(load=True, lang="eng")
        except LookupError:
            names = ", ".join(NLTK_RESOURCES)
            return f"NLTK data ({names}) not found in nltk.data.path (nltk_data_dir={nltk_data_dir!r})"
        self._words = NLTKWordTokenizer()
        # A bad grammar is a config error, not missing data: let it raise.
        self._parser = nltk.RegexpParser(grammar)
        return None

    @property
    def backend(self) -> str:
        """Which rule is in use: "nltk" or "fallback"."""
        return self._backend

    # ---- text level -------------------------------------------------------------------------------------

    def char_spans(self, text: str) -> list[tuple[int, int]]:
        """[start, end) character spans of the top-level chunks of `text`, in order (no length filter)."""
        if self._backend == "fallback":
            return self._fallback_char_spans(text)
        spans = []
        for s_start, s_end in self._sentences.span_tokenize(text):
            sentence = text[s_start:s_end]
            words = self._words.tokenize(sentence)
            if not words:
                continue
            word_spans = align_words(words, sentence)
            tree = self._parser.parse(self._tagger.tag(words))
            leaf = 0
            for child in tree:
                n = len(child.leaves()) if hasattr(child, "label") else 1
                if hasattr(child, "label") and child.label() in CHUNK_LABELS:
                    found = [ws for ws in word_spans[leaf : leaf + n] if ws is not None]
                    if found:
                        spans.append((s_start + found[0][0], s_start + found[-1][1]))
                leaf += n
        return spans

    @staticmethod
    def _fallback_char_spans(text: str) -> list[tuple[int, int]]:
        pieces = list(_FALLBACK_PIECE.finditer(text))
        spans, start, prev_end = [], None, None
        for m in pieces:
            word = any(c.isalnum() for c in m.group())
            joined = start is not None and "\n" not in text[prev_end : m.start()]
            if word and joined:
                prev_end = m.end()
                continue
            if start is not None:
                spans.append((start, prev_end))
            start, prev_end = (m.start(), m.end()) if word else (None, None)
        if start is not None:
            spans.append((start, prev_end))
        return spans

    # ---- token level ------------------------------------------------------------------------------------

    def token_spans(self, token_texts: list[str]) -> list[tuple[int, int]]:
        """[start, end) token ranges of chunks covering >= min_tokens tokens, sorted, de-duplicated.

        token_texts: per-token strings; token k covers chars [off_k, off_k + len(token_texts[k])) of
        "".join(token_texts) (an empty string: a token with no text, e.g. a special token).
        """
        offsets, off = [], 0
        for t in token_texts:
            offsets.append((off, off + len(t)))
            off += len(t)
        return self.spans_from_offsets("".join(token_texts), offsets)

    def spans_from_offsets(self, text: str, offsets: list[tuple[int, int] | None]) -> list[tuple[int, int]]:
        """token_spans for tokens given by their [start, end) in `text` (None: no text, in no span).

        Offsets must be non-decreasing in both ends (tokens in text order; neighbours may overlap, as the
        byte pieces of one character do).
        """
        if self._backend == "fallback":
            flags = [o is not None and is_word_token(text[o[0]:o[1]]) for o in offsets]
            return [(s, e) for s, e in true_runs(flags) if e - s >= self.min_tokens]
        # Trimmed char ranges of the tokens that can belong to a chunk; increasing in both ends.
        index, starts, ends = [], [], []
        for k, o in enumerate(offsets):
            if o is None:
                continue
            piece = text[o[0]:o[1]]
            stripped = piece.strip()
            if stripped:
                a = o[0] + len(piece) - len(piece.lstrip())
                index.append(k)
                starts.append(a)
                ends.append(a + len(stripped))
        spans = set()
        for cs, ce in self.char_spans(text):
            lo, hi = bisect_right(ends, cs), bisect_left(starts, ce)
            if hi - lo >= self.min_tokens:
                spans.add((index[lo], index[hi - 1] + 1))
        return sorted(spans)

    def spans_for_ids(self, tokenizer, ids: list[int]) -> list[tuple[int, int]]:
        """Spans of one id sequence, on its decoded text (`token_offsets`); LRU-cached.

        The cache key is tuple(ids) only, so one extractor should serve one tokenizer.
        """
        key = tuple(ids)
        cached = self._cache.get(key)
        if cached is not None:
            self.cache_hits += 1
            self._cache.move_to_end(key)
            return cached
        self.cache_misses += 1
        spans = self.spans_from_offsets(*token_offsets(tokenizer, list(key)))
        if self.cache_size > 0:
            self._cache[key] = spans
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return spans

    def pair_mask(self, tokenizer, response_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        """In-span adjacent-pair mask.

        response_ids [B, T] long, response_mask [B, T] bool (columns P: of the canonical layout).
        Returns bool [B, T-1] on response_ids.device: out[b, i] is True iff columns i and i+1 are both
        response tokens, adjacent in the response, and inside the same span. Padding and special tokens
        (EOS) never are.
        """
        B, T = response_ids.shape
        # Plain python lists: per-element tensor writes would cost more than the cached lookup itself.
        rows = [[False] * max(T - 1, 0) for _ in range(B)]
        ids_rows = response_ids.detach().cpu().tolist()
        mask_rows = response_mask.detach().cpu().bool().tolist()
        for b in range(B):
            cols = [t for t, keep in enumerate(mask_rows[b]) if keep]
            if len(cols) < 2:
                continue
            row = rows[b]
            for s, e in self.spans_for_ids(tokenizer, [ids_rows[b][t] for t in cols]):
                for j in range(s, e - 1):
                    if cols[j + 1] == cols[j] + 1:
                        row[cols[j]] = True
        return torch.tensor(rows, dtype=torch.bool).reshape(B, max(T - 1, 0)).to(response_ids.device)
