"""Bad input gets one clear line before any model loads (or a counted skip for bad rows of data).
One test per row of the bad-input table in docs/bad_inputs.md."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, TINY, compose_train

import mgsr.build.evaluate
import mgsr.build.student
import mgsr.build.teacher
import mgsr.pipeline as pipeline
from mgsr.build.data import check_epoch_length
from mgsr.build.validate import validate
from mgsr.config import ConfigError

# (row id, overrides, text the one-line error must contain)
BAD_CONFIGS = [
    ("quantiles-lower-ge-upper", ["loss.distill.head=fixed", "loss.distill.lower=0.9", "loss.distill.upper=0.1"],
     "0 <= lower < upper <= 1, got lower=0.9, upper=0.1"),
    ("quantile-above-1", ["loss.distill.head=fixed", "loss.distill.upper=1.5"], "upper=1.5"),
    ("quantile-below-0", ["loss.distill.head=fixed", "loss.distill.lower=-0.1"], "lower=-0.1"),
    ("head-range-outside-0-1", ["loss.distill.upper_range=[0.7,1.2]"], "loss.distill.upper_range=[0.7, 1.2]"),
    ("head-ranges-overlap", ["loss.distill.lower_range=[0.0,0.8]"], "lower_range must lie below upper_range"),
    ("negative-loss-weight", ["loss.span_weight=-1"], "loss.span_weight=-1.0: loss weights must be >= 0"),
    ("all-zero-loss-weights", ["loss.sft_weight=0", "loss.distill_weight=0", "loss.span_weight=0"],
     "loss weights are all zero"),
    ("missing-teacher-path", ["model.teacher.name_or_path=/nonexistent/teacher"],
     "model.teacher.name_or_path=/nonexistent/teacher: no model directory there"),
    ("missing-student-path", ["model.student.name_or_path=./no/such/student"],
     "model.student.name_or_path=./no/such/student: no model directory there"),
    ("scrg-max-new-tokens-0", ["scrg.sampling.max_new_tokens=0"], "scrg.sampling.max_new_tokens=0: must be > 0"),
    ("eval-max-new-tokens-negative", ["eval.max_new_tokens=-1"], "eval.max_new_tokens=-1: must be > 0"),
    ("scrg-every-n-steps-0", ["scrg.every_n_steps=0"], "scrg.every_n_steps=0: must be >= 1"),
    ("unknown-divergence", ["loss=kd", "loss.distill.name=kl2"], "loss.distill.name='kl2': unknown divergence"),
    ("unknown-scrg-divergence", ["scrg.divergence=js"], "scrg.divergence='js': unknown divergence; choose one of"),
    ("unknown-divergence-parameter", ["loss=kd", "+loss.distill.beta=0.5"], "loss.distill: fkl has no parameter beta"),
    ("unknown-scrg-mode", ["scrg.mode=all"], "scrg.mode must be single|multi, got 'all'"),
    ("scrg-quantile-outside-0-1", ["scrg.quantile=1.5"], "scrg.quantile must be in (0, 1), got 1.5"),
    ("scrg-student-prob-outside-0-1", ["scrg.student_prob=1.5"], "scrg.student_prob=1.5: must be in [0, 1]"),
    ("sampling-temperature-0", ["scrg.sampling.temperature=0"], "temperature must be > 0"),
    ("replay-buffer-capacity-0", ["scrg.buffer_capacity=0"], "scrg.buffer_capacity=0: must be > 0"),
    ("unknown-dac-band", ["loss.distill.band=entropy"], "loss.distill.band='entropy': choose one of"),
    ("dac-kappa-0", ["loss.distill.kappa=0"], "need kappa > 0 and beta >= 0"),
    ("unknown-span-relation", ["loss.span.relation=dot"], "loss.span.relation='dot': choose hadamard or cosine"),
    ("fsdp-on-cpu-without-process-group", ["trainer.strategy=fsdp"], "fsdp on CPU needs a process group"),
    ("unknown-data-source", ["data.source=csv"], "data.source='csv': choose synthetic or jsonl"),
    ("jsonl-directory-missing", ["data.source=jsonl", "data.path=/nonexistent/dolly"],
     "data.path=/nonexistent/dolly: directory not found"),
    ("prompt-limit-not-below-max-len", ["data.max_prompt_len=512", "data.max_len=256"],
     "need 0 < max_prompt_len < max_len"),
    ("resume-checkpoint-missing", ["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path=/nonexistent/last.ckpt"),
]


@pytest.mark.parametrize(("overrides", "message"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_one_line_before_anything_loads(overrides, message, tmp_path):
    cfg = compose_train([*TINY, f"cache_dir={tmp_path}", *overrides])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_defaults_are_valid(tmp_path):
    validate(compose_train([*TINY, f"cache_dir={tmp_path}"]))
    validate(compose_train([*TINY, f"cache_dir={tmp_path}", "loss=kd", "scrg=off"]))


@pytest.mark.parametrize(("override", "missing"), [("+experiment=nope", "experiment/nope"), ("loss=nope", "loss/nope")])
def test_unknown_config_group_option_is_named(override, missing):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match=f"Could not find '{missing}'"):
        compose_train([override])


@pytest.mark.parametrize(("override", "new"), [
    ("distill=jsd", "loss/distill=jsd"), ("+distill=fkl", "loss/distill=fkl"),
    ("clip=q10_90,learnable", "loss/distill=dac_kl_q10_90,dac_kl"), ("dac=full", "loss/distill=dac_kl"),
    ("dac=no_band", "loss/distill=dac_kl_no_band"), ("loss=jsd", "loss=distill_only loss/distill=jsd"),
])
def test_removed_loss_groups_name_their_replacement(override, new):
    from mgsr.config import renamed_override

    msg = renamed_override(["seed=1", override])
    assert msg is not None and new in msg and "\n" not in msg
    for option in new.split()[-1].split("=")[1].split(","):  # each named replacement composes
        compose_train([*new.split()[:-1], f"loss/distill={option}"])
    assert renamed_override(["loss=kd", "loss/distill=jsd", "scrg.divergence=rkl"]) is None


def test_removed_loss_group_fails_in_one_line_through_train_py(tmp_path):
    out = subprocess.run([sys.executable, "train.py", "distill=jsd"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: distill=jsd: the distill group was folded into loss/distill; use loss/distill=jsd"]


def _train(tmp_path, *overrides):
    return subprocess.run([sys.executable, "train.py", *overrides, f"cache_dir={tmp_path / 'cache'}",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_entry_point_prints_one_line_and_exits_2(tmp_path):
    out = _train(tmp_path, "loss.distill.head=fixed", "loss.distill.lower=0.9", "loss.distill.upper=0.1")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "lower" in lines[0], out.stderr
    assert not (tmp_path / "cache").exists()  # no tokenizer, no teacher: nothing was built


def test_entry_point_names_an_unknown_experiment(tmp_path):
    out = _train(tmp_path, "+experiment=nope")
    assert out.returncode != 0
    assert "Could not find 'experiment/nope'" in out.stderr and "baseline_kd" in out.stderr  # lists the real ones
    assert "Traceback" not in out.stderr


# ------------------------------------------------------------------ inputs only the run itself can check


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if any model weights are loaded or built."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    # each module looks these up in its own namespace: patch every one that has them
    modules = (pipeline, mgsr.build.student, mgsr.build.teacher, mgsr.build.evaluate)
    for name in ("load_model", "build_from_config", "build_student"):
        holders = [m for m in modules if hasattr(m, name)]
        assert holders, name
        for module in holders:
            monkeypatch.setattr(module, name, forbidden)


def _save_tiny_model(path, texts):
    from mgsr.data.tokenizer import build_tokenizer
    from mgsr.models import build_from_config

    tok = build_tokenizer(texts, vocab_size=300)
    build_from_config({"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 256},
                      tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_teacher_student_tokenizer_mismatch(tmp_path, no_model_loads):
    teacher = _save_tiny_model(tmp_path / "teacher", ["the teacher reads long english sentences"] * 8)
    student = _save_tiny_model(tmp_path / "student", ["zzz qqq 123 456 completely other symbols"] * 8)
    cfg = compose_train([*TINY, f"cache_dir={tmp_path / 'cache'}", f"model.teacher.name_or_path={teacher}",
                         f"model.student.name_or_path={student}"])
    with pytest.raises(ConfigError, match="teacher and student tokenizers differ") as err:
        pipeline.run(cfg, tmp_path / "run")
    assert "\n" not in str(err.value)


def _write_jsonl(folder, train_lines, val_lines=None):
    folder.mkdir()
    good = [json.dumps({"prompt": f"Say {w}.", "output": f"{w}!"}) for w in ("one", "two", "three", "four")]
    (folder / "minillm_train.jsonl").write_text("\n".join(train_lines) + ("\n" if train_lines else ""))
    for name in ("minillm_dev.jsonl", "minillm_test.jsonl"):
        (folder / name).write_text("\n".join(val_lines or good) + "\n")
    return good


def test_empty_dataset(tmp_path, no_model_loads):
    _write_jsonl(tmp_path / "data", [])
    cfg = compose_train([*TINY, f"cache_dir={tmp_path / 'cache'}", "data.source=jsonl",
                         f"data.path={tmp_path / 'data'}"])
    with pytest.raises(ConfigError, match="^data: ") as err:
        pipeline.run(cfg, tmp_path / "run")
    assert "minillm_train.jsonl" in str(err.value) and "\n" not in str(err.value)


@pytest.fixture(scope="module")
def tokenizer():
    from mgsr.data.tokenizer import build_tokenizer

    return build_tokenizer(["Say one. one! Say two. two! " * 4] * 4, vocab_size=300)


def test_malformed_jsonl_line_is_a_counted_skip(tmp_path, tokenizer, caplog):
    from mgsr.data.datamodule import DistillDataModule

    good = _write_jsonl(tmp_path / "data", [])
    (tmp_path / "data" / "minillm_train.jsonl").write_text("\n".join([good[0], "{not json", good[1],
                                                                      json.dumps({"prompt": "no output"})]) + "\n")
    dm = DistillDataModule(tokenizer, source="jsonl", path=str(tmp_path / "data"))
    dm.setup("fit")
    assert len(dm.records["train"]) == 2
    assert dm.stats["train"] == {"invalid_json": 1, "missing_field": 1}
    assert any("skipped 2 malformed rows" in r.getMessage() for r in caplog.records)


def test_prompt_longer_than_the_limit_is_a_counted_skip(tmp_path, tokenizer):
    from mgsr.data.datamodule import DistillDataModule
    from mgsr.evaluation.run import encode_prompts

    good = _write_jsonl(tmp_path / "data", [])
    long = json.dumps({"prompt": "Say " + "one two " * 200, "output": "x"})
    (tmp_path / "data" / "minillm_train.jsonl").write_text("\n".join([*good, long]) + "\n")
    dm = DistillDataModule(tokenizer, source="jsonl", path=str(tmp_path / "data"), max_prompt_len=32, max_len=64)
    dm.setup("fit")
    assert len(dm.records["train"]) == 4 and dm.stats["train"] == {"prompt_too_long": 1}
    # the final evaluation counts the prompts it cannot fit the same way (results.json: dropped_too_long)
    _, kept, dropped = encode_prompts(tokenizer, [{"prompt": "Say one."}, json.loads(long)], max_prompt_len=32)
    assert kept == [0] and dropped == 1


@pytest.mark.parametrize("model_path", ["/nonexistent/student", "/nonexistent/run/checkpoints/best.ckpt"])
def test_evaluate_missing_model(model_path):
    from omegaconf import OmegaConf

    from mgsr.evaluation.entry import resolve_model

    cfg = OmegaConf.create({"model_path": model_path, "tokenizer_path": None, "dtype": "float32",
                            "trust_remote_code": False})
    with pytest.raises(ConfigError, match=f"model_path={model_path}") as err:
        resolve_model(cfg)
    assert "\n" not in str(err.value)


def test_validation_interval_longer_than_an_epoch(tmp_path, no_model_loads):
    # 64 records / batch 8 = 8 batches an epoch; Lightning would say so only after the teacher is trained
    cfg = compose_train([*TINY, f"cache_dir={tmp_path}", "trainer.val_check_interval=20",
                         "trainer.check_val_every_n_epoch=1"])
    with pytest.raises(ConfigError, match="val_check_interval=20 is more than the 8 batches") as err:
        pipeline.run(cfg, tmp_path / "run")
    assert "\n" not in str(err.value)


def test_max_epochs_that_ends_training_before_max_steps_is_warned(tmp_path, caplog):
    cfg = compose_train([*TINY, f"cache_dir={tmp_path}", "trainer.max_epochs=1", "trainer.max_steps=20"])
    check_epoch_length(cfg, 64)
    assert "trainer.max_epochs=1 stops training after 8 steps, before trainer.max_steps=20" in caplog.text
    caplog.clear()
    check_epoch_length(compose_train([*TINY, f"cache_dir={tmp_path}", "trainer.max_steps=20"]), 64)
    assert caplog.text == ""  # the default (max_epochs=-1) trains for max_steps across epochs
