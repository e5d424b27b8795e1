"""Seed aggregation and report tables (markdown / CSV) for evaluation results.

A *summary* maps ``eval set -> metric -> (mean, std)`` over seeds, plus an ``"Average"`` entry over
sets; cells are rendered "mean ± std" with 2 decimals, "—" where a value is missing.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from mgsr.evaluation.metrics import mean_std

AVERAGE = "Average"
MISSING = "—"

Cell = tuple[float, float] | float | int | None


def summarise_seeds(per_seed: Mapping[str, Mapping[int, Mapping[str, float]]]) -> dict:
    """``{set: {seed: {metric: value}}}`` -> ``{set: {metric: (mean, std)}, "Average": {...}}``.

    Per set and metric: mean and sample std (ddof=1; 0 for one seed, see ``mean_std``) over the seeds
    that report it. "Average", for each metric present in every set: mean = mean over sets of the
    per-set means; std = std over seeds of the per-seed average across sets, using the seeds that every
    set has for that metric (NaN if none is shared). Insertion order of sets and metrics is kept.
    """
    if AVERAGE in per_seed:
        raise ValueError(f"{AVERAGE!r} is reserved for the across-set average")
    summary: dict[str, dict[str, tuple[float, float]]] = {}
    for name, seeds in per_seed.items():
        metrics: dict[str, list[float]] = {}
        for values in seeds.values():
            for metric, v in values.items():
                metrics.setdefault(metric, []).append(float(v))
        summary[name] = {metric: mean_std(vals) for metric, vals in metrics.items()}

    if not summary:
        return summary
    first, *rest = summary.values()
    shared = [m for m in first if all(m in s for s in rest)]
    average: dict[str, tuple[float, float]] = {}
    for metric in shared:
        mean = sum(summary[name][metric][0] for name in summary) / len(summary)
        seed_sets = [{sd for sd, vals in seeds.items() if metric in vals} for seeds in per_seed.values()]
        common = [sd for sd in per_seed[next(iter(per_seed))] if all(sd in s for s in seed_sets)]
        per_seed_avg = [
            sum(float(per_seed[name][sd][metric]) for name in per_seed) / len(per_seed) for sd in common
        ]
        std = mean_std(per_seed_avg)[1] if per_seed_avg else math.nan
        average[metric] = (mean, std)
    summary[AVERAGE] = average
    return summary


def format_cell(cell: Cell, decimals: int = 2) -> str:
    """(mean, std) -> "m ± s"; a bare number -> "m"; None or NaN mean -> "—"."""
    if cell is None:
        return MISSING
    if isinstance(cell, tuple):
        mean, std = cell
        if mean is None or math.isnan(mean):
            return MISSING
        return f"{mean:.{decimals}f} ± {std:.{decimals}f}"
    if math.isnan(cell):
        return MISSING
    return f"{cell:.{decimals}f}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = [_row(header), _row(["---"] * len(header))]
    lines += [_row(r) for r in body]
    return "\n".join(lines) + "\n"


def markdown_table(
    summary: Mapping[str, Mapping[str, Cell]],
    metrics: Sequence[str] = ("rougeL",),
    set_order: Sequence[str] | None = None,
    label_overrides: Mapping[str, str] | None = None,
    decimals: int = 2,
) -> str:
    """One row per metric, one column per eval set then "Average" (if the summary has it).

    ``set_order`` picks and orders the set columns (default: the summary's order); the Average column
    is the one ``summarise_seeds`` computed, i.e. over all its sets, not only the shown ones.
    ``label_overrides`` renames set columns and metric rows for display (e.g. ``{"uinst":
    "U-NI subset"}``). Output ends with a newline; the first header cell is "metric".
    """
    labels = dict(label_overrides or {})
    sets = list(set_order) if set_order is not None else [s for s in summary if s != AVERAGE]
    columns = sets + ([AVERAGE] if AVERAGE in summary else [])
    header = ["metric"] + [labels.get(c, c) for c in columns]
    body = [
        [labels.get(m, m)] + [format_cell(summary.get(c, {}).get(m), decimals) for c in columns]
        for m in metrics
    ]
    return _table(header, body)


def comparison_table(
    rows: Mapping[str, Mapping[str, Cell]],
    columns: Sequence[str],
    row_label: str = "variant",
    label_overrides: Mapping[str, str] | None = None,
    decimals: int = 2,
) -> str:
    """One row per variant (in ``rows`` order), one column per item of ``columns``; cells
    "mean ± std" (a bare number prints alone), "—" for a missing item. Used by sweep reports."""
    labels = dict(label_overrides or {})
    header = [row_label] + [labels.get(c, c) for c in columns]
    body = [[name] + [format_cell(cells.get(c), decimals) for c in columns] for name, cells in rows.items()]
    return _table(header, body)


def write_csv(
    rows: Mapping[str, Mapping[str, Cell]],
    columns: Sequence[str],
    path: str | Path,
    row_label: str = "variant",
) -> Path:
    """CSV counterpart of ``comparison_table``: header ``row_label, <col>_mean, <col>_std, ...``,
    full-precision numbers, empty fields for missing items (and for the std of a bare number).
    Creates parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([row_label] + [f"{c}_{k}" for c in columns for k in ("mean", "std")])
        for name, cells in rows.items():
            out = [name]
            for c in columns:
                cell = cells.get(c)
                if cell is None:
                    out += ["", ""]
                elif isinstance(cell, tuple):
                    out += [repr(float(cell[0])), repr(float(cell[1]))]
                else:
                    out += [repr(float(cell)), ""]
            writer.writerow(out)
    return path
