"""What each variance-reduction lever buys, measured on committed cells: the noise budget of chosen paired
differences under the paper protocol (results/testbed_v1) and the resolution protocol (results/testbed), and,
within the new cells, the same differences with the lever taken away.

    python tools/noise_levers.py [--pairs mgsr:kd mgsr:no_span ...] [--json bench/results/noise_levers.json]

Levers (each row: sd of the per-seed paired difference, its eval / training split, the 95% half-width):
- protocol v1 -> v2: best-of-3 selection on 64 dev prompts and 200 x 5 test generations -> the end of the
  cosine schedule and 1000 x 3 (the two cell sets share training seeds, student starts and data order);
- test split 1000 -> 200 prompts: the v2 cells rescored on their first 200 prompts (the v1 test split; the
  synthetic split is prefix-stable), from the per-prompt scores in results.json;
- common random numbers: the evaluation variance with the eval seeds paired (same seed, same prompt, both
  methods) against unpaired (each cell's own decoding variance added up);
- a deterministic metric: the teacher-forced FKL / NLL differences, whose evaluation variance is 0.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mgsr.noise_budget import (  # noqa: E402
    NoiseBudget,
    _var,
    deterministic_budget,
    noise_budget,
    per_eval_seed,
    teacher_forced_value,
)

DEFAULT_PAIRS = ["mgsr:kd", "kd:sft", "mgsr:no_span", "mgsr:no_scrg", "mgsr:clip_q20_80", "mgsr:multi_t0.8",
                 "mgsr:w_dac0_span1", "inc/scrg:inc/kd", "inc/dac:inc/scrg", "mgsr:inc/dac"]


def cells(out: Path, method: str) -> dict[int, dict]:
    d = out / "runs" / method.replace("/", "_")
    found = {}
    for p in sorted(d.glob("seed*/results.json")):
        r = json.loads(p.read_text())
        if "eval" in r:
            found[int(p.parent.name[4:])] = r
    return found


def first_prompts(r: dict, n: int) -> dict | None:
    """{eval seed: mean ROUGE-L over the first n prompts} from the cell's per-prompt scores (sets averaged)."""
    pp = (r.get("eval") or {}).get("per_prompt") or {}
    if not pp:
        return None
    sets = list(pp)
    seeds = set.intersection(*(set(pp[s]) for s in sets))
    return {j: sum(sum(pp[s][j][:n]) / len(pp[s][j][:n]) for s in sets) / len(sets) for j in sorted(seeds)}


def unpaired_eval_var(a: dict, b: dict) -> float:
    """The decoding variance of A - B if the two cells' eval seeds were independent: var_A/k + var_B/k."""
    def v(x):  # the variance of one cell's mean over its eval seeds
        return _var(list(x.values())) / len(x)

    common = sorted(set(a) & set(b))
    return sum(v(a[s]) + v(b[s]) for s in common) / len(common)


def row(label: str, nb: NoiseBudget | None, **extra) -> dict:
    if nb is None:
        return {"lever": label, "n": 0}
    return {"lever": label, "n": nb.n, "sd": nb.sd, "eval_sd": math.sqrt(nb.var_eval) if math.isfinite(nb.var_eval)
            else None, "train_sd": math.sqrt(nb.var_train) if math.isfinite(nb.var_train) else None,
            "half": nb.half, "mde80": nb.mde, **extra}


def levers_for(a: str, b: str, v1: Path, v2: Path) -> list[dict]:
    out = []
    for tag, root in (("v1 (paper protocol)", v1), ("v2 (resolution protocol)", v2)):
        A, B = cells(root, a), cells(root, b)
        ea = {s: per_eval_seed(r) for s, r in A.items() if per_eval_seed(r)}
        eb = {s: per_eval_seed(r) for s, r in B.items() if per_eval_seed(r)}
        nb = noise_budget(ea, eb)
        extra = {}
        if nb is not None:
            extra["eval_sd_unpaired"] = math.sqrt(unpaired_eval_var(ea, eb))
            extra["mean"] = sum(sum(ea[s].values()) / len(ea[s]) - sum(eb[s].values()) / len(eb[s])
                                for s in sorted(set(ea) & set(eb))) / nb.n
        out.append(row(f"{tag}: ROUGE-L", nb, **extra))
        if root == v2:
            fa = {s: x for s, r in A.items() if (x := first_prompts(r, 200))}
            fb = {s: x for s, r in B.items() if (x := first_prompts(r, 200))}
            out.append(row("v2 rescored on its first 200 prompts: ROUGE-L", noise_budget(fa, fb)))
            for k in ("fkl", "nll"):
                ta = {s: x for s, r in A.items() if (x := teacher_forced_value(r, k)) is not None}
                tb = {s: x for s, r in B.items() if (x := teacher_forced_value(r, k)) is not None}
                nbk = deterministic_budget(ta, tb)
                mean = (sum(ta[s] - tb[s] for s in set(ta) & set(tb)) / nbk.n) if nbk else None
                out.append(row(f"v2 teacher-forced {k.upper()} (nats/token)", nbk, mean=mean))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", nargs="+", default=DEFAULT_PAIRS, help="A:B method labels")
    ap.add_argument("--v1", default="results/testbed_v1")
    ap.add_argument("--v2", default="results/testbed")
    ap.add_argument("--json", default="bench/results/noise_levers.json")
    ap.add_argument("--md", default="results/testbed/noise_levers.md", help="the stamped table (docs copy it)")
    args = ap.parse_args(argv)
    results = {}
    lines = ["| difference | lever | seeds | mean | sd | eval sd (paired) | eval sd (unpaired) | training sd | "
             "95% half | MDE 80% |", "| --- |" + " --- |" * 9]
    f = lambda x, p=".2f": "—" if x is None else format(x, p)  # noqa: E731
    for pair in args.pairs:
        a, b = pair.split(":")
        rows = levers_for(a, b, REPO / args.v1, REPO / args.v2)
        results[f"{a} - {b}"] = rows
        for r in rows:
            if r["n"] < 2:
                continue
            p = ".3f" if "teacher-forced" in r["lever"] else ".2f"
            lines.append(f"| {a} − {b} | {r['lever']} | {r['n']} | {f(r.get('mean'), '+' + p)} | {f(r['sd'], p)} | "
                         f"{f(r['eval_sd'], p)} | {f(r.get('eval_sd_unpaired'), p)} | {f(r['train_sd'], p)} | "
                         f"{f(r['half'], p)} | {f(r['mde80'], p)} |")
    print("\n".join(lines))
    from mgsr.compare import git_commit, machine

    stamp = (f"commit `{git_commit()}` · {machine()} · {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · "
             f"cells: {args.v1} (paper protocol), {args.v2} (resolution protocol)")
    Path(args.md).write_text("# What each variance lever bought\n\n" + stamp + "\n\n" + __doc__.split("\n\n", 2)[2]
                             + "\n" + "\n".join(lines) + "\n")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
