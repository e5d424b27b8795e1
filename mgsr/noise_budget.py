"""The noise budget of a paired difference: how wide its interval is, what it could detect, and where the noise
comes from (evaluation or training).

A paired difference A - B over n training seeds has per-seed values d_s, each a mean over the k evaluation seeds
j that both cells share (common random numbers: the same prompts and sampling seeds), d_s = mean_j e_sj with
e_sj = A_sj - B_sj. Then, with sd = the sample sd of the d_s and t_q = Student's t quantile at n - 1 df:

    half-width  = t_0.975 * sd / sqrt(n)                      (the 95% CI of compare.py)
    MDE         = (t_0.975 + t_0.80) * sd / sqrt(n)           (the true difference found with 80% power, alpha 5%)
    var_eval    = mean_s [ var_j(e_sj) / k ]                   (decoding noise left in each d_s)
    var_train   = max(sd^2 - var_eval, 0)                      (everything else: the training run itself)
    eval share  = var_eval / sd^2   (capped at 1)

`seeds_for(target)` is the smallest n whose expected half-width t_0.975(n-1) * sd / sqrt(n) is <= target, and
`seeds_for(target, eval_factor=f)` the same with var_eval divided by f (f times the evaluation budget).
A deterministic metric (teacher-forced NLL / FKL) has var_eval = 0 by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def t_quantile(df: int, p: float) -> float:
    """One-sided Student-t quantile: P(T_df <= q) = p."""
    from scipy.stats import t

    return float(t.ppf(p, df))


def _var(xs: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return math.nan
    m = sum(xs) / n
    return sum((x - m) ** 2 for x in xs) / (n - 1)


@dataclass(frozen=True)
class NoiseBudget:
    n: int             # training seeds (pairs)
    sd: float          # sd of the per-seed differences d_s
    var_eval: float    # decoding-noise variance left in one d_s (nan without per-eval-seed scores)

    @property
    def half(self) -> float:
        return t_quantile(self.n - 1, 0.975) * self.sd / math.sqrt(self.n) if self.n >= 2 else math.nan

    @property
    def mde(self) -> float:
        if self.n < 2:
            return math.nan
        return (t_quantile(self.n - 1, 0.975) + t_quantile(self.n - 1, 0.80)) * self.sd / math.sqrt(self.n)

    @property
    def var_train(self) -> float:
        return max(self.sd ** 2 - self.var_eval, 0.0) if math.isfinite(self.var_eval) else math.nan

    @property
    def eval_share(self) -> float:
        if not math.isfinite(self.var_eval) or not self.sd > 0:
            return math.nan
        return min(self.var_eval / self.sd ** 2, 1.0)

    def seeds_for(self, target: float, *, eval_factor: float = 1.0, max_seeds: int = 1000) -> int | None:
        """Training seeds whose expected 95% half-width is <= `target` with `eval_factor` x the evaluation
        budget (the variance split as measured); None if more than `max_seeds`."""
        var = self.sd ** 2 if eval_factor == 1.0 else self.var_train + self.var_eval / eval_factor
        if not math.isfinite(var):
            return None
        for n in range(2, max_seeds + 1):
            if t_quantile(n - 1, 0.975) * math.sqrt(var / n) <= target:
                return n
        return None


def noise_budget(a: dict, b: dict) -> NoiseBudget | None:
    """The budget of A - B from per-seed evaluation scores: `a`, `b` map training seed -> {eval seed: score}
    (a cell with one score and no per-eval-seed split may map to {None: score}). None with < 2 common seeds."""
    common = sorted(set(a) & set(b))
    if len(common) < 2:
        return None
    diffs, evals = [], []
    for s in common:
        shared = sorted(set(a[s]) & set(b[s]), key=str)
        if shared and None not in shared:  # per-eval-seed scores on both sides: pair them (common random numbers)
            e = [a[s][j] - b[s][j] for j in shared]
            diffs.append(sum(e) / len(e))
            evals.append(_var(e) / len(e) if len(e) >= 2 else math.nan)
        else:
            diffs.append(sum(a[s].values()) / len(a[s]) - sum(b[s].values()) / len(b[s]))
            evals.append(math.nan)
    var_eval = sum(evals) / len(evals) if all(math.isfinite(v) for v in evals) else math.nan
    return NoiseBudget(n=len(common), sd=math.sqrt(_var(diffs)), var_eval=var_eval)


def deterministic_budget(a: dict, b: dict) -> NoiseBudget | None:
    """The budget of A - B for a metric without evaluation noise: `a`, `b` map training seed -> value."""
    common = sorted(set(a) & set(b))
    if len(common) < 2:
        return None
    return NoiseBudget(n=len(common), sd=math.sqrt(_var([a[s] - b[s] for s in common])), var_eval=0.0)


def per_eval_seed(results: dict, metric=("Average", "rougeL")) -> dict | None:
    """{eval seed: score} of one cell's results.json: the per-seed scores of its sets, averaged over the sets
    as the cell score is (the summary's "Average"); None when the cell has no per-seed scores."""
    per_seed = (results.get("eval") or {}).get("per_seed") or {}
    if not per_seed:
        return None
    sets = list(per_seed) if metric[0] == "Average" else [metric[0]]
    seeds = set.intersection(*(set(per_seed[s]) for s in sets))
    return {str(j): sum(float(per_seed[s][j][metric[1]]) for s in sets) / len(sets) for j in sorted(seeds, key=str)}


# -- the report's sections ---------------------------------------------------------------------------------------
TARGET_HALF = 0.5  # ROUGE-L: the resolution the lab aims for (the paper's component steps are +0.5 to +0.9)


def teacher_forced_value(results: dict, key: str) -> float | None:
    """A cell's teacher-forced `key` ("nll" | "fkl"), averaged over its sets; None without it."""
    tf = results.get("teacher_forced") or {}
    vals = [v[key] for v in tf.values() if isinstance(v, dict) and v.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def _f(x: float, spec: str = ".2f") -> str:
    return "—" if x is None or not math.isfinite(x) else format(x, spec)


def _seeds(n: int | None) -> str:
    return "> 1000" if n is None else str(n)


def budget_markdown(pairs: list[tuple[str, str, NoiseBudget | None]], *, target: float = TARGET_HALF,
                    eval_factor: float = 4.0) -> list[str]:
    """The noise-budget table: one line per paired difference (label A, label B, its budget)."""
    lines = ["| difference | seeds | 95% half-width | MDE (80% power) | sd | eval sd | training sd | eval share | "
             f"seeds for ±{target} | with {eval_factor:g}x eval |", "| --- |" + " --- |" * 9]
    for a, b, nb in pairs:
        if nb is None:
            continue
        lines.append(f"| {a} − {b} | {nb.n} | {_f(nb.half)} | {_f(nb.mde)} | {_f(nb.sd)} | "
                     f"{_f(math.sqrt(nb.var_eval) if math.isfinite(nb.var_eval) else math.nan)} | "
                     f"{_f(math.sqrt(nb.var_train) if math.isfinite(nb.var_train) else math.nan)} | "
                     f"{_f(100 * nb.eval_share, '.0f')}{'%' if math.isfinite(nb.eval_share) else ''} | "
                     f"{_seeds(nb.seeds_for(target))} | {_seeds(nb.seeds_for(target, eval_factor=eval_factor))} |")
    return lines


BUDGET_NOTE = (
    "Noise budget of each paired difference (mgsr/noise_budget.py): the 95% half-width; the MDE, the true "
    "difference this many seeds detect with 80% power; the sd of the per-seed differences split into the "
    "evaluation's decoding noise (from the per-eval-seed scores, paired on common seeds) and the rest, training; "
    "and the training seeds an expected half-width of ±{t} would take as measured, and with {f:g}x the "
    "evaluation budget.")
