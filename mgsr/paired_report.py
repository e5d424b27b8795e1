"""An ablation read as a researcher reads it: each variant's paired difference to a reference variant, with its
95% CI and noise budget, drawn as differences with intervals (a forest plot), not as bars from zero.

Used by the sweep report (mgsr/report.py): the runs of `python train.py -m +experiment=<ablation> seed=0,1,2`
are grouped by variant and paired by training seed. The reference is the experiment's `sweep_reference` (the
label of the variant that is MGSR itself, e.g. `dac_kl` in ablation_fixed_clip), else the first variant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from mgsr.compare import Interval, _fmt_diff, cell_score, paired_difference
from mgsr.noise_budget import (
    BUDGET_NOTE,
    TARGET_HALF,
    NoiseBudget,
    budget_markdown,
    noise_budget,
    per_eval_seed,
    teacher_forced_value,
)


@dataclass
class PairedRow:
    variant: str
    seeds: int
    diff: Interval | None
    budget: NoiseBudget | None
    tf: dict   # "nll" | "fkl" -> Interval | None


def _scores(runs: list[dict]) -> dict:
    """training seed -> cell score (compare.py's: test ROUGE-L, Average over sets) of `runs` (results.json)."""
    return {r.get("seed"): score for r in runs if (score := cell_score(r)) is not None}


def _per_eval(runs: list[dict]) -> dict:
    """training seed -> {eval seed: score} (or {None: cell score} without per-eval-seed scores)."""
    scores = _scores(runs)
    return {r.get("seed"): per_eval_seed(r) or {None: scores[r.get("seed")]} for r in runs if r.get("seed") in scores}


def _tf(runs: list[dict], key: str) -> dict:
    return {r.get("seed"): x for r in runs if (x := teacher_forced_value(r, key)) is not None}


def paired_rows(by_variant: dict[str, list[dict]], reference: str) -> list[PairedRow]:
    """One row per variant other than `reference`: its paired difference to it over the seeds both have."""
    ref = by_variant[reference]
    ref_scores = _scores(ref)
    return [PairedRow(v, len(_scores(runs)), paired_difference(_scores(runs), ref_scores),
                      noise_budget(_per_eval(runs), _per_eval(ref)),
                      {k: paired_difference(_tf(runs, k), _tf(ref, k)) for k in ("nll", "fkl")})
            for v, runs in by_variant.items() if v != reference]


def paired_markdown(rows: list[PairedRow], reference: str, *, how: str) -> list[str]:
    lines = [f"## Paired differences to `{reference}`", "",
             f"Reference: `{reference}` ({how}). Each variant minus the reference over the training seeds both have "
             "(test ROUGE-L, 95% t-interval; **\\*** = the interval excludes 0, anything else is no measurable "
             "difference), and the same for the teacher-forced NLL and FKL (deterministic; lower is better).", "",
             "| variant | pairs | ROUGE-L − ref (95% CI) | NLL − ref | FKL − ref |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r.variant} | {r.diff.n if r.diff else 0} | {_fmt_diff(r.diff)} | "
                     f"{_fmt_diff(r.tf['nll'], '.3f')} | {_fmt_diff(r.tf['fkl'], '.3f')} |")
    budgets = [(r.variant, reference, r.budget) for r in rows]
    if any(b is not None for _, _, b in budgets):
        lines += ["", BUDGET_NOTE.format(t=TARGET_HALF, f=4.0), "", *budget_markdown(budgets)]
    return lines


def forest_plot(rows: list[PairedRow], reference: str, path: Path, title: str) -> Path:
    """Each variant's paired difference (point) and 95% CI (bar) against a line at 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.diff is not None]
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(shown) + 1.4))
    for i, r in enumerate(shown):
        half = r.diff.half if math.isfinite(r.diff.half) else 0.0
        color = "#C44E52" if r.diff.excludes_zero else "#4C72B0"
        ax.errorbar(r.diff.mean, i, xerr=half, fmt="o", color=color, capsize=4)
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_yticks(range(len(shown)))
    ax.set_yticklabels([f"{r.variant} (n={r.diff.n})" for r in shown], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"test ROUGE-L − {reference} (paired, 95% CI)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
