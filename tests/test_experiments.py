"""Every named experiment (conf/experiment/*.yaml) composes, validates, and runs a few steps on the tiny default;
every point of its `-m` grid (hydra.sweeper.params) composes and builds its loss objects.

A new experiment file is picked up by these tests without touching them.
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import compose_train, require_real_model
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from mgsr.config import validate

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
REAL = tuple(n for n in EXPERIMENTS if n.startswith("real_"))  # pretrained models: run by tests/test_real_model.py
OURS = ("mgsr", "ablation_", "incremental", "scrg_")  # the ablation experiments (README: Experiments and ablations); name = stem

# On top of the suite's reduced tiny config (conftest.TINY, whose teacher is fine-tuned once per session):
# fewer steps and shorter generations, none of which changes the cached teacher. ~4 s a run on one core.
FAST = ["trainer.max_steps=2", "trainer.val_check_interval=2", "val_generate=2", "eval.max_new_tokens=8",
        "scrg.sampling.max_new_tokens=8", "eval.exposure_prompts=4", "checkpoint.every_n_train_steps=1000"]


def fast(overrides: list[str]) -> list[str]:
    keys = {o.partition("=")[0] for o in FAST}
    return [o for o in overrides if o.partition("=")[0] not in keys] + FAST


def _compose(overrides, hydra_cfg=False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=hydra_cfg)


def _grid(name: str) -> dict[str, list[str]]:
    params = _compose([f"+experiment={name}"], hydra_cfg=True).hydra.sweeper.params or {}
    return {k: [v.strip() for v in str(vals).split(",")] for k, vals in params.items()}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: one intra-op thread is faster, and never oversubscribes a shared 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_the_directory_holds_the_experiments_the_readme_promises():
    required = {"mgsr", "ablation_fixed_clip", "ablation_fixed_clip_logprob", "ablation_multi_token",
                "ablation_multi_token_adaptive", "ablation_no_scrg", "ablation_no_span", "ablation_no_dac",
                "ablation_loss_weights", "ablation_dac_literal", "ablation_dac_components", "ablation_divergence",
                "ablation_span_relation", "incremental", "scrg_rounds", "scrg_every_n"}
    assert required <= set(EXPERIMENTS)
    docs = (REPO / "README.md").read_text()
    missing = [n for n in EXPERIMENTS if n.startswith(OURS) and f"+experiment={n}" not in docs]
    assert not missing, f"README.md must list every ablation experiment; missing {missing}"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_grid_points_compose_and_build(name):
    if name in REAL:
        require_real_model()  # validation finds the packaged weights
    grid = _grid(name)
    points = [[]] + [[f"{k}={v}"] for k, vals in grid.items() for v in vals]
    for extra in points:
        cfg = _compose([f"+experiment={name}", *extra])
        assert cfg.name and (cfg.name == name or not name.startswith(OURS))
        validate(cfg)
        for part in ("distill", "span"):
            node = cfg.loss.get(part)
            if node is not None and cfg.loss[f"{part}_weight"] > 0:
                instantiate(node)  # e.g. every divergence of ablation_divergence takes its params


def test_loss_weight_grid_is_exactly_the_six_pairs():
    pairs = []
    for option in _grid("ablation_loss_weights")["weights"]:
        cfg = _compose(["+experiment=ablation_loss_weights", f"weights={option}"])
        pairs.append((float(cfg.loss.distill_weight), float(cfg.loss.span_weight)))
    assert pairs == [(1, 0), (0, 1), (0.5, 0.5), (1, 0.5), (0.5, 1), (1, 1)]
    assert all(_compose(["+experiment=ablation_loss_weights"]).loss.sft_weight == 1.0 for _ in [0])


def test_fixed_clip_grid_covers_the_planned_pairs():
    got = set()
    for option in _grid("ablation_fixed_clip")["clip"]:
        d = _compose(["+experiment=ablation_fixed_clip", f"clip={option}"]).loss.distill
        if d.head == "fixed":
            got.add((float(d.lower), float(d.upper)))
    assert got == {(0.2, 0.8), (0.3, 0.7), (0.05, 0.95), (0.1, 0.9)}


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if n not in REAL])
def test_experiment_runs_a_few_steps(name, tiny_overrides, tmp_path):
    from mgsr.pipeline import run

    cfg = compose_train([f"+experiment={name}", *fast(tiny_overrides)])
    results = run(cfg, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["name"] == cfg.name
    assert saved["train_cost"]["s_per_step"] > 0
    assert "rougeL" in saved["eval"]["summary"]["test"]
    if cfg.eval.get("exposure_bias"):
        assert results["exposure"]["n_prompts"] > 0


def test_sweep_configs_compose():
    cfg = _compose(["+experiment=ablation_loss_weights", "+sweep=seeds"], hydra_cfg=True)
    assert set(cfg.hydra.sweeper.params) == {"weights", "seed"}
    plugins = {"optuna_weights": "hydra_plugins.hydra_optuna_sweeper",
               "optuna_multi_threshold": "hydra_plugins.hydra_optuna_sweeper",
               "slurm": "hydra_plugins.hydra_submitit_launcher"}
    import importlib.util

    for name, module in plugins.items():  # optional plugins: checked where installed
        if importlib.util.find_spec("hydra_plugins") and importlib.util.find_spec(module):
            cfg = _compose(["+experiment=mgsr", f"+sweep={name}"], hydra_cfg=True)
            assert cfg.hydra.sweeper.params or cfg.hydra.launcher


@pytest.mark.parametrize(("overrides", "lr"), [
    ([], 1e-3),                                        # the tiny preset's own lr (a from-scratch student)
    (["model=gpt2_xl_to_gpt2"], 5e-4),                 # no preset lr: the paper's GPT-2 student lr
    (["optim.lr=3e-4"], 3e-4),                         # the command line wins
    (["model=gpt2_xl_to_gpt2", "+model.lr=2e-4"], 2e-4),
])
def test_learning_rate_comes_from_the_model_preset_unless_given(overrides, lr):
    assert compose_train(overrides).optim.lr == pytest.approx(lr)
