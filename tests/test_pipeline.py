"""The default pipeline end to end at a reduced size, evaluate.py on its output, and a two-run sweep."""

import csv
import json
import subprocess
import sys

import pytest
from conftest import REPO, compose_train

from mgsr.evaluation.metrics import rouge_l
from mgsr.pipeline import run


def _scores_match_saved_generations(saved: dict) -> None:
    """The reported test ROUGE-L is the metric of the generations saved next to it (eval.limit=4: all saved)."""
    samples = saved["eval"]["samples"]["test"]
    assert len(samples) == 4
    got = rouge_l([x["prediction"] for x in samples], [x["references"] for x in samples])
    assert saved["eval"]["per_seed"]["test"]["10"]["rougeL"] == pytest.approx(got)
    assert saved["eval"]["summary"]["test"]["rougeL"] == pytest.approx([got, 0.0])  # one eval seed: std 0


def _last_logged(run_dir, key: str) -> float:
    rows = [r for r in csv.DictReader((run_dir / "csv" / "metrics.csv").open()) if r.get(key)]
    return float(rows[-1][key])


@pytest.mark.slow  # the pipeline end to end, then evaluate.py twice
def test_default_pipeline_end_to_end(tmp_path, tiny_overrides):
    cfg = compose_train(tiny_overrides)
    res = run(cfg, tmp_path / "run")
    run_dir = tmp_path / "run"
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["eval"]["seeds"] == [10]
    _scores_match_saved_generations(saved)
    assert "| rougeL |" in (run_dir / "results.md").read_text()
    assert (run_dir / "student" / "config.json").is_file() and (run_dir / "student" / "tokenizer.json").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert saved["train_cost"]["s_per_step"] > 0
    assert (run_dir / "csv" / "metrics.csv").is_file()
    header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0]
    for name in ("train/loss", "train/sft", "dac/kl", "dac/coverage", "span/loss", "scrg/unchanged_share"):
        assert name in header, name
    # the selection metric is what the last validation logged, and best.ckpt is the checkpoint it selected
    assert res["val"]["val/rougeL"] == pytest.approx(_last_logged(run_dir, "val/rougeL"))
    assert res["checkpoint"].endswith("best.ckpt")
    # what decided the cell is on record: the span rule, the evaluated step, per-prompt scores, held-out metrics
    assert saved["span_backend"] == {"backend": "nltk"}
    assert saved["evaluated"]["selection"] == "best val/rougeL" and saved["evaluated"]["path"] == res["checkpoint"]
    assert 0 < saved["evaluated"]["step"] <= cfg.trainer.max_steps
    per_prompt = saved["eval"]["per_prompt"]["test"]["10"]
    assert len(per_prompt) == 4
    assert sum(per_prompt) / 4 == pytest.approx(saved["eval"]["per_seed"]["test"]["10"]["rougeL"], abs=0.01)
    tf = saved["teacher_forced"]["test"]
    assert tf["records"] == 4 and tf["tokens"] > 4 and tf["nll"] > 0 and tf["fkl"] > 0

    # evaluate.py on the saved student, through the real entry point
    out = subprocess.run(
        [sys.executable, "evaluate.py", f"model_path={run_dir / 'student'}", "seeds=[10,20]", "limit=4",
         "max_new_tokens=8", f"hydra.run.dir={tmp_path / 'eval'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    ev = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(ev["per_seed"]["test"]) == {"10", "20"}
    assert "rougeL" in (tmp_path / "eval" / "results.md").read_text()

    # and from the Lightning checkpoint: same weights as the HF export when best == selected
    out = subprocess.run(
        [sys.executable, "evaluate.py", f"model_path={res['checkpoint']}", "seeds=[10]", "limit=4",
         "max_new_tokens=8", f"hydra.run.dir={tmp_path / 'eval_ckpt'}", f"tokenizer_path={run_dir / 'student'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    a = json.loads((tmp_path / "eval_ckpt" / "results.json").read_text())["per_seed"]["test"]["10"]["rougeL"]
    assert a == ev["per_seed"]["test"]["10"]["rougeL"]


@pytest.mark.slow  # two pipeline runs
def test_sft_only_run_needs_no_teacher(tmp_path, tiny_overrides):
    overrides = [*tiny_overrides, "loss=sft", "cache_dir=" + str(tmp_path / "empty_cache"),
                 "eval.exposure_bias=false", "eval.teacher_forced=false",  # both compare with the teacher
                 "checkpoint.monitor=null"]  # no selection: the weights training ended with are evaluated
    res = run(compose_train(overrides), tmp_path / "run")
    assert res["evaluated"] == {"selection": "end of training", "path": None,
                                "step": compose_train(overrides).trainer.max_steps}
    assert res["span_backend"] == {"backend": "none"} and "teacher_forced" not in res
    assert not list((tmp_path / "empty_cache").glob("teacher-*"))  # no teacher stage for SFT
    header = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train/sft" in header and "dac/" not in header and "scrg/" not in header
    _scores_match_saved_generations(json.loads((tmp_path / "run" / "results.json").read_text()))
    # a seeded run is reproducible: the same config again gives the same losses and scores
    again = run(compose_train(overrides), tmp_path / "again")
    def scores(r):  # everything but the wall-clock throughput
        return {seed: {k: v for k, v in m.items() if k != "tokens_per_s"} for seed, m in r["eval"]["per_seed"]["test"].items()}

    assert again["val"] == res["val"] and scores(again) == scores(res)
    assert _last_logged(tmp_path / "again", "train/sft") == _last_logged(tmp_path / "run", "train/sft")


@pytest.mark.slow  # a train.py -m sweep of two runs
def test_multirun_sweep_of_two_runs(tmp_path, tiny_overrides):
    out = subprocess.run(
        [sys.executable, "train.py", "-m", *tiny_overrides, "seed=0,1", "eval.enabled=false",
         f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted((tmp_path / "sweep").glob("*/results.json"))
    assert len(runs) == 2
    seeds = sorted(json.loads(p.read_text())["seed"] for p in runs)
    assert seeds == [0, 1]


def test_lightning_lines_print_once_and_without_the_cloud_tip():
    import logging

    import lightning  # noqa: F401  (adds its own console handler on import)

    from mgsr.build.trainer import _DropLitLoggerTip, tidy_lightning_logging

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    root, collect = logging.getLogger(), Collect()
    root.addHandler(logging.NullHandler())  # what Hydra does before the job runs: root has handlers
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    rank_zero.addHandler(collect)  # a logger's filters run before its own handlers see a record
    level = rank_zero.level
    rank_zero.setLevel(logging.INFO)  # whatever an ancestor's level is
    try:
        logging.getLogger("lightning").addHandler(logging.StreamHandler())
        tidy_lightning_logging()
        tidy_lightning_logging()  # idempotent: one filter, not two
        assert logging.getLogger("lightning").handlers == []
        assert sum(isinstance(f, _DropLitLoggerTip) for f in rank_zero.filters) == 1
        rank_zero.warning("💡 Tip: try installing [litlogger](https://pypi.org/project/litlogger/)")
        rank_zero.warning("GPU available: False")
        assert collect.messages == ["GPU available: False"]
    finally:
        rank_zero.setLevel(level)
        rank_zero.removeHandler(collect)
        root.handlers = [h for h in root.handlers if not isinstance(h, logging.NullHandler)]
