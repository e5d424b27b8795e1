"""The table a sweep produces: one row per variant, mean ± std over training seeds, and each variant's paired
difference to the reference variant with its 95% CI and noise budget (mgsr/paired_report.py).

    python -m mgsr.report multirun/ablation_loss_weights/2026-01-01_12-00-00      # writes report.* there
    python -m mgsr.report multirun/mgsr/<time> multirun/ablation_no_span/<time> --out reports/no_span

Every run of a sweep leaves `<job>/results.json` (mgsr.pipeline.run) and `<job>/.hydra/overrides.yaml`.
A run's *variant* is its command-line overrides minus `seed` and minus the overrides every run shares
(so `+experiment=...` and reduced-step settings drop out); with several experiment names the name leads.
Each run's metric is already a mean over evaluation seeds; a variant's cell is the mean ± sample std of
those run means over its training seeds (std 0 for a single seed). Writes `report.md`, `report.csv`,
`report.png` (the paired differences to the reference with their CIs; bars of Average ROUGE-L ± std when
there is a single variant) and, when the runs logged to W&B, a `wandb.Table` in the
sweep's W&B group. After `python train.py -m ...` this runs by itself (`SweepReportCallback`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import yaml

try:  # the Hydra callback base class; mgsr.report must stay importable (and light) without it
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object

log = logging.getLogger("mgsr.report")

AVERAGE = "Average"
SEED_KEYS = ("seed", "+seed", "++seed")
# Overrides that never describe a variant (where files go, how a run is displayed).
HOUSEKEEPING = ("cache_dir", "hydra.", "logger", "trainer.enable_progress_bar", "ckpt_path", "group")
# (column, display label, how to read it from a results.json) for the second table.
EXTRA_COLUMNS = (
    ("distinct_1", "Distinct-1", lambda r: _summary(r, AVERAGE, "distinct_1")),
    ("distinct_2", "Distinct-2", lambda r: _summary(r, AVERAGE, "distinct_2")),
    ("exacc_err", "ExAccErr@15 (%)", lambda r: (r.get("exposure") or {}).get("exacc_err")),
    ("val_rougeL", "val ROUGE-L", lambda r: r.get("val", {}).get("val/rougeL")),
    ("s_per_step", "s/step", lambda r: r.get("train_cost", {}).get("s_per_step")),
    ("tokens_per_s", "train tokens/s", lambda r: r.get("train_cost", {}).get("train_tokens_per_s")),
    ("peak_mem_mb", "peak mem (MB)", lambda r: r.get("train_cost", {}).get("peak_mem_mb")),
    ("scrg_time_pct", "gen+SCRG time (%)", lambda r: _pct(r.get("train_cost", {}).get("scrg_time_share"))),
    ("corrected_per_seq", "corrected/seq", lambda r: (r.get("scrg") or {}).get("corrected_per_seq")),
)


def _summary(results: dict, eval_set: str, metric: str):
    cell = results.get("eval", {}).get("summary", {}).get(eval_set, {}).get(metric)
    return cell[0] if isinstance(cell, (list, tuple)) else cell


def _pct(x):
    return None if x is None else 100.0 * x


# -- collecting runs ---------------------------------------------------------------------------------------------
@dataclass
class Run:
    dir: Path
    results: dict
    overrides: list[str] = field(default_factory=list)
    source: int = 0                   # which of the given folders it came from

    @property
    def name(self) -> str:
        return str(self.results.get("name", ""))

    @property
    def seed(self):
        return self.results.get("seed")


def _job_key(path: Path):
    """Sort job folders numerically (2 before 10)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_runs(dirs) -> tuple[list[Run], list[Path]]:
    """Runs under the given sweep (or run) folders, in sweep order, and job folders that left no results.json
    (failed or still running)."""
    runs, missing = [], []
    for src, d in enumerate(map(Path, dirs)):
        if not d.is_dir():
            raise FileNotFoundError(f"not a directory: {d}")
        for res in sorted(d.rglob("results.json"), key=lambda p: _job_key(p.parent)):
            over = res.parent / ".hydra" / "overrides.yaml"
            overrides = [str(o) for o in (yaml.safe_load(over.read_text()) or [])] if over.is_file() else []
            runs.append(Run(res.parent, json.loads(res.read_text()), overrides, src))
        for hyd in sorted(d.rglob(".hydra"), key=lambda p: _job_key(p.parent)):
            if not (hyd.parent / "results.json").is_file():
                missing.append(hyd.parent)
    return runs, missing


def _short(value: str) -> str:
    """Optuna's long floats, shortened for labels (2.2403726653165665 -> 2.2404)."""
    try:
        return f"{float(value):.5g}" if "." in value and len(value) > 8 else value
    except ValueError:
        return value


def _display(override: str) -> str:
    key, _, value = override.lstrip("+~").partition("=")
    return _short(value) if key == "experiment" else f"{key}={_short(value)}"


def variant_labels(runs: list[Run]) -> tuple[list[str], str]:
    """A label per run and the header of the label column.

    The label lists the overrides that are not the seed, not housekeeping (cache_dir, hydra.*, ...) and
    not shared by every run of the same folder; if exactly one key varies, the label is its value and the
    header names the key. Runs of different experiments lead with the experiment name.
    """
    def keep(o):
        key = o.lstrip("+~").partition("=")[0]
        return o.partition("=")[0] not in SEED_KEYS and not key.startswith(HOUSEKEEPING)

    per_run = [[o for o in r.overrides if keep(o)] for r in runs]
    common = {}
    for r, p in zip(runs, per_run):
        common[r.source] = common[r.source] & set(p) if r.source in common else set(p)
    distinct = [[o for o in p if o not in common[r.source]] for r, p in zip(runs, per_run)]
    names_differ = len({r.name for r in runs}) > 1
    keys = {o.partition("=")[0] for p in distinct for o in p}
    header = "variant"
    if len(keys) == 1 and not names_differ and all(len(p) == 1 for p in distinct):
        header = next(iter(keys)).lstrip("+~")
        return [_short(p[0].partition("=")[2]) for p in distinct], header
    labels = []
    for r, p in zip(runs, distinct):
        parts = [_display(o) for o in p if not (names_differ and _display(o) == r.name)]
        labels.append(", ".join(([r.name] if names_differ else []) + parts) or r.name or "run")
    return labels, header


# -- the table ---------------------------------------------------------------------------------------------------
@dataclass
class Report:
    rows: dict            # variant -> column -> (mean, std) | float
    seeds: dict           # variant -> training seeds
    run_dirs: dict        # variant -> run folders
    eval_sets: list
    header: str
    rouge_columns: list
    extra_columns: list
    labels: dict          # column -> display label
    missing: list
    names: list           # experiment names of the runs
    by_variant: dict = field(default_factory=dict)   # variant -> its runs' results.json (paired differences)
    reference: str | None = None                     # the variant every other is paired against
    reference_how: str = ""


def _mean_std(values):
    from mgsr.evaluation.tables import mean_std

    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return mean_std(vals) if vals else None


def build_report(dirs) -> Report:
    runs, missing = find_runs(dirs)
    if not runs:
        raise FileNotFoundError(f"no results.json under {', '.join(map(str, dirs))} (did the runs finish?)")
    labels, header = variant_labels(runs)
    eval_sets, set_labels = [], {}
    for r in runs:
        set_labels.update(r.results.get("eval", {}).get("labels") or {})  # e.g. uinst -> "U-NI subset"
        for s in r.results.get("eval", {}).get("summary", {}):
            if s != AVERAGE and s not in eval_sets:
                eval_sets.append(s)
    rouge_cols = [f"rougeL/{s}" for s in eval_sets] + [f"rougeL/{AVERAGE}"]
    col_labels = {f"rougeL/{s}": f"ROUGE-L {set_labels.get(s, s)}" for s in eval_sets}
    col_labels[f"rougeL/{AVERAGE}"] = "ROUGE-L Average"
    col_labels |= {key: label for key, label, _ in EXTRA_COLUMNS}

    values: dict[str, dict[str, list]] = {}
    seeds, run_dirs = {}, {}
    for r, label in zip(runs, labels):
        cols = values.setdefault(label, {})
        for s in eval_sets + [AVERAGE]:
            cols.setdefault(f"rougeL/{s}", []).append(_summary(r.results, s, "rougeL"))
        for key, _, read in EXTRA_COLUMNS:
            cols.setdefault(key, []).append(read(r.results))
        seeds.setdefault(label, []).append(r.seed)
        run_dirs.setdefault(label, []).append(str(r.dir))
    rows = {label: {c: _mean_std(v) for c, v in cols.items()} for label, cols in values.items()}
    extra = [k for k, _, _ in EXTRA_COLUMNS if any(rows[v].get(k) is not None for v in rows)]
    names = sorted({r.name for r in runs})
    by_variant: dict[str, list[dict]] = {}
    for r, label in zip(runs, labels):
        by_variant.setdefault(label, []).append(r.results)
    reference, how = reference_variant(runs, list(by_variant))
    return Report(rows, seeds, run_dirs, eval_sets, header, rouge_cols, extra, col_labels, missing, names,
                  by_variant, reference, how)


def reference_variant(runs: list[Run], variants: list[str]) -> tuple[str | None, str]:
    """The variant to pair against: the experiment's `sweep_reference` (from a run's config.yaml) when it names
    one of the variants, else the first variant. None with a single variant (nothing to pair)."""
    if len(variants) < 2:
        return None, ""
    for r in runs:
        cfg_path = r.dir / "config.yaml"
        if cfg_path.is_file():
            declared = (yaml.safe_load(cfg_path.read_text()) or {}).get("sweep_reference")
            if declared is not None and str(declared) in variants:
                return str(declared), "the experiment's sweep_reference: MGSR itself"
            break
    return variants[0], "the first variant; an experiment names its own with `sweep_reference`"


def to_markdown(rep: Report, title: str) -> str:
    from mgsr.evaluation.tables import comparison_table

    lines = [f"# {title}", "",
             "Mean ± std over training seeds; each run's value is itself a mean over its evaluation seeds. "
             "ROUGE-L and ExAccErr in %, Distinct-n as a fraction.", "",
             "## ROUGE-L", "", comparison_table(rep.rows, rep.rouge_columns, row_label=rep.header,
                                                 label_overrides=rep.labels)]
    if rep.extra_columns:
        lines += ["## Diversity, exposure bias, training cost", "",
                  comparison_table(rep.rows, rep.extra_columns, row_label=rep.header, label_overrides=rep.labels)]
    if rep.reference is not None:
        from mgsr.paired_report import paired_markdown, paired_rows

        lines += [*paired_markdown(paired_rows(rep.by_variant, rep.reference), rep.reference, how=rep.reference_how),
                  ""]
    lines += ["## Runs", "", f"| {rep.header} | seeds | run folders |", "| --- | --- | --- |"]
    lines += [f"| {v} | {', '.join(map(str, rep.seeds[v]))} | {', '.join(rep.run_dirs[v])} |" for v in rep.rows]
    if rep.missing:
        lines += ["", f"Jobs without results.json (failed or unfinished, left out): "
                      f"{', '.join(map(str, rep.missing))}"]
    return "\n".join(lines) + "\n"


def bar_chart(rep: Report, path: Path, title: str) -> Path:
    """Average ROUGE-L per variant with std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rep.rows)
    cells = [rep.rows[n].get(f"rougeL/{AVERAGE}") or (math.nan, 0.0) for n in names]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(names) + 1.5), 3.6))
    ax.bar(range(len(names)), [c[0] for c in cells], yerr=[c[1] for c in cells], capsize=4, color="#4C72B0")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([textwrap.shorten(n, 60) for n in names], rotation=30 if len(names) > 3 else 0, ha="right" if len(names) > 3 else "center",
                       fontsize=8)
    ax.set_ylabel("ROUGE-L, Average (mean ± std)")
    ax.set_xlabel(rep.header)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _wandb_settings(run_dirs) -> dict | None:
    """The W&B project/mode the runs used (from a run's resolved config.yaml); None when they did not log."""
    for d in run_dirs:
        cfg_path = Path(d) / "config.yaml"
        if cfg_path.is_file():
            w = ((yaml.safe_load(cfg_path.read_text()) or {}).get("logger") or {}).get("wandb") or {}
            if w.get("enabled") and w.get("mode") not in (None, "disabled"):
                return w
            return None
    return None


def log_wandb_table(rep: Report, *, group: str, settings: dict | None, out_dir: Path) -> bool:
    """Log the table as a `wandb.Table` into the active run, or into a short `report` run of the sweep's
    group (online or offline, as the runs were). Never raises: W&B must not block a report."""
    if settings is None and os.environ.get("WANDB_MODE") != "online":
        return False
    try:
        import wandb

        columns = rep.rouge_columns + rep.extra_columns
        header = [rep.header, "seeds"] + [f"{rep.labels.get(c, c)} {k}" for c in columns for k in ("mean", "std")]
        data = []
        for v, cells in rep.rows.items():
            row = [v, len(rep.seeds[v])]
            for c in columns:
                cell = cells.get(c)
                row += list(cell) if isinstance(cell, tuple) else [cell, None]
            data.append(row)
        table = wandb.Table(columns=header, data=data)
        run, own = wandb.run, wandb.run is None
        if own:
            s = settings or {}
            mode = os.environ.get("WANDB_MODE") or s.get("mode", "offline")
            run = wandb.init(project=s.get("project", "mgsr"), entity=s.get("entity"), group=group, job_type="report",
                             name=f"{group}/report", dir=str(out_dir), mode=mode,
                             settings=wandb.Settings(init_timeout=60, silent=True))
        run.log({"report": table})
        if own:
            run.finish()
        return True
    except Exception as e:  # noqa: BLE001
        log.warning("report: W&B table not logged (%s)", e)
        return False


def write_report(dirs, out_dir=None, *, wandb_mode: str = "auto") -> dict:
    """Collect the runs under `dirs`, write report.md / report.csv / report.png to `out_dir` (default: the
    first dir). Returns {"markdown", "paths", "report"}."""
    from mgsr.build.trainer import sweep_group  # the runs' own W&B group (here: no omegaconf at import)
    from mgsr.evaluation.tables import write_csv

    dirs = [Path(d) for d in dirs]
    out = Path(out_dir) if out_dir else dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    rep = build_report(dirs)
    names = rep.names
    title = " + ".join(names) + f" — {len(rep.rows)} variants, {sum(map(len, rep.seeds.values()))} runs"
    md = to_markdown(rep, title)
    paths = {"md": out / "report.md", "csv": out / "report.csv", "png": out / "report.png"}
    paths["md"].write_text(md)
    csv_rows = {v: {**cells, "n_seeds": float(len(rep.seeds[v]))} for v, cells in rep.rows.items()}
    write_csv(csv_rows, ["n_seeds"] + rep.rouge_columns + rep.extra_columns, paths["csv"], row_label=rep.header)
    if rep.reference is not None:  # an ablation is read as differences to its reference, with intervals
        from mgsr.paired_report import forest_plot, paired_rows

        forest_plot(paired_rows(rep.by_variant, rep.reference), rep.reference, paths["png"], title)
    else:
        bar_chart(rep, paths["png"], title)
    if wandb_mode != "off":
        settings = _wandb_settings([d for ds in rep.run_dirs.values() for d in ds])
        if wandb_mode in ("online", "offline"):
            settings = {**(settings or {}), "mode": wandb_mode}
        if log_wandb_table(rep, group=sweep_group("+".join(names), dirs[0]), settings=settings, out_dir=out):
            paths["wandb"] = out / "wandb"
    return {"markdown": md, "paths": paths, "report": rep}


class SweepReportCallback(Callback):
    """Hydra callback (conf/train.yaml: hydra.callbacks.sweep_report): when a `-m` sweep ends, write its report
    into the sweep folder and print the table. A failing report only warns; the runs are already saved."""

    def on_multirun_end(self, config, **kwargs) -> None:
        try:
            sweep_dir = Path(str(config.hydra.sweep.dir))
            if not sweep_dir.is_dir():
                log.warning("report: sweep folder %s not found; run python -m mgsr.report <sweep dir>", sweep_dir)
                return
            res = write_report([sweep_dir])
            print("\n" + res["markdown"])
            print(f"report: {res['paths']['md']}  {res['paths']['csv']}  {res['paths']['png']}")
        except Exception as e:  # noqa: BLE001
            log.warning("report: could not build the sweep report (%s); run python -m mgsr.report <sweep dir>", e)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mgsr.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", help="sweep folders (multirun/<name>/<time>) or run folders")
    ap.add_argument("--out", default=None, help="where to write report.* (default: the first folder)")
    ap.add_argument("--wandb", default="auto", choices=("auto", "off", "online", "offline"),
                    help="log the table to W&B: auto = as the runs did (nothing if they did not log)")
    args = ap.parse_args(argv)
    try:
        res = write_report(args.dirs, args.out, wandb_mode=args.wandb)
    except FileNotFoundError as e:
        print(f"error: {e}")
        return 2
    print(res["markdown"])
    print("wrote " + "  ".join(str(p) for p in res["paths"].values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
