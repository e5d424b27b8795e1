"""Fallbacks say what happened (issue 14.9): resuming with ckpt_path=last and no checkpoint, a skipped exposure-bias
measurement, the W&B sweep group, and a replay buffer resumed with another capacity."""

from __future__ import annotations

import logging
import types
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mgsr.build import evaluate, trainer
from mgsr.config import ConfigError
from mgsr.replay import ReplayBuffer


# --- ckpt_path ------------------------------------------------------------------------------------------------
def test_ckpt_last_without_a_checkpoint_warns_with_the_path(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="mgsr")
    assert trainer.resume_checkpoint("last", tmp_path / "run") is None
    msg = " ".join(r.getMessage() for r in caplog.records if r.name == "mgsr")
    assert str(tmp_path / "run" / "checkpoints" / "last.ckpt") in msg
    assert "FROM SCRATCH" in msg and "hydra.run.dir" in msg


def test_ckpt_last_and_explicit_paths(tmp_path):
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"x")
    assert trainer.resume_checkpoint("last", tmp_path / "run") == str(last)
    assert trainer.resume_checkpoint(str(last), tmp_path / "other") == str(last)
    assert trainer.resume_checkpoint(None, tmp_path) is None
    with pytest.raises(ConfigError, match="no checkpoint there"):
        trainer.resume_checkpoint(str(tmp_path / "missing.ckpt"), tmp_path / "run")


# --- exposure bias ---------------------------------------------------------------------------------------------
def _exposure_args():
    cfg = OmegaConf.create({"eval": {"exposure_prompts": 2, "exposure_seed": 10, "max_new_tokens": 4, "batch_size": 2},
                            "data": {"max_prompt_len": 16}})
    student = torch.nn.Linear(2, 2)
    dm = types.SimpleNamespace(records={"val": [{"prompt": "a"}]})
    return cfg, student, dm


def test_exposure_bias_without_a_teacher_is_a_warned_and_recorded_skip(monkeypatch, caplog):
    cfg, student, dm = _exposure_args()

    def no_teacher(*a, **k):
        raise OSError("teacher cache is empty")

    monkeypatch.setattr(evaluate, "ensure_teacher", no_teacher)
    caplog.set_level(logging.WARNING, logger="mgsr")
    out = evaluate.exposure_bias(cfg, student, None, tokenizer=None, dm=dm)
    assert out == {"skipped": "no teacher to compare with (OSError: teacher cache is empty)"}
    assert any("exposure bias skipped" in r.getMessage() and "teacher cache is empty" in r.getMessage()
               for r in caplog.records)


def test_exposure_bias_measurement_errors_are_not_swallowed(monkeypatch):
    import mgsr.evaluation.exposure as exposure

    cfg, student, dm = _exposure_args()

    def broken(*a, **k):
        raise ValueError("shape mismatch in the measurement")

    monkeypatch.setattr(exposure, "measure_exposure_bias", broken)
    with pytest.raises(ValueError, match="shape mismatch"):
        evaluate.exposure_bias(cfg, student, torch.nn.Linear(2, 2), tokenizer=None, dm=dm)


# --- W&B sweep group -------------------------------------------------------------------------------------------
def test_sweep_group_failure_is_warned(monkeypatch, caplog):
    from hydra.core.hydra_config import HydraConfig

    def broken():
        raise RuntimeError("hydra config unreadable")

    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(broken))
    caplog.set_level(logging.WARNING, logger="mgsr")
    assert trainer._sweep_group(OmegaConf.create({"name": "mgsr"}), Path("/tmp/sweep/0")) is None
    assert any("sweep group" in r.getMessage() and "hydra config unreadable" in r.getMessage() for r in caplog.records)


# --- replay buffer capacity on resume --------------------------------------------------------------------------
def _fill(buf: ReplayBuffer, values) -> None:
    for v in values:
        seqs = {"input_ids": torch.tensor([[1, v]]), "attention_mask": torch.ones(1, 2, dtype=torch.long),
                "response_mask": torch.tensor([[False, True]]), "prompt_len": 1}
        buf.add(seqs)


def _responses(buf: ReplayBuffer) -> list[int]:
    return [int(r[0]) for _, r in buf.items]


def test_replay_buffer_keeps_the_configured_capacity_on_resume(caplog):
    old = ReplayBuffer(4)
    _fill(old, range(10, 16))  # ring of 4 after 6 adds: entries 14, 15, 12, 13 (oldest: 12)
    assert _responses(old) == [14, 15, 12, 13]
    caplog.set_level(logging.WARNING, logger="mgsr.replay")
    small = ReplayBuffer(3)
    small.load_state_dict(old.state_dict())
    assert small.capacity == 3 and _responses(small) == [13, 14, 15]  # the three newest, oldest first
    assert any("capacity is 4" in r.getMessage() and "dropping the 1 oldest" in r.getMessage() for r in caplog.records)
    _fill(small, [16])
    assert _responses(small) == [16, 14, 15]  # the ring continues: 13 (the oldest) is overwritten
    big = ReplayBuffer(8)
    big.load_state_dict(old.state_dict())
    _fill(big, [16])
    assert big.capacity == 8 and _responses(big) == [12, 13, 14, 15, 16]
    same = ReplayBuffer(4)
    caplog.clear()
    same.load_state_dict(old.state_dict())
    assert _responses(same) == [14, 15, 12, 13] and not caplog.records  # same capacity: exact, silent
