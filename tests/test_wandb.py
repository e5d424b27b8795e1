"""W&B never blocks a run: offline runs complete and say where their files are; an unreachable server or a
missing API key in online mode falls back to offline within the configured timeout."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from conftest import TINY, compose_train

from mgsr.build.trainer import build_loggers, wandb_offline_dir
from mgsr.pipeline import run


def _finish(loggers) -> None:
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            lg.experiment.finish()


def test_offline_run_completes_and_reports_its_directory(tmp_path, tiny_overrides, caplog):
    overrides = [o for o in tiny_overrides if not o.startswith("logger=")]
    cfg = compose_train([*overrides, "logger=default", "logger.wandb.mode=offline", "trainer.max_steps=2",
                         "eval.enabled=false", "loss=sft"])  # no teacher needed to test the logger
    with caplog.at_level(logging.INFO, logger="mgsr"):
        res = run(cfg, tmp_path / "run")
    offline = Path(res["wandb_offline_dir"])
    assert offline.is_dir() and offline.parent == tmp_path / "run" / "wandb"
    assert offline.name.startswith("offline-run-")
    assert list(offline.glob("*.wandb"))  # the run's records, for `wandb sync`
    assert any(f"W&B offline run: {offline}" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "run" / "csv" / "metrics.csv").is_file()  # the CSV logger ran alongside


@pytest.mark.parametrize("env", [
    {"WANDB_API_KEY": "0" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"},  # nothing listens there
    {"WANDB_API_KEY": None},  # not logged in
], ids=["unreachable", "no-api-key"])
def test_online_without_server_falls_back_to_offline(tmp_path, monkeypatch, caplog, env):
    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))  # no stored credentials
    monkeypatch.setenv("HOME", str(tmp_path))  # nor a ~/.netrc
    cfg = compose_train([*TINY, "logger=default", "logger.wandb.init_timeout=3", f"cache_dir={tmp_path}"])
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="mgsr"):
        loggers = build_loggers(cfg, tmp_path)
    assert time.monotonic() - t0 < 60
    assert any("logging offline instead" in r.getMessage() for r in caplog.records)
    wandb_logger = next(lg for lg in loggers if type(lg).__name__ == "WandbLogger")
    wandb_logger.log_metrics({"x": 1.0}, step=0)
    offline = wandb_offline_dir(loggers)
    _finish(loggers)
    assert offline is not None and Path(offline).is_dir() and Path(offline).parent == tmp_path / "wandb"
