"""Token / text alignment for the span priors (mgsr/spans.py): each token's character range in the decoded
text, words located in the text they were tokenized from, and runs of flagged tokens.

Where the ``[a_k, b_k)`` come from (a token's own text is not its share of the decoded text: SentencePiece
``\u2581`` spaces, byte fallback, multi-byte characters split across byte-BPE tokens):

- fast tokenizer: the response (special tokens left out) is decoded once and re-encoded with
  ``return_offsets_mapping``; when the re-encoding gives back the same ids, its offsets are used. A sampled
  sequence the tokenizer would not produce from its own text (e.g. a word split unusually) gets exact
  offsets from decoding its prefixes instead: token k ends where ``decode(ids[:k+1])`` stops agreeing with
  the full text.
- slow tokenizer (no offsets): each token decoded alone, texts concatenated (exact only for tokenizers
  whose pieces decode independently, such as GPT-2's).
"""

from __future__ import annotations

SENTENCE_PUNCT = frozenset(".,;:!?\n")

# Treebank rewrites double quotes; these are the texts a quote token may have come from.
_QUOTE_SOURCES = {"``": ('"', "``", "\u201c", "''"), "''": ('"', "''", "\u201d", "``")}


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def token_offsets(tokenizer, ids: list[int]) -> tuple[str, list[tuple[int, int] | None]]:
    """The decoded text of `ids` (special tokens left out) and each token's [start, end) in it.

    Special tokens get None. See the module docstring for the three ways the offsets are found.
    """
    special = set(tokenizer.all_special_ids)
    keep = [k for k, i in enumerate(ids) if i not in special]
    kept = [ids[k] for k in keep]
    offsets: list[tuple[int, int] | None] = [None] * len(ids)
    if not kept:
        return "", offsets
    kw = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if getattr(tokenizer, "is_fast", False):
        text = tokenizer.decode(kept, **kw)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) == kept:
            found = [tuple(o) for o in enc["offset_mapping"]]
        else:
            found, start = [], 0
            for prefix in tokenizer.batch_decode([kept[: k + 1] for k in range(len(kept))], **kw):
                # an incomplete multi-byte character decodes to U+FFFD: that token adds no text yet
                end = max(_common_prefix_len(prefix, text), start)
                found.append((start, end))
                start = end
    else:
        found, start = [], 0
        pieces = tokenizer.batch_decode([[i] for i in kept], **kw)
        for piece in pieces:
            found.append((start, start + len(piece)))
            start += len(piece)
        text = "".join(pieces)
    for k, o in zip(keep, found):
        offsets[k] = o
    return text, offsets


def is_word_token(text: str) -> bool:
    return any(c.isalnum() for c in text) and not any(c in SENTENCE_PUNCT for c in text)


def true_runs(flags: list[bool]) -> list[tuple[int, int]]:
    """[start, end) ranges of maximal runs of True in `flags`."""
    runs, start = [], None
    for k, flag in enumerate(flags):
        if flag and start is None:
            start = k
        elif not flag and start is not None:
            runs.append((start, k))
            start = None
    if start is not None:
        runs.append((start, len(flags)))
    return runs


def align_words(words: list[str], text: str) -> list[tuple[int, int] | None]:
    """Char span of each word in `text`, searching forward; None for a word not found."""
    spans: list[tuple[int, int] | None] = []
    pos = 0
    for word in words:
        best = None
        for source in _QUOTE_SOURCES.get(word, (word,)):
            at = text.find(source, pos)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, at + len(source))
        spans.append(best)
        if best is not None:
            pos = best[1]
    return spans
