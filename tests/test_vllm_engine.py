"""The vLLM rollout engine (`rollout.engine=vllm`, mgsr/rollout_vllm.py) against the HF engine it replaces.

Needs the optional extra (requirements-vllm.txt, its own environment: .ci/run builds it and runs this file there);
without vLLM only the missing-extra error line is tested and the rest skips. Tiny random-init GPT-2 students
(head size 32: vLLM's CPU attention has no kernel for 16):
- greedy rollouts are token-identical to `mgsr.generation.generate`;
- two SCRG rounds under greedy decoding revise to the same sequences as the HF engine, re-generating from
  the prefix cache;
- after `sync` the engine follows a changed student exactly (and did not before it);
- sampled rows use per-row seeds from the run's generator: the same generator state gives the same tokens, and
  a row's tokens do not depend on the other rows of the batch;
- a short seeded MGSR run (train.py, 3 steps) on each engine ends with finite losses.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY, compose_train

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vLLM extra not installed (pip install -r requirements-vllm.txt)")
ARCH = {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 128}


@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed here")
def test_missing_extra_is_one_config_error_before_models_load():
    from mgsr.build.validate import validate
    from mgsr.config import ConfigError

    with pytest.raises(ConfigError, match=r"^rollout\.engine=vllm needs the vLLM extra.*requirements-vllm\.txt"):
        validate(compose_train(["rollout.engine=vllm"]))


def test_vllm_settings_that_cannot_work_fail_in_validation(monkeypatch):
    import mgsr.rollout_vllm as rv
    from mgsr.build.validate import validate
    from mgsr.config import ConfigError

    monkeypatch.setattr(rv, "vllm_missing", lambda: None)  # the checks after the install check
    with pytest.raises(ConfigError, match="trainer.devices=1"):
        validate(compose_train(["rollout.engine=vllm", "trainer=fsdp2"]))
    with pytest.raises(ConfigError, match="no_repeat_ngram_size=3"):
        validate(compose_train(["rollout.engine=vllm", "+scrg.sampling.no_repeat_ngram_size=3"]))
    with pytest.raises(ConfigError, match="choose hf or vllm"):
        validate(compose_train(["rollout.engine=sglang"]))


@pytest.fixture(scope="module")
def setup():
    from mgsr.data.synthetic import make_synthetic_splits, synthetic_corpus
    from mgsr.data.tokenizer import build_tokenizer
    from mgsr.models import build_from_config
    from mgsr.rollout_vllm import shared_engine

    torch.set_num_threads(1)
    records = make_synthetic_splits(0, 200, 0, 6)
    tok = build_tokenizer(synthetic_corpus(records["train"]), vocab_size=400)
    student = build_from_config(ARCH, tok, seed=2).eval()
    teacher = build_from_config({**ARCH, "n_embd": 96, "n_head": 3}, tok, seed=1).eval()
    prompts = [tok(r["prompt"])["input_ids"][:40] for r in records["test"]]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    engine = shared_engine(student, seed=0, kv_cache_mb=64)
    engine.sync(student, version=0)
    return {"tok": tok, "student": student, "teacher": teacher, "ids": ids, "mask": mask, "engine": engine}


def _rows(seqs) -> list[list[int]]:
    P = seqs["prompt_len"]
    return [r[m].tolist() for r, m in zip(seqs["input_ids"][:, P:], seqs["response_mask"][:, P:])]


def _hf_greedy(s, student, n=16):
    from mgsr.generation import SamplingConfig, generate

    return generate(student, s["ids"], s["mask"], SamplingConfig(max_new_tokens=n, greedy=True),
                    eos_id=s["tok"].eos_token_id, pad_id=s["tok"].pad_token_id)


@needs_vllm
def test_greedy_rollouts_are_token_identical_to_hf(setup):
    from mgsr.generation import SamplingConfig

    s = setup
    hf = _hf_greedy(s, s["student"])
    vl = s["engine"].generate(None, s["ids"], s["mask"], SamplingConfig(max_new_tokens=16, greedy=True),
                              eos_id=s["tok"].eos_token_id, pad_id=s["tok"].pad_token_id)
    assert _rows(vl) == _rows(hf)
    assert torch.equal(vl["input_ids"], hf["input_ids"]) and torch.equal(vl["response_mask"], hf["response_mask"])


@needs_vllm
def test_scrg_revision_under_greedy_is_identical_to_hf(setup):
    from mgsr.generation import SamplingConfig
    from mgsr.scrg import RevisionStats, ScrgConfig, revise_once, rollout_and_revise

    s = setup
    kw = dict(eos_id=s["tok"].eos_token_id, pad_id=s["tok"].pad_token_id)
    cfg, greedy = ScrgConfig(rounds=2), SamplingConfig(max_new_tokens=16, greedy=True)
    hf_stats = RevisionStats()
    hf = rollout_and_revise(s["teacher"], s["student"], s["ids"], s["mask"], cfg, greedy, stats=hf_stats, **kw)
    # the same two rounds through the engine, step by step, to count the prefix-cache hits of re-generation alone
    engine, vl_stats = s["engine"], RevisionStats()
    vl = engine.generate(s["student"], s["ids"], s["mask"], greedy, generator=torch.Generator().manual_seed(0), **kw)
    before = engine.prefix_cache()
    for _ in range(cfg.rounds):
        vl = revise_once(s["teacher"], s["student"], vl, cfg, greedy, stats=vl_stats, engine=engine,
                         generator=torch.Generator().manual_seed(0), **kw)
    after = engine.prefix_cache()
    assert _rows(vl) == _rows(hf)
    assert vl_stats.summary() == hf_stats.summary() and hf_stats.summary()["unchanged_share"] < 1.0  # revised alike
    # re-generation prompts (prompt + kept response) found whole 32-token blocks the rollout had cached
    assert after["hits"] - before["hits"] >= 32, (before, after)


@needs_vllm
def test_regeneration_with_no_active_row_returns_the_rows_unchanged(setup):
    from mgsr.generation import SamplingConfig

    s = setup
    kw = dict(eos_id=s["tok"].eos_token_id, pad_id=s["tok"].pad_token_id)
    seqs = _hf_greedy(s, s["student"])
    n = len(s["ids"])
    out = s["engine"].continue_generation(None, seqs, torch.full((n,), 3), SamplingConfig(max_new_tokens=16),
                                          active=torch.zeros(n, dtype=torch.bool), **kw)
    assert _rows(out) == _rows(seqs)


@needs_vllm
def test_sync_makes_the_engine_follow_a_changed_student(setup):
    """As in training: one student object whose weights change in place, a version per optimiser step."""
    import copy

    from mgsr.generation import SamplingConfig
    from mgsr.models import build_from_config

    s = setup
    engine, greedy = s["engine"], SamplingConfig(max_new_tokens=16, greedy=True)
    kw = dict(eos_id=s["tok"].eos_token_id, pad_id=s["tok"].pad_token_id)
    student = copy.deepcopy(s["student"])
    changed = build_from_config(ARCH, s["tok"], seed=7).eval()
    try:
        assert engine.sync(student, version=5)  # another student object: pushed
        assert not engine.sync(student, version=5)  # the same student and version: nothing pushed
        before = _rows(engine.generate(None, s["ids"], s["mask"], greedy, **kw))
        assert before == _rows(_hf_greedy(s, s["student"]))
        student.load_state_dict(changed.state_dict())  # "an optimiser step"
        assert engine.sync(student, version=6)
        after = _rows(engine.generate(None, s["ids"], s["mask"], greedy, **kw))
        assert after == _rows(_hf_greedy(s, changed)) and after != before
    finally:
        engine.sync(s["student"], version=0)


@needs_vllm
def test_sampling_uses_per_row_seeds_from_the_run_generator(setup):
    from mgsr.generation import SamplingConfig

    s = setup
    engine, cfg = s["engine"], SamplingConfig(max_new_tokens=16)
    kw = dict(eos_id=s["tok"].eos_token_id, pad_id=s["tok"].pad_token_id)

    def sample(n_rows, seed):
        return _rows(engine.generate(None, s["ids"][:n_rows], s["mask"][:n_rows], cfg,
                                     generator=torch.Generator().manual_seed(seed), **kw))

    full = sample(6, 0)
    assert sample(6, 0) == full  # reproducible from the generator's state
    assert sample(3, 0) == full[:3]  # row i's seed is the i-th draw: independent of the rest of the batch
    assert sample(6, 1) != full


def _train(run_dir: Path, cache_dir: Path, engine: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "train.py", *TINY, "+experiment=mgsr", f"rollout.engine={engine}", "rollout.vllm.kv_cache_mb=64",
           "eval.exposure_bias=false", f"cache_dir={cache_dir}", f"hydra.run.dir={run_dir}"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((run_dir / "results.json").read_text())


@needs_vllm
@pytest.mark.slow
def test_short_seeded_mgsr_run_on_each_engine_has_finite_losses(tmp_path, cache_dir):
    import csv

    for engine in ("hf", "vllm"):
        results = _train(tmp_path / engine, cache_dir, engine)
        rows = list(csv.DictReader(open(tmp_path / engine / "csv" / "metrics.csv")))
        losses = [float(r[k]) for r in rows for k in ("train/loss", "dac/loss", "span/loss") if r.get(k)]
        assert len(losses) >= 9 and all(math.isfinite(v) for v in losses), (engine, losses)
        assert results["scrg"]["corrected_per_seq"] > 0  # SCRG revised the engine's rollouts
