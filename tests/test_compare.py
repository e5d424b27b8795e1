"""compare.py / mgsr.compare: the interval arithmetic against hand-computed values, resume (a finished cell is
not run again), the report's columns, and one real two-cell comparison through the entry point."""

import csv
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest

from mgsr.compare import Spec, paired_difference, run_cells, t_interval, t_quantile, write_report

REPO = Path(__file__).resolve().parents[1]


def test_t_quantile_matches_the_table():
    # two-sided 95% critical values of Student's t (any statistics textbook's table)
    for df, q in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)):
        assert t_quantile(df) == pytest.approx(q, abs=1e-3)


def test_t_interval_by_hand():
    iv = t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.302653
    assert iv.mean == pytest.approx(2.0)
    assert iv.half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert not t_interval([-1.0, 1.0, 0.5]).excludes_zero


def test_t_interval_excludes_zero_only_when_it_does():
    assert t_interval([1.0, 2.0, 3.0]).lo == pytest.approx(2.0 - 2.484138, abs=1e-5)
    assert not t_interval([1.0, 2.0, 3.0]).excludes_zero  # lo = -0.484
    assert t_interval([2.0, 2.5, 3.0]).excludes_zero       # mean 2.5, half 1.242
    one = t_interval([5.0])
    assert one.n == 1 and math.isnan(one.half) and not one.excludes_zero


def test_readings_follow_the_interval_and_the_metric_direction():
    from mgsr.compare import _reading

    up, down, zero = t_interval([2.0, 2.5, 3.0]), t_interval([-2.0, -2.5, -3.0]), t_interval([-1.0, 1.0, 0.5])
    assert (_reading(up), _reading(down), _reading(zero)) == ("measurably better", "measurably worse",
                                                               "no measurable difference")
    assert _reading(down, lower_is_better=True) == "measurably better"  # e.g. FKL went down
    assert _reading(t_interval([5.0])) == "no measurable difference"  # one seed: no claim


def test_identical_values_make_no_claim():
    """Seeds that changed nothing give a 0-wide interval: that is no evidence, so no mark and no bracket."""
    from mgsr.compare import _fmt_diff

    same = paired_difference({0: 6.54, 1: 6.54, 2: 6.54}, {0: 6.41, 1: 6.41, 2: 6.41})
    assert same.half == pytest.approx(0.0, abs=1e-12) and not same.excludes_zero
    assert _fmt_diff(same) == "+0.13 (identical over 3 pairs: no spread, no CI)"


def test_paired_difference_uses_common_seeds_only():
    a = {0: 3.0, 1: 5.0, 2: 4.0}
    b = {0: 1.0, 1: 2.0, 2: 2.0, 3: 9.0}  # seed 3 has no partner
    d = paired_difference(a, b)  # differences 2, 3, 2: mean 7/3, sd sqrt(1/3)
    assert d.n == 3
    assert d.mean == pytest.approx(7 / 3)
    assert d.half == pytest.approx(4.302653 * math.sqrt(1 / 3) / math.sqrt(3), rel=1e-6)
    assert d.lo == pytest.approx(7 / 3 - 1.434218, abs=1e-5) and d.excludes_zero
    assert paired_difference(a, {7: 1.0}) is None
    # pairing removes the seed effect an unpaired comparison would carry
    shifted = {s: v + 0.1 for s, v in a.items()}
    assert paired_difference(shifted, a).half == pytest.approx(0.0, abs=1e-12)


def _results(score: float, seed: int, name: str) -> dict:
    return {"name": name, "seed": seed, "eval": {"summary": {"test": {"rougeL": [score, 0.5]},
                                                             "Average": {"rougeL": [score, 0.5],
                                                                         "distinct_2": [0.6, 0.01]}}},
            "train_cost": {"s_per_step": 0.1}, "exposure": {"exacc_err": 12.0}}


def _spec(seeds=(0, 1, 2)) -> Spec:
    return Spec(name="t", methods={"sft": ["+experiment=baseline_sft"], "kd": ["+experiment=baseline_kd"],
                                   "mgsr": ["+experiment=mgsr"]}, seeds=list(seeds), overrides=["logger=csv"])


SCORES = {"sft": (30.0, 31.0, 32.0), "kd": (33.0, 34.5, 35.0), "mgsr": (33.5, 34.0, 36.0)}


def _fake_runner(calls):
    """Stands in for subprocess.run: records the command and writes the cell's results.json."""
    def run(cmd, cwd, stdout, stderr, env):
        calls.append(cmd)
        method = next(m for m, o in _spec().methods.items() if cmd[2:2 + len(o)] == o)
        seed = int(next(a for a in cmd if a.startswith("seed=")).split("=")[1])
        run_dir = Path(next(a for a in cmd if a.startswith("hydra.run.dir=")).split("=", 1)[1])
        (run_dir / "results.json").write_text(json.dumps(_results(SCORES[method][seed], seed, method)))
        return types.SimpleNamespace(returncode=0)
    return run


def test_cells_run_seed_major_and_finished_cells_are_skipped(tmp_path):
    spec, calls = _spec(), []
    done = run_cells(spec, tmp_path, runner=_fake_runner(calls))
    assert len(done["ran"]) == 9 and not done["skipped"] and not done["failed"]
    assert [c[-len(spec.overrides) - 3] for c in calls[:3]] == ["seed=0"] * 3  # all methods of seed 0 first
    assert all("ckpt_path=last" in c for c in calls)  # a killed cell resumes from its own last.ckpt
    again = []
    done = run_cells(spec, tmp_path, runner=_fake_runner(again))
    assert not again and len(done["skipped"]) == 9
    (spec.cell_dir(tmp_path, "kd", 1) / "results.json").unlink()  # e.g. killed before it finished
    done = run_cells(spec, tmp_path, runner=_fake_runner(again))
    assert len(again) == 1 and done["ran"] == [("kd", 1)]


def test_a_failed_cell_is_reported_and_left_out(tmp_path):
    spec = _spec(seeds=(0,))
    done = run_cells(spec, tmp_path, runner=lambda *a, **k: types.SimpleNamespace(returncode=1))
    assert len(done["failed"]) == 3 and not done["ran"]


def test_report_columns_intervals_and_marks(tmp_path):
    spec = _spec()
    run_cells(spec, tmp_path, runner=_fake_runner([]))
    res = write_report(spec, tmp_path)
    md = res["markdown"]
    assert "| method | seeds | ROUGE-L (95% CI) | − kd (paired, 95% CI) | − sft (paired, 95% CI) |" in md
    assert "commit `" in md and "config `" in md and "CPUs" in md and "wall time" in md
    rows = {}
    for line in md.splitlines():  # the first table's rows (the per-seed table repeats the method names)
        if line.startswith("| "):
            rows.setdefault(line.split(" | ")[0].strip("| "), line)
    # kd - sft: differences 3, 3.5, 3 -> mean 3.167, excludes 0; mgsr - kd: 0.5, -0.5, 1 -> includes 0
    assert "+3.17 [" in rows["kd"] and "**\\***" in rows["kd"]
    mgsr_vs_kd = rows["mgsr"].split(" | ")[3]
    assert mgsr_vs_kd.startswith("+0.33 [") and "*" not in mgsr_vs_kd
    with open(res["paths"]["csv"]) as fh:
        table = {r["method"]: r for r in csv.DictReader(fh)}
    assert set(table) == {"sft", "kd", "mgsr"}
    assert float(table["kd"]["diff_sft_mean"]) == pytest.approx(19 / 6)
    assert table["kd"]["diff_sft_excludes_zero"] == "True" and table["mgsr"]["diff_kd_excludes_zero"] == "False"
    assert float(table["sft"]["rougeL_ci95_half"]) == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert res["paths"]["png"].stat().st_size > 1000
    assert json.loads((tmp_path / "stamp.json").read_text())["config_hash"] == spec.config_hash()


def test_chain_reports_what_each_step_adds(tmp_path):
    spec = _spec()
    spec.chain = ["sft", "kd", "mgsr", "absent"]
    run_cells(spec, tmp_path, runner=_fake_runner([]))
    md = write_report(spec, tmp_path)["markdown"]
    # kd - sft: 3, 3.5, 3 (mean 19/6, excludes 0); mgsr - kd: 0.5, -0.5, 1 (mean 1/3, includes 0)
    assert "What each step adds" in md
    kd_line = next(line for line in md.splitlines() if line.startswith("| kd − sft |"))
    mgsr_line = next(line for line in md.splitlines() if line.startswith("| mgsr − kd |"))
    assert "+3.17 [" in kd_line and "*" in kd_line and kd_line.endswith("| 3 |")
    assert "+0.33 [" in mgsr_line and "*" not in mgsr_line
    assert "absent" not in md.split("What each step adds")[1].split("Per-seed")[0]


def test_two_presets_report_on_one_out_dir(tmp_path):
    spec = _spec()
    run_cells(spec, tmp_path, runner=_fake_runner([]))
    write_report(spec, tmp_path)
    first = (tmp_path / "report.md").read_text()
    sub = Spec(name="sub", methods={m: spec.methods[m] for m in ("kd", "mgsr")}, seeds=spec.seeds,
               overrides=spec.overrides, baselines=["kd"])
    res = write_report(sub, tmp_path, name="report_sub")
    assert res["paths"]["md"] == tmp_path / "report_sub.md" and (tmp_path / "report_sub.stamp.json").is_file()
    assert (tmp_path / "report.md").read_text() == first  # the other preset's report is left alone
    assert "| sft |" not in res["markdown"] and "+0.33 [" in res["markdown"]  # same cells, its own rows


def test_config_hash_tracks_what_the_cells_run():
    a, b = _spec(), _spec()
    b.overrides = ["logger=csv", "trainer.max_steps=10"]
    assert a.config_hash() == _spec().config_hash() != b.config_hash()


@pytest.mark.slow
def test_compare_entry_point_quick_preset(tmp_path, cache_dir):
    """The real command: two methods x two seeds of train.py, then the report; a second call runs nothing."""
    out = tmp_path / "cmp"
    cmd = [sys.executable, "compare.py", "compare=quick", f"out_dir={out}", f'overrides=["cache_dir={cache_dir}"]']
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "| kd | 2 |" in (out / "report.md").read_text()
    for m in ("sft", "kd"):
        for s in (0, 1):
            res = json.loads((out / "runs" / m / f"seed{s}" / "results.json").read_text())
            assert res["name"] == m and res["seed"] == s
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "ran 0 cells, skipped 4 finished" in second.stderr + second.stdout


def _cell(tmp, method, seed, per_eval: dict, nll: float, fkl: float):
    d = tmp / "runs" / method / f"seed{seed}"
    d.mkdir(parents=True)
    mean = sum(per_eval.values()) / len(per_eval)
    res = {"eval": {"per_seed": {"test": {str(j): {"rougeL": v} for j, v in per_eval.items()}},
                    "summary": {"Average": {"rougeL": [mean, 0.0], "distinct_1": [0.2, 0], "distinct_2": [0.5, 0]}}},
           "teacher_forced": {"test": {"nll": nll, "fkl": fkl, "tokens": 10, "records": 2}},
           "dac": {"kept": 3.5, "lower_mean": 0.1, "upper_mean": 0.9}, "scrg": {"corrected_per_seq": 1.0}}
    if method == "mgsr":
        res |= {"span_backend": {"backend": "nltk"}, "evaluated": {"selection": "end of training", "step": 600}}
    (d / "results.json").write_text(json.dumps(res))


def test_report_has_the_noise_budget_and_the_teacher_forced_table(tmp_path):
    # per-eval-seed differences e: [2, 3], [2, 1], [5, 3] (tests/test_noise_budget.py: sd sqrt(19/12), var_eval 0.5)
    a = {0: {10: 3.0, 20: 5.0}, 1: {10: 4.0, 20: 4.0}, 2: {10: 6.0, 20: 5.0}}
    b = {0: {10: 1.0, 20: 2.0}, 1: {10: 2.0, 20: 3.0}, 2: {10: 1.0, 20: 2.0}}
    for s in range(3):
        _cell(tmp_path, "variant", s, a[s], nll=1.0 + s, fkl=0.5)
        _cell(tmp_path, "mgsr", s, b[s], nll=0.5 + s, fkl=0.25 + 0.1 * s)
    spec = Spec(name="abl", methods={"mgsr": ["+experiment=mgsr"], "variant": ["x=1"]}, seeds=[0, 1, 2],
                baselines=["mgsr"])
    md = write_report(spec, tmp_path, name="report_x")["markdown"]
    assert ("· span rule: nltk (3 cells), unrecorded (3 cells) · evaluated: end of training (step 600) (3 cells), "
            "unrecorded (3 cells)") in md.splitlines()[2]  # the stamp line, which docs_tables copies
    half = 4.302653 * math.sqrt(19 / 12) / math.sqrt(3)
    mde = (4.302653 + 1.060660) * math.sqrt(19 / 12) / math.sqrt(3)
    line = next(x for x in md.splitlines() if x.startswith("| variant − mgsr |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == "3" and float(cells[2]) == pytest.approx(half, abs=0.005)
    assert float(cells[3]) == pytest.approx(mde, abs=0.005)
    assert float(cells[5]) == pytest.approx(math.sqrt(0.5), abs=0.005)  # eval sd
    assert cells[7] == f"{100 * 0.5 / (19 / 12):.0f}%" and cells[8] == "27"
    # teacher-forced: NLL differences are all +0.5 (no spread: no claim), FKL differences 0.25, 0.15, 0.05
    tf = next(x for x in md.splitlines() if x.startswith("| variant | 2.000 ± "))
    assert "+0.500 (identical over 3 pairs: no spread, no CI)" in tf
    assert "+0.150 [-0.098, +0.398] |" in tf  # sd 0.1: 0.15 ± 4.302653 * 0.1 / sqrt(3)
    finding = next(x for x in md.splitlines() if x.startswith("| variant | +2.67 ["))
    assert finding.endswith("| no measurable difference | +0.150 [-0.098, +0.398] | no measurable difference |")
    rows = list(csv.DictReader((tmp_path / "report_x.csv").open()))
    v = next(r for r in rows if r["method"] == "variant")
    assert float(v["diff_mgsr_mde80"]) == pytest.approx(mde, rel=1e-6)
    assert float(v["diff_mgsr_fkl_mean"]) == pytest.approx(0.15) and float(v["DAC kept/token"]) == 3.5
