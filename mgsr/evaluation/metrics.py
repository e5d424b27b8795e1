"""Evaluation metrics (METHOD.md section 7): ROUGE-L, exact match, Distinct-n, exposure bias (ExAccErr).

Pure python / torch: no model code. The text metrics follow MiniLLM / DistiLLM's evaluation scripts
(``rouge_score`` ROUGE-L F-measure with the Porter stemmer, max over references, mean x 100; SQuAD-style
exact match), so numbers are comparable with the papers.
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


def normalize_answer(text: str) -> str:
    """SQuAD normalisation, in SQuAD's order: lowercase, drop ASCII punctuation, drop the articles
    a/an/the (whole words), collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over examples of max over references of [normalize(pred) == normalize(ref)], x 100.

    Empty prediction list -> 0.0.
    """
    refs = _as_reference_lists(predictions, references)
    if not predictions:
        return 0.0
    hits = sum(
        any(normalize_answer(p) == normalize_answer(r) for r in rs) for p, rs in zip(predictions, refs)
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


def _prefix_means(kl: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[N, L] per-step values + validity -> [L]: entry l-1 is the mean over sequences of each sequence's
    mean over its valid steps among the first l. Sequences with no valid step yet are left out; NaN
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
) -> dict:
    """MiniLLM's excess accumulated error ExAccErr (arXiv 2306.08543, Sec. 3.3 and appendix; after
    Arora et al. 2022), with the teacher p as the oracle and the student q as the model.

    Inputs, [N, L] each: per-step ``KL(p || q)`` at generation step t (t = 1..L), i.e.
    ``sum_v p(v | y_<t, x) log(p(v | y_<t, x) / q(v | y_<t, x))``, where the prefixes y_<t were
    sampled from the STUDENT (``student_prefix_kl``) or from the TEACHER (``teacher_prefix_kl``).
    Invalid steps (past a sequence's end) are NaN, or excluded by ``lengths`` (step t valid iff
    t <= lengths[i], applied to both tensors) or by the optional bool masks [N, L].

        R(l)   = mean_i [ mean of student_prefix_kl[i, t] over valid t <= l ]
        eps(l) = mean_i [ mean of teacher_prefix_kl[i, t] over valid t <= l ]
        ExAccErr(l) = (R(l) - eps(l)) / eps(l) * 100        (percent)

    Using means over the first l steps for both terms equals MiniLLM's (R_sum(l) - l eps(l)) /
    (l eps(l)) with R_sum the accumulated regret. A sequence with no valid step among the first l
    is left out of that l's mean. Guard: if eps(l) == 0, ExAccErr(l) = 0 when R(l) == 0 else +inf;
    NaN where R or eps is undefined (no valid step in any sequence).

    Returns ``{"curve": [ExAccErr(l) for l = 1..L], "at_15": ExAccErr(min(at, L)) (NaN if L == 0),
    "R": [R(l)], "eps": [eps(l)]}`` with python floats; L = the narrower of the two widths. Math in
    float64.
    """
    width = min(student_prefix_kl.shape[-1], teacher_prefix_kl.shape[-1])
    s = student_prefix_kl.detach().to("cpu", torch.float64)
    t = teacher_prefix_kl.detach().to("cpu", torch.float64)
    r = _prefix_means(s[:, :width], _validity(s, lengths, student_mask, width))
    eps = _prefix_means(t[:, :width], _validity(t, lengths, teacher_mask, width))

    curve = []
    for r_l, e_l in zip(r.tolist(), eps.tolist()):
        if math.isnan(r_l) or math.isnan(e_l):
            curve.append(math.nan)
        elif e_l == 0.0:
            curve.append(0.0 if r_l == 0.0 else math.inf)
        else:
            curve.append((r_l - e_l) / e_l * 100.0)
    at_l = curve[min(at, width) - 1] if width > 0 else math.nan
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
