"""The cost grid with its quality column: bench/step_cost.py's step ratios beside the comparison's test ROUGE-L.

    python bench/grid_table.py        # the defaults below -> bench/results/grid_table.md (and printed)

Cost: one `step_cost.py --grid` run per start (`--init testbed`: the trained start the quality cells train from;
random init: the worst case for generation), each method's step as a multiple of KD's in the same run. Quality:
the committed reports of `compare.py` (test ROUGE-L, mean ± 95% t half-width over training seeds, and the paired
difference to MGSR's default with its 95% CI; `*` where the CI excludes 0). MGSR settings come from
`compare=step_cost`'s report, the baselines from the paper preset's. The file starts with a stamp line (the
commits of both), so `python -m mgsr.docs_tables` can copy the table into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from common import REPO

DEFAULT_COST = {"testbed start": "bench/results/step_cost_grid_testbed.json",
                "random init": "bench/results/step_cost_grid.json"}
DEFAULT_QUALITY = ["results/testbed_v1/report_step_cost.csv", "results/testbed_v1/report.csv"]
BASELINES = ["kd", "sft", "gkd", "distillm", "abkd", "taid", "minillm"]


def grid_name(method: str) -> str:
    """step_cost.py's name for MGSR's default is mgsr_k1_n1; the reports call it mgsr."""
    return "mgsr" if method == "mgsr_k1_n1" else method


def load_quality(paths: list[Path]) -> dict[str, dict]:
    """method -> its report row, from the first report that has it."""
    rows = {}
    for path in paths:
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                rows.setdefault(row["method"], row)
    return rows


def quality_cells(row: dict | None) -> tuple[str, str]:
    if row is None:
        return "not run", ""
    score = f"{float(row['rougeL_mean']):.2f} ± {float(row['rougeL_ci95_half']):.2f} ({row['n_seeds']} seeds)"
    if not row.get("diff_mgsr_mean"):
        return score, "(reference)" if row["method"] == "mgsr" else ""
    star = "*" if row["diff_mgsr_excludes_zero"] == "True" else ""
    lo, hi = float(row["diff_mgsr_lo"]), float(row["diff_mgsr_hi"])
    return score, f"{float(row['diff_mgsr_mean']):+.2f} [{lo:+.2f}, {hi:+.2f}]{star}"


def report_commit(csv_path: Path) -> str:
    stamp = csv_path.with_suffix(".stamp.json") if csv_path.stem != "report" else csv_path.with_name("stamp.json")
    return json.loads(stamp.read_text())["commit"] if stamp.is_file() else "?"


def render(costs: dict[str, dict], quality: dict[str, dict], quality_paths: list[Path]) -> str:
    first = next(iter(costs.values()))
    stamp = (f"commit `{first['machine']['commit']}` (cost: " +
             ", ".join(f"{k} `{v['machine']['commit']}`" for k, v in costs.items()) +
             "; quality: " + ", ".join(f"{p.name} `{report_commit(p)}`" for p in quality_paths) +
             f") · {first['machine']['cpu']}, {first['machine']['torch_threads']} torch thread, "
             f"torch {first['machine']['torch']}")
    by_start = {start: {r["method"]: r for r in run["steps"]} for start, run in costs.items()}
    methods = [m for m in next(iter(by_start.values())) if m.startswith("mgsr_k")] + BASELINES
    head = ["setting", *(f"x KD, {s}" for s in costs), f"peak memory x KD, {next(iter(costs))}",
            "test ROUGE-L", "− MGSR default (paired, 95% CI)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for m in methods:
        ratios = [f"{by_start[s][m]['x_kd']:.2f}" if m in by_start[s] else "—" for s in costs]
        first_row = by_start[next(iter(costs))].get(m) or {}
        mem = f"{first_row['mem_x_kd']:.2f}" if first_row.get("mem_x_kd") is not None else "—"
        score, diff = quality_cells(quality.get(grid_name(m)))
        label = f"`{m}`" + (" (default)" if m == "mgsr_k1_n1" else "" if m.startswith("mgsr") else " (the unit)" if m == "kd" else " (baseline)")
        lines.append("| " + " | ".join([label, *ratios, mem, score, diff]) + " |")
    return stamp + "\n\n" + "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cost", nargs="+", default=[f"{k}={v}" for k, v in DEFAULT_COST.items()],
                    help="START=step_cost.json, one per start (the first gives the memory column)")
    ap.add_argument("--quality", nargs="+", default=DEFAULT_QUALITY, help="report CSVs, first match wins")
    ap.add_argument("--out", default="bench/results/grid_table.md")
    args = ap.parse_args()
    costs = {}
    for spec in args.cost:
        start, _, path = spec.partition("=")
        costs[start] = json.loads((REPO / path).read_text())
    paths = [REPO / p for p in args.quality]
    text = render(costs, load_quality(paths), paths)
    (REPO / args.out).write_text(text)
    print(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
