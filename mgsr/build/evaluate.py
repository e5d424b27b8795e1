"""The final evaluation of a run: its sets with its settings, exposure bias against the teacher, results.json /
results.md; and `eval_only` runs, which evaluate the teacher or the student's start instead of training."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from mgsr.build.student import build_student
from mgsr.build.teacher import ensure_teacher
from mgsr.config import ConfigError
from mgsr.evaluation.entry import settings_from
from mgsr.evaluation.run import EvalSettings, evaluate_sets
from mgsr.evaluation.tables import markdown_table

log = logging.getLogger("mgsr")


def final_evaluation(cfg: DictConfig, model, tokenizer, final_sets, results: dict) -> None:
    sets, labels, skipped = final_sets
    results["eval"] = evaluate_sets(model, tokenizer, sets, eval_settings(cfg), log=log.info)
    results["eval"].update(labels=labels, skipped_rows=skipped)
    results["table"] = markdown_table(results["eval"]["summary"], metrics=("rougeL", "distinct_1", "distinct_2",
                                      "exact_match", "tokens_per_s"), set_order=list(sets), label_overrides=labels)


def write_results(run_dir: Path, results: dict, t_start: float) -> None:
    results["wall_time_s"] = time.perf_counter() - t_start
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=float))
    if "table" in results:
        (run_dir / "results.md").write_text(results["table"])


EVAL_ONLY = ("teacher", "student_init")


def evaluate_reference(cfg: DictConfig, run_dir: Path, tokenizer, dm, final_sets, t_start: float) -> dict:
    """`eval_only=teacher|student_init`: evaluate the run's teacher, or the student as every method starts it,
    with the final evaluation's settings, and write results.json like a trained run (a comparison's reference
    rows)."""
    which = cfg.eval_only
    model = ensure_teacher(cfg, tokenizer, dm) if which == "teacher" else build_student(cfg, tokenizer)
    results = {"name": cfg.name, "seed": cfg.seed, "run_dir": str(run_dir), "eval_only": which,
               "data_stats": dm.stats}
    final_evaluation(cfg, model, tokenizer, final_sets, results)
    if cfg.eval.get("teacher_forced"):
        results["teacher_forced"] = teacher_forced(cfg, model, model if which == "teacher" else None, tokenizer, dm,
                                                   final_sets)
    if which == "student_init" and cfg.eval.get("exposure_bias"):
        results["exposure"] = exposure_bias(cfg, model, None, tokenizer, dm)
    write_results(run_dir, results, t_start)
    return results


def exposure_bias(cfg: DictConfig, student, teacher, tokenizer, dm) -> dict:
    """ExAccErr@15 on dev prompts (METHOD.md 7); loads the (cached) teacher for runs that trained without it.
    Without a loadable teacher it is skipped with a warning and {"skipped": reason}; a failure of the
    measurement itself is a bug and is raised."""
    from mgsr.evaluation.exposure import measure_exposure_bias

    e = cfg.eval
    teacher, reason = loaded_teacher(cfg, teacher, tokenizer, dm)
    if teacher is None:
        log.warning("exposure bias skipped: %s", reason)
        return {"skipped": reason}
    teacher.to(next(student.parameters()).device)
    out = measure_exposure_bias(teacher, student, tokenizer, dm.records["val"], n_prompts=e.exposure_prompts,
                                seed=e.exposure_seed, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                                max_prompt_len=cfg.data.max_prompt_len)
    log.info("exposure bias: ExAccErr@%d = %.1f%% on %d dev prompts", out["at"], out["exacc_err"], out["n_prompts"])
    return out


def loaded_teacher(cfg: DictConfig, teacher, tokenizer, dm):
    """(teacher, None), loading the (cached) teacher for runs that trained without it, or (None, why not)."""
    if teacher is not None:
        return teacher, None
    try:
        return ensure_teacher(cfg, tokenizer, dm), None
    except (ConfigError, OSError, ValueError) as err:  # no teacher to compare with: skip, never fail the run
        return None, f"no teacher to compare with ({type(err).__name__}: {err})"


def teacher_forced(cfg: DictConfig, student, teacher, tokenizer, dm, final_sets) -> dict:
    """`eval.teacher_forced`: NLL and forward KL to the teacher on each final set's clean references
    (mgsr/evaluation/teacher_forced.py), deterministic, with the final evaluation's prompt cap and limit."""
    from mgsr.evaluation.teacher_forced import teacher_forced_metrics

    teacher, reason = loaded_teacher(cfg, teacher, tokenizer, dm)
    if teacher is not None:
        teacher.to(next(student.parameters()).device)
    else:
        log.warning("teacher-forced FKL skipped (NLL still measured): %s", reason)
    sets, _, _ = final_sets
    limit = eval_limit(cfg)
    out = {}
    for name, records in sets.items():
        out[name] = teacher_forced_metrics(student, teacher, tokenizer, records[:limit] if limit else records,
                                           batch_size=cfg.eval.batch_size, max_prompt_len=cfg.data.max_prompt_len,
                                           max_len=cfg.data.max_len)
        log.info("teacher-forced %s: NLL %.4f, FKL %s (%d tokens)", name, out[name]["nll"],
                 "—" if out[name]["fkl"] is None else f"{out[name]['fkl']:.4f}", out[name]["tokens"])
    return out


def eval_settings(cfg: DictConfig) -> EvalSettings:
    """The final evaluation's settings: the run's `eval` node read as evaluate.py reads its config, with the
    run's prompt bound (`data.max_prompt_len`) and `eval_limit`."""
    return settings_from(cfg.eval, max_prompt_len=cfg.data.max_prompt_len, limit=eval_limit(cfg))


def eval_limit(cfg: DictConfig) -> int | None:
    """Prompts per final evaluation set: `eval.limit`, and never more than `data.max_eval_records`, the one
    knob that bounds every evaluation of a run (it already cuts the dev and test splits, hence validation
    and exposure bias)."""
    limits = [int(x) for x in (cfg.eval.get("limit"), cfg.data.get("max_eval_records")) if x]
    return min(limits) if limits else None
