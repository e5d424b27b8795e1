"""The method comparison: methods x training seeds, one `train.py` run per cell, and a report that says how
sure it is.

    python compare.py                       # conf/compare/paper.yaml: every method, 3 seeds
    python compare.py compare=quick         # a smoke run
    python compare.py seeds=[0,1,2,3,4] out_dir=results/compare5

Each cell is `python train.py <method overrides> seed=S hydra.run.dir=<out>/runs/<method>/seed<S> ckpt_path=last`
run in a subprocess, seed by seed (so a half-finished comparison already has complete pairs). A cell whose
`results.json` exists is not run again, and a killed cell resumes from its own `last.ckpt`: the command is
resumable as a whole.

Statistics (`report_stats`): a cell's score is its test ROUGE-L averaged over the evaluation seeds; a method's
row is the mean over training seeds with a 95% t-interval (n - 1 degrees of freedom); a paired difference
A - B uses the seeds both have, d_s = A_s - B_s, mean(d) ± t * sd(d) / sqrt(n). A difference whose interval
excludes 0 is marked; otherwise the report says "no measurable difference".
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mgsr.noise_budget import (
    BUDGET_NOTE,
    TARGET_HALF,
    budget_markdown,
    noise_budget,
    per_eval_seed,
    teacher_forced_value,
)

log = logging.getLogger("mgsr.compare")

REPO = Path(__file__).resolve().parents[1]
METRIC = ("Average", "rougeL")  # the cell score: results["eval"]["summary"]["Average"]["rougeL"][0]


# -- statistics --------------------------------------------------------------------------------------------------
def t_quantile(df: int, level: float = 0.95) -> float:
    """Two-sided Student-t critical value: P(|T_df| <= q) = level."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


@dataclass(frozen=True)
class Interval:
    mean: float
    half: float   # half-width of the 95% interval (nan with one value)
    n: int

    @property
    def lo(self) -> float:
        return self.mean - self.half

    @property
    def hi(self) -> float:
        return self.mean + self.half

    @property
    def excludes_zero(self) -> bool:
        # a 0-wide interval means identical values (seeds that changed nothing), not certainty: never a claim
        return self.n >= 2 and math.isfinite(self.half) and self.half > 0 and (self.lo > 0 or self.hi < 0)


def t_interval(values, level: float = 0.95) -> Interval:
    """Mean and t-interval half-width of `values` (sample std, n - 1 degrees of freedom)."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        raise ValueError("t_interval needs at least one value")
    mean = sum(vals) / n
    if n == 1:
        return Interval(mean, math.nan, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    return Interval(mean, t_quantile(n - 1, level) * sd / math.sqrt(n), n)


def paired_difference(a: dict, b: dict, level: float = 0.95) -> Interval | None:
    """A - B over the seeds both have (dicts seed -> score); None with no common seed."""
    common = sorted(set(a) & set(b))
    if not common:
        return None
    return t_interval([a[s] - b[s] for s in common], level)


# -- the cells ---------------------------------------------------------------------------------------------------
@dataclass
class Spec:
    name: str
    methods: dict                 # label -> list of train.py overrides
    seeds: list
    overrides: list = field(default_factory=list)   # applied to every cell
    baselines: list = field(default_factory=lambda: ["kd", "sft"])   # paired differences against these
    chain: list = field(default_factory=list)  # rows of an incremental table: each minus the one before, paired

    def cell_dir(self, out: Path, method: str, seed) -> Path:
        return out / "runs" / method.replace("/", "_") / f"seed{seed}"

    def command(self, out: Path, method: str, seed) -> list[str]:
        return [sys.executable, "train.py", *self.methods[method], f"seed={seed}",
                f"hydra.run.dir={self.cell_dir(out, method, seed)}", "ckpt_path=last", *self.overrides]

    def config_hash(self) -> str:
        blob = json.dumps({"methods": self.methods, "seeds": self.seeds, "overrides": self.overrides}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


def run_cells(spec: Spec, out: Path, *, runner=subprocess.run, env=None) -> dict:
    """Run every missing cell, seed-major. Returns {"ran": [...], "skipped": [...], "failed": [...]}."""
    done = {"ran": [], "skipped": [], "failed": []}
    for seed in spec.seeds:
        for method in spec.methods:
            d = spec.cell_dir(out, method, seed)
            if (d / "results.json").is_file():
                done["skipped"].append((method, seed))
                continue
            d.mkdir(parents=True, exist_ok=True)
            cmd = spec.command(out, method, seed)
            log.info("compare: %s seed %s: %s", method, seed, " ".join(cmd[1:]))
            t0 = time.perf_counter()
            with open(d / "compare.log", "a") as fh:
                rc = runner(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
            _add_wall_time(d, time.perf_counter() - t0)
            if rc == 0 and (d / "results.json").is_file():
                done["ran"].append((method, seed))
            else:
                log.warning("compare: %s seed %s failed (rc %s); see %s", method, seed, rc, d / "compare.log")
                done["failed"].append((method, seed))
    return done


def _add_wall_time(cell: Path, seconds: float) -> None:
    """Wall time of a cell's process(es), summed over resumed attempts (start-up and evaluation included)."""
    p = cell / "wall_time_s"
    p.write_text(str((float(p.read_text()) if p.is_file() else 0.0) + seconds))


def wall_time(spec: Spec, out: Path) -> float:
    total = 0.0
    for method in spec.methods:
        for seed in spec.seeds:
            p = spec.cell_dir(out, method, seed) / "wall_time_s"
            total += float(p.read_text()) if p.is_file() else 0.0
    return total


def cell_score(results: dict) -> float | None:
    cell = results.get("eval", {}).get("summary", {}).get(METRIC[0], {}).get(METRIC[1])
    return float(cell[0]) if isinstance(cell, (list, tuple)) else None


def collect(spec: Spec, out: Path) -> dict:
    """method -> {seed: results.json} for the cells that finished."""
    found = {}
    for method in spec.methods:
        for seed in spec.seeds:
            p = spec.cell_dir(out, method, seed) / "results.json"
            if p.is_file():
                found.setdefault(method, {})[seed] = json.loads(p.read_text())
    return found


# -- the report --------------------------------------------------------------------------------------------------
def _avg(r: dict, metric: str):
    return ((r.get("eval", {}).get("summary", {}).get("Average") or {}).get(metric) or [None])[0]


EXTRA = (  # (column, how to read it from a results.json)
    ("Distinct-1", lambda r: _avg(r, "distinct_1")),
    ("Distinct-2", lambda r: _avg(r, "distinct_2")),
    ("ExAccErr@15 (%)", lambda r: (r.get("exposure") or {}).get("exacc_err")),
    ("s/step", lambda r: (r.get("train_cost") or {}).get("s_per_step")),
    ("corrected/seq", lambda r: (r.get("scrg") or {}).get("corrected_per_seq")),   # what SCRG changed
    ("DAC kept/token", lambda r: (r.get("dac") or {}).get("kept")),               # what DAC-KL kept
    ("DAC l", lambda r: (r.get("dac") or {}).get("lower_mean")),
    ("DAC u", lambda r: (r.get("dac") or {}).get("upper_mean")),
)
TF_METRICS = ("nll", "fkl")  # teacher-forced, deterministic (mgsr/evaluation/teacher_forced.py)


def report_stats(spec: Spec, found: dict) -> dict:
    """Per method: scores by seed, the 95% interval, and the paired differences to each baseline."""
    scores = {m: {s: cell_score(r) for s, r in runs.items() if cell_score(r) is not None} for m, runs in found.items()}
    per_eval = {m: {s: per_eval_seed(r) or {None: cell_score(r)} for s, r in runs.items() if cell_score(r) is not None}
                for m, runs in found.items()}
    tf = {k: {m: {s: v for s, r in runs.items() if (v := teacher_forced_value(r, k)) is not None}
              for m, runs in found.items()} for k in TF_METRICS}
    rows = {}
    for m in spec.methods:
        sc = scores.get(m) or {}
        row = {"scores": sc, "interval": t_interval(list(sc.values())) if sc else None, "diff": {}, "extra": {},
               "budget": {}, "tf": {k: tf[k].get(m) or {} for k in TF_METRICS}, "tf_diff": {},
               "per_eval": per_eval.get(m) or {}}
        for k in TF_METRICS:
            row["tf"][k] = {"values": row["tf"][k], "interval": t_interval(list(row["tf"][k].values()))
                            if row["tf"][k] else None}
        for b in spec.baselines:
            if b != m and scores.get(b):
                row["diff"][b] = paired_difference(sc, scores[b]) if sc else None
                row["budget"][b] = noise_budget(per_eval.get(m) or {}, per_eval.get(b) or {})
                row["tf_diff"][b] = {k: paired_difference(tf[k].get(m) or {}, tf[k].get(b) or {})
                                     if tf[k].get(m) else None for k in TF_METRICS}
        for col, read in EXTRA:
            vals = [v for v in (read(r) for r in (found.get(m) or {}).values()) if v is not None]
            row["extra"][col] = sum(vals) / len(vals) if vals else None
        rows[m] = row
    return rows


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> str:
    import torch

    return (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
            + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"))


def _fmt_interval(iv: Interval | None, p: str = ".2f") -> str:
    if iv is None:
        return "—"
    if iv.n < 2:
        return f"{iv.mean:{p}} (1 seed)"
    return f"{iv.mean:{p}} ± {iv.half:{p}}"


def _fmt_diff(iv: Interval | None, p: str = ".2f") -> str:
    if iv is None:
        return "—"
    if iv.n < 2:
        return f"{iv.mean:+{p}} (1 pair)"
    if iv.half == 0:
        return f"{iv.mean:+{p}} (identical over {iv.n} pairs: no spread, no CI)"
    mark = " **\\***" if iv.excludes_zero else ""
    return f"{iv.mean:+{p}} [{iv.lo:+{p}}, {iv.hi:+{p}}]{mark}"


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"


def chain_steps(spec: Spec, rows: dict) -> list[tuple[str, str, Interval | None]]:
    """(row, previous row, paired difference row - previous) along `spec.chain`, for the rows both have."""
    chain = [m for m in spec.chain if m in rows]
    return [(b, a, paired_difference(rows[b]["scores"], rows[a]["scores"])) for a, b in zip(chain, chain[1:])]


def to_markdown(spec: Spec, rows: dict, *, stamp: dict, notes: str = "") -> str:
    diffs = [b for b in spec.baselines if any(b in r["diff"] for r in rows.values())]
    head = ["method", "seeds", "ROUGE-L (95% CI)"] + [f"− {b} (paired, 95% CI)" for b in diffs] + [c for c, _ in EXTRA]
    lines = [f"# Comparison `{spec.name}`", "",
             f"commit `{stamp['commit']}` · config `{stamp['config_hash']}` · {stamp['machine']} · "
             f"wall time {stamp['wall_time']} · {stamp['date']} · span rule: {stamp.get('span', 'unrecorded')} · "
             f"evaluated: {stamp.get('evaluated', 'unrecorded')}", "",
             "Test ROUGE-L: each cell averaged over the evaluation seeds, then mean ± 95% t-interval half-width "
             "over training seeds. Paired differences use the seeds both methods have; **\\*** marks an interval "
             "that excludes 0 (any other difference is no measurable difference).", "",
             "| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for m, r in rows.items():
        cells = [m, str(len(r["scores"])), _fmt_interval(r["interval"])]
        cells += [_fmt_diff(r["diff"].get(b)) if b != m else "" for b in diffs]
        cells += [_fmt(r["extra"][c]) for c, _ in EXTRA]
        lines.append("| " + " | ".join(cells) + " |")
    steps = chain_steps(spec, rows)
    if steps:
        lines += ["", "What each step adds (the row minus the one before it, paired over training seeds, 95% CI):", "",
                  "| step | paired difference | seeds |", "| --- | --- | --- |"]
        lines += [f"| {b} − {a} | {_fmt_diff(iv)} | {iv.n if iv else 0} |" for b, a, iv in steps]
    lines += _findings_section(rows, diffs) + _budget_section(spec, rows, diffs, steps) + _tf_section(rows, diffs)
    lines += ["", "Per-seed scores:", "", "| method | " + " | ".join(f"seed {s}" for s in spec.seeds) + " |",
              "| --- |" + " --- |" * len(spec.seeds)]
    for m, r in rows.items():
        lines.append(f"| {m} | " + " | ".join(f"{r['scores'][s]:.2f}" if s in r["scores"] else "—"
                                             for s in spec.seeds) + " |")
    lines += ["", "Methods (train.py overrides):", ""]
    lines += [f"- `{m}`: `{' '.join(o) or '(defaults)'}`" for m, o in spec.methods.items()]
    if spec.overrides:
        lines += ["", f"Every cell also: `{' '.join(spec.overrides)}`"]
    if notes:
        lines += ["", notes]
    return "\n".join(lines) + "\n"


def _reading(iv: Interval | None, lower_is_better: bool = False) -> str:
    if iv is None or iv.n < 2 or not iv.excludes_zero:
        return "no measurable difference"
    better = (iv.hi < 0) if lower_is_better else (iv.lo > 0)
    return "measurably better" if better else "measurably worse"


def _findings_section(rows: dict, diffs: list) -> list[str]:
    """Each method against the first baseline, read out whatever the sign (README copies this table)."""
    if not diffs:
        return []
    b = diffs[0]
    found = [(m, r) for m, r in rows.items() if m != b and r["diff"].get(b) is not None]
    if not found:
        return []
    lines = ["", f"What the table says against `{b}` (paired over training seeds, 95% CI; ROUGE-L higher is better, "
             "teacher-forced FKL lower is better):", "",
             f"| method | ROUGE-L − {b} | reading | FKL − {b} | reading |", "| --- | --- | --- | --- | --- |"]
    for m, r in found:
        d, f = r["diff"][b], (r["tf_diff"].get(b) or {}).get("fkl")
        lines.append(f"| {m} | {_fmt_diff(d)} | {_reading(d)} | {_fmt_diff(f, '.3f')} | "
                     f"{_reading(f, lower_is_better=True) if f is not None else '—'} |")
    return lines


def _budget_section(spec: Spec, rows: dict, diffs: list, steps: list) -> list[str]:
    pairs = [(m, b, r["budget"].get(b)) for b in diffs for m, r in rows.items() if b != m]
    pairs += [(b, a, noise_budget(rows[b]["per_eval"], rows[a]["per_eval"])) for b, a, _ in steps]
    if not any(nb is not None for _, _, nb in pairs):
        return []
    return ["", "Noise budget (ROUGE-L):", "", BUDGET_NOTE.format(t=TARGET_HALF, f=4.0), "",
            *budget_markdown(pairs)]


def _tf_section(rows: dict, diffs: list) -> list[str]:
    if not any(r["tf"]["nll"]["interval"] for r in rows.values()):
        return []
    head = ["method", "NLL (95% CI)", "FKL (95% CI)"] + [f"− {b}: NLL / FKL (paired)" for b in diffs]
    lines = ["", "Teacher-forced on the test references, deterministic (mgsr/evaluation/teacher_forced.py; nats "
             "per token, lower is better; no evaluation noise, so every interval is training alone):", "",
             "| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for m, r in rows.items():
        cells = [m] + [_fmt_interval(r["tf"][k]["interval"], ".3f") for k in TF_METRICS]
        cells += ["" if b == m or b not in r["tf_diff"] else " / ".join(_fmt_diff(r["tf_diff"][b][k], ".3f")
                                                                       for k in TF_METRICS) for b in diffs]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_csv(spec: Spec, rows: dict, path: Path) -> None:
    diffs = spec.baselines
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "n_seeds", "rougeL_mean", "rougeL_ci95_half"]
                   + [f"diff_{b}_{k}" for b in diffs for k in ("mean", "lo", "hi", "excludes_zero")]
                   + [f"seed_{s}" for s in spec.seeds] + [c for c, _ in EXTRA]
                   + [f"diff_{b}_{k}" for b in diffs for k in ("mde80", "sd", "eval_share")]
                   + [f"tf_{k}_{x}" for k in TF_METRICS for x in ("mean", "ci95_half")]
                   + [f"diff_{b}_{k}_{x}" for b in diffs for k in TF_METRICS for x in ("mean", "lo", "hi")])
        for m, r in rows.items():
            iv = r["interval"]
            row = [m, len(r["scores"]), "" if iv is None else iv.mean, "" if iv is None else iv.half]
            for b in diffs:
                d = r["diff"].get(b)
                row += ["", "", "", ""] if d is None else [d.mean, d.lo, d.hi, d.excludes_zero]
            row += [r["scores"].get(s, "") for s in spec.seeds]
            row += ["" if r["extra"][c] is None else r["extra"][c] for c, _ in EXTRA]
            for b in diffs:
                nb = r["budget"].get(b)
                row += ["", "", ""] if nb is None else [nb.mde, nb.sd, nb.eval_share]
            for k in TF_METRICS:
                t = r["tf"][k]["interval"]
                row += ["", ""] if t is None else [t.mean, t.half]
            for b in diffs:
                for k in TF_METRICS:
                    d = (r["tf_diff"].get(b) or {}).get(k)
                    row += ["", "", ""] if d is None else [d.mean, d.lo, d.hi]
            w.writerow(row)


def bar_chart(spec: Spec, rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m for m in rows if rows[m]["interval"] is not None]
    means = [rows[m]["interval"].mean for m in names]
    errs = [0.0 if not math.isfinite(rows[m]["interval"].half) else rows[m]["interval"].half for m in names]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(names) + 1.5), 3.6))
    ax.bar(range(len(names)), means, yerr=errs, capsize=4, color="#4C72B0")
    for i, m in enumerate(names):  # the seeds themselves, so a reader sees the spread behind each bar
        ys = list(rows[m]["scores"].values())
        ax.plot([i] * len(ys), ys, "k.", ms=4)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test ROUGE-L (mean, 95% CI)")
    lo = min(min(rows[m]["scores"].values()) for m in names) if names else 0
    ax.set_ylim(max(0.0, lo - 5), None)
    ax.set_title(f"{spec.name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _evaluated(r: dict) -> str:
    if r.get("eval_only"):
        return "reference model"
    ev = r.get("evaluated")
    return "unrecorded" if not ev else f"{ev['selection']} (step {ev['step']})"


def _tally(found: dict, read) -> str:
    """'a (3 cells), b (1 cell)': what the cells recorded, so a report says what decided it (e.g. the span rule)."""
    counts: dict[str, int] = {}
    for runs in found.values():
        for r in runs.values():
            counts[read(r)] = counts.get(read(r), 0) + 1
    return ", ".join(f"{k} ({n} cell{'s' if n != 1 else ''})" for k, n in sorted(counts.items())) or "no cells"


def write_report(spec: Spec, out: Path, *, wall_time_s: float | None = None, notes: str = "",
                 name: str = "report") -> dict:
    """<out>/<name>.md, .csv, .png and <out>/stamp.json (<name>.stamp.json for another name): several presets
    may report on the cells of one out_dir (their shared cells are run once)."""
    found = collect(spec, out)
    rows = report_stats(spec, found)
    if wall_time_s is None:  # the cells' processes, summed (what the comparison cost on this machine)
        wall_time_s = wall_time(spec, out)
    stamp = {"commit": git_commit(), "config_hash": spec.config_hash(), "machine": machine(),
             "wall_time": f"{wall_time_s / 60:.1f} min", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "span": _tally(found, lambda r: "none" if r.get("eval_only") else
                            (r.get("span_backend") or {}).get("backend", "unrecorded")),
             "evaluated": _tally(found, _evaluated)}
    md = to_markdown(spec, rows, stamp=stamp, notes=notes)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / f"{name}.md", "csv": out / f"{name}.csv", "png": out / f"{name}.png"}
    paths["md"].write_text(md)
    write_csv(spec, rows, paths["csv"])
    bar_chart(spec, rows, paths["png"])
    (out / ("stamp.json" if name == "report" else f"{name}.stamp.json")).write_text(json.dumps(stamp, indent=2))
    return {"markdown": md, "rows": rows, "paths": paths, "stamp": stamp}
