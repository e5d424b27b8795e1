"""Evaluation metrics (METHOD.md section 7): ROUGE-L, exact match, Distinct-n, exposure bias (ExAccErr).

Pure python / torch: no model code. The text metrics follow MiniLLM / DistiLLM's evaluation scripts
(``rouge_score`` ROUGE-L F-measure with the Porter stemmer, max over references, mean x 100; exact match
with their normalisation, which keeps articles), so numbers are comparable with the papers.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from functools import lru_cache

import torch

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = frozenset(string.punctuation)


@lru_cache(maxsize=1)
def _rouge_scorer():
    # Building the scorer loads the stemmer; do it once per process, not per call.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _as_reference_lists(predictions: Sequence[str], references: Sequence) -> list[list[str]]:
    """Validate lengths; a bare string reference is accepted as a one-element list (the data's
    ``output`` field is a string for Dolly and a list for S-NI)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    out = []
    for i, refs in enumerate(references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError(f"example {i} has no references")
        out.append(refs)
    return out


def postprocess(text: str) -> str:
    """What evaluation does to a decoded generation before scoring: ``str.strip()`` (MiniLLM's eval).

    Decoding (special tokens skipped, cut at EOS) is the generator's job; this is only the text step.
    """
    return text.strip()


def rouge_l_per_example(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """Per-example ROUGE-L F-measure x 100, max over that example's references.

    Scorer: ``RougeScorer(["rougeL"], use_stemmer=True)`` (lowercase, non-alphanumerics -> space,
    Porter stemming of tokens longer than 3 chars). F = 2 P R / (P + R) with P = LCS/|pred|,
    R = LCS/|ref| on tokens; 0 when the LCS is empty.
    """
    refs = _as_reference_lists(predictions, references)
    scorer = _rouge_scorer()
    return [
        100.0 * max(scorer.score(target=r, prediction=p)["rougeL"].fmeasure for r in rs)
        for p, rs in zip(predictions, refs)
    ]


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus ROUGE-L: mean over examples of ``rouge_l_per_example`` (already x 100). Empty -> 0.0."""
    scores = rouge_l_per_example(predictions, references)
    return sum(scores) / len(scores) if scores else 0.0


EXACT_MATCH_NORMALIZATIONS = ("minillm", "squad")


def normalize_answer(text: str, style: str = "minillm") -> str:
    """Text normalisation before exact match.

    ``minillm`` (default; MiniLLM / DistiLLM's ``rouge_metric.py``, from Natural Instructions, and the
    paper's): lowercase, drop ASCII punctuation, collapse whitespace. ``squad``: the same plus dropping the
    articles a/an/the (whole words, after the punctuation, in SQuAD's order).
    """
    if style not in EXACT_MATCH_NORMALIZATIONS:
        raise ValueError(f"exact-match normalisation must be one of {EXACT_MATCH_NORMALIZATIONS}, got {style!r}")
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    if style == "squad":
        text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]], *, style: str = "minillm") -> float:
    """Mean over examples of max over references of [normalize(pred) == normalize(ref)], x 100.

    ``style``: see ``normalize_answer`` (``minillm`` keeps articles, ``squad`` drops them).
    Empty prediction list -> 0.0.
    """
    refs = _as_reference_lists(predictions, references)
    if not predictions:
        return 0.0
    hits = sum(
        any(normalize_answer(p, style) == normalize_answer(r, style) for r in rs) for p, rs in zip(predictions, refs)
    )
    return 100.0 * hits / len(predictions)


def distinct_n(predictions: Sequence[str], n: int) -> float:
    """Corpus-level Distinct-n as a FRACTION in [0, 1] (not x 100).

    Each generation is lowercased and split on whitespace (``str.split()``; punctuation stays attached
    to its word); its n-grams are the ``len(tokens) - n + 1`` contiguous windows (none if shorter
    than n; n-grams never cross generations). Distinct-n = |set of n-grams over all generations| /
    (total number of n-grams over all generations); 0.0 when there are no n-grams at all.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in predictions:
        tokens = text.lower().split()
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


EXPOSURE_AVERAGES = ("minillm", "per_sequence")


def _accumulated_means(kl: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """MiniLLM's R(l) / eps(l): [N, L] per-step values + validity -> [L].

    Entry k (0-based) is (1/N) sum_i sum_{t <= k, t valid} kl[i, t]: each sequence's error summed over its
    valid steps among the first k+1 (sum), then the mean over all N sequences (mean); invalid steps add 0,
    a sequence that has ended keeps its total. NaN when N == 0.
    """
    vals = torch.where(valid, kl, torch.zeros_like(kl))
    if kl.shape[0] == 0:
        return torch.full((kl.shape[1],), math.nan, dtype=kl.dtype)
    return vals.cumsum(dim=1).mean(dim=0)


def _prefix_means(kl: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The ``per_sequence`` reading: [N, L] -> [L], entry k the mean over sequences of each sequence's
    mean over its valid steps among the first k+1. Sequences with no valid step yet are left out; NaN
    where no sequence qualifies."""
    vals = torch.where(valid, kl, torch.zeros_like(kl))
    csum = vals.cumsum(dim=1)  # [N, L]
    ccnt = valid.to(kl.dtype).cumsum(dim=1)  # [N, L]
    has = ccnt > 0
    per_seq = torch.where(has, csum / ccnt.clamp_min(1.0), torch.zeros_like(csum))
    n_seq = has.to(kl.dtype).sum(dim=0)  # [L]
    return torch.where(n_seq > 0, per_seq.sum(dim=0) / n_seq.clamp_min(1.0), torch.full_like(n_seq, math.nan))


def _validity(
    kl: torch.Tensor, lengths: Sequence[int] | None, mask: torch.Tensor | None, width: int
) -> torch.Tensor:
    if kl.dim() != 2:
        raise ValueError(f"expected a [N, L] tensor, got shape {tuple(kl.shape)}")
    kl = kl[:, :width]
    valid = ~torch.isnan(kl)
    if mask is not None:
        valid &= mask[:, :width].to(torch.bool)
    if lengths is not None:
        if len(lengths) != kl.shape[0]:
            raise ValueError(f"{len(lengths)} lengths for {kl.shape[0]} sequences")
        steps = torch.arange(width).unsqueeze(0)  # [1, L]
        valid &= steps < torch.as_tensor(list(lengths)).unsqueeze(1)
    return valid


def exposure_bias(
    student_prefix_kl: torch.Tensor,
    teacher_prefix_kl: torch.Tensor,
    lengths: Sequence[int] | None = None,
    *,
    student_mask: torch.Tensor | None = None,
    teacher_mask: torch.Tensor | None = None,
    at: int = 15,
    average: str = "minillm",
) -> dict:
    """MiniLLM's excess accumulated error ExAccErr (arXiv 2306.08543, Sec. 3.3 and appendix;
    ``minillm/evaluate_exposure_bias.py``; after Arora et al. 2022), teacher p = oracle, student q = model.

    Inputs, [N, L] each: per-step ``KL(p || q)`` at generation step t (column t-1), i.e.
    ``sum_v p(v | y_<t, x) log(p(v | y_<t, x) / q(v | y_<t, x))``, where the prefixes y_<t were
    sampled from the STUDENT (``student_prefix_kl``) or from the TEACHER (``teacher_prefix_kl``), row i
    of both from the same prompt. Invalid steps (past a sequence's end) are NaN, or excluded by
    ``lengths`` (step t valid iff t <= lengths[i], applied to both tensors) or by the bool masks [N, L].

    ``average="minillm"`` (default, MiniLLM's code: per sequence a cumulative sum over steps, then the
    mean over all N sequences)::

        R(k)   = (1/N) sum_i sum_{t <= k+1, valid} student_prefix_kl[i, t]      (accumulated regret)
        eps(k) = (1/N) sum_i sum_{t <= k+1, valid} teacher_prefix_kl[i, t]
        ExAccErr(k) = (R(k) - eps(k)) / eps(k) * 100        (percent)

    (MiniLLM divides each step by its count of valid samples, 1 here with one sample per prompt, plus
    1e-3; that factor cancels in the ratio.) ``average="per_sequence"``, this project's former reading:
    R(k) / eps(k) = mean over the sequences with a valid step among the first k+1 of each one's MEAN over
    those steps. The two differ when lengths differ (a short sequence weighs as much as a long one in the
    second).

    ``at`` is a 0-based index into the curve, as MiniLLM's report ``ex_acc_err[15]`` (the first 16 steps
    of its table); when the curve is shorter, its last entry. Guard: if eps == 0, ExAccErr = 0 when R == 0
    else +inf; NaN where R or eps is undefined (no sequence at all; per_sequence: no valid step).

    Returns ``{"curve": [ExAccErr(k) for k = 0..L-1], "at_15": ExAccErr(at) (NaN if L == 0), "R": [R(k)],
    "eps": [eps(k)]}`` with python floats; L = the narrower of the two widths. Math in float64.
    """
    if average not in EXPOSURE_AVERAGES:
        raise ValueError(f"exposure-bias average must be one of {EXPOSURE_AVERAGES}, got {average!r}")
    means = _accumulated_means if average == "minillm" else _prefix_means
    width = min(student_prefix_kl.shape[-1], teacher_prefix_kl.shape[-1])
    s = student_prefix_kl.detach().to("cpu", torch.float64)
    t = teacher_prefix_kl.detach().to("cpu", torch.float64)
    r = means(s[:, :width], _validity(s, lengths, student_mask, width))
    eps = means(t[:, :width], _validity(t, lengths, teacher_mask, width))

    curve = []
    for r_l, e_l in zip(r.tolist(), eps.tolist()):
        if math.isnan(r_l) or math.isnan(e_l):
            curve.append(math.nan)
        elif e_l == 0.0:
            curve.append(0.0 if r_l == 0.0 else math.inf)
        else:
            curve.append((r_l - e_l) / e_l * 100.0)
    at_l = curve[min(at, width - 1)] if width > 0 else math.nan
    return {"curve": curve, "at_15": at_l, "R": r.tolist(), "eps": eps.tolist()}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation with ddof=1) over seeds; std is 0.0 for a single value.

    Sample std (n - 1 denominator) because the seeds are a sample of the run-to-run spread.
    Raises on an empty list.
    """
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std of an empty list")
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return mean, math.sqrt(var)
