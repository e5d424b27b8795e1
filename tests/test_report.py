"""mgsr.report: variants from overrides, mean ± std over training seeds, report.md/.csv/.png, W&B table,
and a real two-run `python train.py -m` sweep that ends with its report."""

import csv
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from mgsr.build.trainer import sweep_group
from mgsr.report import Run, build_report, log_wandb_table, main, variant_labels, write_report

REPO = Path(__file__).resolve().parents[1]


def _results(name, seed, rouge, *, sets=("test",), exacc=10.0, s_per_step=0.5, corrected=None):
    summary = {s: {"rougeL": [rouge + i, 0.3], "distinct_1": [0.5, 0.01], "distinct_2": [0.8, 0.01]}
               for i, s in enumerate(sets)}
    summary["Average"] = {"rougeL": [rouge + (len(sets) - 1) / 2, 0.2], "distinct_1": [0.5, 0.01],
                          "distinct_2": [0.8, 0.01]}
    res = {"name": name, "seed": seed, "val": {"val/rougeL": rouge - 1},
           "train_cost": {"s_per_step": s_per_step, "train_tokens_per_s": 100.0, "peak_mem_mb": 900.0,
                          "scrg_time_share": 0.25},
           "eval": {"summary": summary, "seeds": [10]}, "exposure": {"exacc_err": exacc, "at": 15}}
    if corrected is not None:
        res["scrg"] = {"corrected_per_seq": corrected}
    return res


def _job(root: Path, num: int, results: dict, overrides: list[str]) -> Path:
    d = root / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (d / "results.json").write_text(json.dumps(results))
    return d


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "multirun" / "ablation_loss_weights" / "2026-01-01_00-00-00"
    num = 0
    for seed in (0, 1):
        for w, base in (("dac1_span0", 20.0), ("dac0_span1", 10.0)):
            rouge = base + 2.0 * seed  # seed 0 and 1 differ by 2 -> sample std sqrt(2)
            _job(root, num, _results("ablation_loss_weights", seed, rouge, s_per_step=0.5 + seed),
                 ["+experiment=ablation_loss_weights", "trainer.max_steps=6", f"weights={w}", f"seed={seed}"])
            num += 1
    return root


def test_rows_are_variants_with_mean_and_std_over_seeds(sweep):
    rep = build_report([sweep])
    assert rep.header == "weights"
    assert list(rep.rows) == ["dac1_span0", "dac0_span1"]  # sweep order, seeds folded
    mean, std = rep.rows["dac1_span0"]["rougeL/Average"]
    assert mean == pytest.approx(21.0) and std == pytest.approx(2 ** 0.5)
    assert rep.rows["dac0_span1"]["rougeL/test"][0] == pytest.approx(11.0)
    assert rep.rows["dac1_span0"]["s_per_step"] == pytest.approx((1.0, 2 ** 0.5 / 2))
    assert rep.rows["dac1_span0"]["scrg_time_pct"][0] == pytest.approx(25.0)
    assert rep.seeds == {"dac1_span0": [0, 1], "dac0_span1": [0, 1]}
    assert "corrected_per_seq" not in rep.extra_columns  # no run reported it


def test_report_files(sweep):
    out = write_report([sweep], wandb_mode="off")
    md = out["paths"]["md"].read_text()
    assert "| weights | ROUGE-L test | ROUGE-L Average |" in md
    assert "| dac1_span0 | 21.00 ± 1.41 | 21.00 ± 1.41 |" in md  # Average (one set) = the set
    assert "ExAccErr@15 (%)" in md and "s/step" in md and "Distinct-2" in md
    rows = list(csv.DictReader(out["paths"]["csv"].open()))
    assert [r["weights"] for r in rows] == ["dac1_span0", "dac0_span1"]
    assert float(rows[1]["rougeL/Average_mean"]) == pytest.approx(11.0)
    assert float(rows[0]["n_seeds_mean"]) == 2
    png = out["paths"]["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_several_eval_sets_and_average(tmp_path):
    sets = ("dolly", "selfinst", "vicuna")
    res = _results("mgsr", 0, 20.0, sets=sets)
    res["eval"]["labels"] = {"selfinst": "SelfInst"}
    _job(tmp_path, 0, res, ["seed=0"])
    rep = build_report([tmp_path])
    assert rep.labels["rougeL/selfinst"] == "ROUGE-L SelfInst" and rep.labels["rougeL/dolly"] == "ROUGE-L dolly"
    assert rep.rouge_columns == ["rougeL/dolly", "rougeL/selfinst", "rougeL/vicuna", "rougeL/Average"]
    assert rep.rows["mgsr"]["rougeL/vicuna"][0] == pytest.approx(22.0)
    assert rep.rows["mgsr"]["rougeL/Average"][0] == pytest.approx(21.0)


def test_labels_across_experiments_and_multiple_keys():
    runs = [Run(Path("a"), {"name": "mgsr"}, ["+experiment=mgsr", "seed=0"]),
            Run(Path("b"), {"name": "ablation_no_span"}, ["+experiment=ablation_no_span", "seed=0"])]
    assert variant_labels(runs) == (["mgsr", "ablation_no_span"], "variant")
    runs = [Run(Path("a"), {"name": "x"}, ["scrg.mode=multi", "scrg.threshold=0.8"]),
            Run(Path("b"), {"name": "x"}, ["scrg.mode=multi", "scrg.threshold=1.6"]),
            Run(Path("c"), {"name": "x"}, ["scrg.mode=single", "scrg.threshold=0.8"])]
    labels, header = variant_labels(runs)
    assert header == "variant"
    assert labels == ["scrg.mode=multi, scrg.threshold=0.8", "scrg.mode=multi, scrg.threshold=1.6",
                      "scrg.mode=single, scrg.threshold=0.8"]
    one = [Run(Path("a"), {"name": "mgsr"}, ["seed=0"]), Run(Path("b"), {"name": "mgsr"}, ["seed=1"])]
    assert variant_labels(one) == (["mgsr", "mgsr"], "variant")
    # two sweep folders: each folder's shared overrides (and housekeeping like cache_dir) drop out
    two = [Run(Path("a"), {"name": "mgsr"}, ["+experiment=mgsr", "trainer.max_steps=6", "cache_dir=/c", "seed=0"], 0),
           Run(Path("b"), {"name": "ablation_no_span"}, ["+experiment=ablation_no_span", "loss.span_weight=1.0",
                                                          "trainer.max_steps=9", "seed=0"], 1),
           Run(Path("c"), {"name": "ablation_no_span"}, ["+experiment=ablation_no_span", "loss.span_weight=0.0",
                                                          "trainer.max_steps=9", "seed=0"], 1)]
    assert variant_labels(two)[0] == ["mgsr", "ablation_no_span, loss.span_weight=1.0",
                                      "ablation_no_span, loss.span_weight=0.0"]
    renamed = [Run(Path("a"), {"name": "components"}, ["+experiment=mgsr", "name=components"]),
               Run(Path("b"), {"name": "components"}, ["+experiment=ablation_no_span", "name=components"])]
    assert variant_labels(renamed) == (["mgsr", "ablation_no_span"], "experiment")


def test_failed_jobs_are_listed_and_empty_dirs_fail_cleanly(sweep, tmp_path, capsys):
    (sweep / "9" / ".hydra").mkdir(parents=True)  # a job that never wrote results.json
    rep = build_report([sweep])
    assert rep.missing == [sweep / "9"]
    assert "left out" in write_report([sweep], wandb_mode="off")["markdown"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    assert "no results.json" in capsys.readouterr().out


def test_wandb_table_goes_to_the_sweep_group(sweep, monkeypatch, tmp_path):
    logged, inits = {}, []

    class FakeRun:
        def log(self, data):
            logged.update(data)

        def finish(self):
            logged["finished"] = True

    fake = types.SimpleNamespace(run=None, Table=lambda columns, data: {"columns": columns, "data": data},
                                 Settings=lambda **k: k,
                                 init=lambda **k: inits.append(k) or FakeRun())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    rep = build_report([sweep])
    group = sweep_group("ablation_loss_weights", sweep)
    assert group == "ablation_loss_weights/2026-01-01_00-00-00"
    assert log_wandb_table(rep, group=group, settings={"mode": "offline", "project": "p"}, out_dir=tmp_path)
    assert inits[0]["group"] == group and inits[0]["mode"] == "offline" and logged["finished"]
    table = logged["report"]
    assert table["columns"][:2] == ["weights", "seeds"]
    assert [row[0] for row in table["data"]] == ["dac1_span0", "dac0_span1"]
    # runs that did not log to W&B (settings None) and no WANDB_MODE=online: nothing is attempted
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert not log_wandb_table(rep, group=group, settings=None, out_dir=tmp_path)


@pytest.mark.slow  # a train.py -m sweep of two runs
def test_two_run_multirun_sweep_ends_with_a_report(tmp_path, tiny_overrides):
    from test_experiments import fast

    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the suite's cache: the session's tiny teacher is re-used
    cmd = [sys.executable, "train.py", "-m", "+experiment=ablation_no_span", *fast(tiny_overrides),
           f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (sweep_dir / "report.md").read_text()
    table = md.split("## ROUGE-L")[1].split("##")[0]
    body = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [line.split("|")[1].strip() for line in body] == ["1.0", "0.0"]  # loss.span_weight, two rows
    assert (sweep_dir / "report.png").stat().st_size > 1000
    assert (sweep_dir / "report.csv").is_file()
    assert "ROUGE-L Average" in proc.stdout  # the table is printed when the sweep ends


# -- exposure bias measurement (MiniLLM ExAccErr, METHOD.md 7) ---------------------------------------------------
class _CharTokenizer:
    """Characters -> ids 2..V-1; enough for encode_prompts / generate / shared_vocab_size."""

    pad_token_id, eos_token_id = 0, 1

    def __len__(self):
        return 40

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + ord(c) % 38 for c in text]}


def _gpt(seed):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                      bos_token_id=1, eos_token_id=1)).eval()


def test_prefix_kl_is_the_per_step_teacher_student_kl_nan_past_the_end():
    import torch

    from mgsr.data.collate import pad_rows
    from mgsr.evaluation.exposure import prefix_kl

    teacher, student = _gpt(0), _gpt(1)
    seqs = pad_rows([(torch.tensor([5, 6]), torch.tensor([7, 8, 9, 1])), (torch.tensor([4]), torch.tensor([3, 1]))],
                    pad_id=0)
    kl = prefix_kl(teacher, student, seqs, 40)
    assert kl.shape == (2, 4) and torch.isnan(kl[1, 2:]).all() and not torch.isnan(kl[0]).any()
    # row 0, step 2 (predicting response token 2) by hand: the full-sequence forward at the token before it
    ids = seqs["input_ids"][:1]
    with torch.no_grad():
        p = torch.softmax(teacher(ids).logits[0, 2 + 1], -1)
        q = torch.softmax(student(ids).logits[0, 2 + 1], -1)
    assert float(kl[0, 2]) == pytest.approx(float((p * (p.log() - q.log())).sum()), rel=1e-4)
    assert torch.all(prefix_kl(teacher, teacher, seqs, 40)[0].abs() < 1e-6)  # student = teacher: no error


def test_measure_exposure_bias_on_tiny_models():
    from mgsr.evaluation.exposure import measure_exposure_bias

    records = [{"prompt": f"prompt number {i}:"} for i in range(6)]
    teacher, student = _gpt(0), _gpt(1)
    out = measure_exposure_bias(teacher, student, _CharTokenizer(), records, n_prompts=5, max_new_tokens=20,
                                batch_size=2)
    assert out["n_prompts"] == 5 and out["at"] == 15
    # MiniLLM's table starts after the first generated token: 20 new tokens give at most 19 steps
    assert len(out["curve"]) == len(out["R"]) == len(out["eps"]) <= 19
    assert out["exacc_err"] == pytest.approx(out["curve"][min(15, len(out["curve"]) - 1)])
    # the prompt-only prediction (the same on both prefixes, so R = eps there) is not the first entry
    assert out["R"][0] != pytest.approx(out["eps"][0], rel=1e-6)
    same = measure_exposure_bias(teacher, teacher, _CharTokenizer(), records, n_prompts=5, max_new_tokens=20)
    assert same["exacc_err"] == 0.0  # R = eps = 0


def test_sweep_report_pairs_every_variant_with_the_declared_reference(tmp_path):
    """`python train.py -m +experiment=ablation_no_scrg seed=0,1,2` read as an ablation: the variant minus the
    experiment's `sweep_reference` (MGSR), paired by training seed, with its CI and noise budget."""
    root = tmp_path / "multirun" / "ablation_no_scrg" / "t"
    per_eval = {"1": {0: (30.0, 32.0), 1: (31.0, 31.0), 2: (35.0, 33.0)},   # rounds=1: MGSR
                "0": {0: (28.0, 29.0), 1: (29.0, 30.0), 2: (30.0, 30.0)}}   # rounds=0: e = [2,3], [2,1], [5,3]
    num = 0
    for seed in (0, 1, 2):
        for rounds, scores in per_eval.items():
            res = _results("ablation_no_scrg", seed, sum(scores[seed]) / 2)
            res["eval"]["per_seed"] = {"test": {"10": {"rougeL": scores[seed][0]}, "20": {"rougeL": scores[seed][1]}}}
            res["teacher_forced"] = {"test": {"nll": 1.0 + 0.1 * seed + (0.2 if rounds == "0" else 0.0), "fkl": 0.5}}
            d = _job(root, num, res, ["+experiment=ablation_no_scrg", f"scrg.rounds={rounds}", f"seed={seed}"])
            (d / "config.yaml").write_text(yaml.safe_dump({"sweep_reference": "1", "name": "ablation_no_scrg"}))
            num += 1
    out = write_report([root], wandb_mode="off")
    md = out["paths"]["md"].read_text()
    assert "## Paired differences to `1`" in md and "sweep_reference" in md
    # d = [2.5, 1.5, 4.0] (MGSR - variant), so variant - MGSR = -8/3; sd sqrt(19/12); t(0.975, 2) = 4.302653
    half = 4.302653 * (19 / 12) ** 0.5 / 3 ** 0.5
    line = next(x for x in md.splitlines() if x.startswith("| 0 | 3 |"))
    assert f"| {-8 / 3:+.2f} [{-8 / 3 - half:+.2f}, {-8 / 3 + half:+.2f}] |" in line  # includes 0: no mark
    assert "+0.200 (identical over 3 pairs: no spread, no CI)" in line  # NLL: the same +0.2 at every seed
    budget = next(x for x in md.splitlines() if x.startswith("| 0 − 1 |"))
    assert f"| {0.5 ** 0.5:.2f} |" in budget  # the decoding-noise sd of one paired difference: sqrt(0.5)
    assert out["paths"]["png"].read_bytes()[:4] == b"\x89PNG"


def test_without_a_declared_reference_the_first_variant_is_it(sweep):
    rep = build_report([sweep])
    assert rep.reference == "dac1_span0" and "first variant" in rep.reference_how
