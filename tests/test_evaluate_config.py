"""evaluate.py's settings: the length bound of the real-set preset, and the synthetic split of the evaluated run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import GPT2Config, GPT2LMHeadModel

from mgsr.config import ConfigError
from mgsr.data.synthetic import make_synthetic_splits
from mgsr.evaluation.entry import evaluate_from_config, load_eval_sets, run_config, settings_from
from mgsr.evaluation.run import EvalSettings
from mgsr.generation import SamplingConfig, generate

REPO = Path(__file__).resolve().parents[1]


def compose_eval(overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=overrides)


# --- length bound (issue 14.6) ----------------------------------------------------------------------------------
def test_paper_preset_is_minillms_total_length_bound():
    cfg = compose_eval(["model_path=unused", "+eval=paper"])
    assert (cfg.max_length, cfg.max_prompt_len, cfg.length_budget, cfg.max_new_tokens) == (512, 256, "padded", None)
    s = settings_from(cfg).sampling()
    # MiniLLM / DistiLLM: max_new_tokens = max_length - (prompt width padded to max_prompt_len) = 512 - 256
    assert s.max_new_tokens == 256 and s.max_length is None
    per_row = settings_from(compose_eval(["model_path=unused", "+eval=paper", "length_budget=per_row"])).sampling()
    assert per_row.max_new_tokens == 512 and per_row.max_length == 512


def test_length_settings_are_checked():
    with pytest.raises(ConfigError, match="set exactly one"):
        settings_from(compose_eval(["model_path=unused", "+eval=paper", "max_new_tokens=8"]))
    with pytest.raises(ConfigError, match="must exceed max_prompt_len"):
        settings_from(compose_eval(["model_path=unused", "max_new_tokens=null", "max_length=256"]))
    with pytest.raises(ConfigError, match="length_budget"):
        settings_from(compose_eval(["model_path=unused", "+eval=paper", "length_budget=nope"]))
    assert settings_from(compose_eval(["model_path=unused"])).sampling().max_new_tokens == 64  # synthetic default


def test_per_row_budget_is_total_length_minus_each_prompt():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=20, n_positions=64, n_embd=16, n_layer=1, n_head=2)).eval()
    ids = torch.tensor([[0, 0, 0, 5, 6], [7, 8, 9, 10, 11]])  # prompts of 2 and 5 tokens, left-padded with 0
    mask = (ids != 0).long()
    settings = EvalSettings(max_new_tokens=None, max_length=12, length_budget="per_row", max_prompt_len=5)
    out = generate(model, ids, mask, settings.sampling(), eos_id=99, pad_id=0)  # eos never drawn
    lengths = out["response_mask"][:, out["prompt_len"]:].sum(-1).tolist()
    assert lengths == [12 - 2, 12 - 5]
    padded = EvalSettings(max_new_tokens=None, max_length=12, length_budget="padded", max_prompt_len=5)
    out = generate(model, ids, mask, padded.sampling(), eos_id=99, pad_id=0)
    assert out["response_mask"][:, out["prompt_len"]:].sum(-1).tolist() == [7, 7]  # 12 - 5 for both
    with pytest.raises(ValueError, match="max_length"):
        SamplingConfig(max_length=0)


# --- the synthetic split of the evaluated run (issue 14.5) ------------------------------------------------------
RUN_DATA = {"source": "synthetic", "seed": 1, "n_train": 2000, "n_val": 20, "n_test": 60}


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """What train.py leaves: <run>/config.yaml with the run's data settings, <run>/student, <run>/checkpoints."""
    run = tmp_path / "run"
    (run / "student").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "best.ckpt").write_bytes(b"")
    OmegaConf.save(OmegaConf.create({"seed": 0, "data": RUN_DATA}), run / "config.yaml")
    return run


def test_run_config_is_found_next_to_the_student_and_the_checkpoints(run_dir):
    for model_path in (run_dir / "student", run_dir / "checkpoints" / "best.ckpt"):
        cfg, path = run_config(model_path)
        assert path == run_dir / "config.yaml" and cfg.data.seed == 1
    assert run_config("gpt2") == (None, None)  # a hub name: no run


def test_synthetic_test_split_uses_the_runs_data_seed(run_dir):
    cfg = compose_eval([f"model_path={run_dir / 'student'}"])
    run_cfg, source = run_config(cfg.model_path)
    sets, _, _ = load_eval_sets(cfg, run_cfg.data, source)
    expect = make_synthetic_splits(1, 2000, 20, 60)["test"]
    assert [r["prompt"] for r in sets["test"]] == [r["prompt"] for r in expect]
    # without a run: the synthetic defaults (seed 0)
    default = load_eval_sets(compose_eval(["model_path=x"]))[0]["test"]
    assert [r["prompt"] for r in default] == [r["prompt"] for r in make_synthetic_splits(0, 0, 0, 200)["test"]]


def test_split_sharing_prompts_with_the_runs_training_split_is_refused(run_dir):
    # seed 0's test split overlaps seed 1's training split (the splits are disjoint only for one seed)
    train1 = {r["prompt"] for r in make_synthetic_splits(1, 2000, 0, 0)["train"]}
    assert any(r["prompt"] in train1 for r in make_synthetic_splits(0, 0, 0, 60)["test"])
    cfg = compose_eval([f"model_path={run_dir / 'checkpoints' / 'best.ckpt'}", "sets.test.seed=0",
                        "sets.test.n_test=60"])
    with pytest.raises(ConfigError, match=r"prompts are in the training split of the run .*data.seed=1") as e:
        evaluate_from_config(cfg, run_dir / "eval")  # before any model loads (the .ckpt here is empty)
    assert "\n" not in str(e.value)


def test_evaluate_reads_the_run_seed_end_to_end(run_dir):
    from mgsr.data.tokenizer import build_tokenizer
    from mgsr.models import build_from_config

    recs = make_synthetic_splits(1, 200, 0, 0)["train"]
    tok = build_tokenizer([r["prompt"] + r["output"] for r in recs], vocab_size=300)
    build_from_config({"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 512}, tok).save_pretrained(
        run_dir / "student")
    tok.save_pretrained(run_dir / "student")
    cfg = compose_eval([f"model_path={run_dir / 'student'}", "seeds=[10]", "limit=2", "max_new_tokens=2",
                        "device=cpu"])
    res = evaluate_from_config(cfg, run_dir / "eval", log=lambda *_: None)
    assert res["synthetic_splits"]["test"] == {"seed": 1, "n_train": 2000, "n_val": 20, "n_test": 60}
    assert res["run_config"] == str(run_dir / "config.yaml")
