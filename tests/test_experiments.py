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

from mgsr.build.validate import validate

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
    for option in _grid("ablation_fixed_clip")["loss/distill"]:
        d = _compose(["+experiment=ablation_fixed_clip", f"loss/distill={option}"]).loss.distill
        if d.head == "fixed":
            got.add((float(d.lower), float(d.upper)))
    assert got == {(0.2, 0.8), (0.3, 0.7), (0.05, 0.95), (0.1, 0.9)}


def _metric_columns(run_dir: Path) -> set[str]:
    return set((run_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(","))


@pytest.mark.slow  # a pipeline run per experiment
@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if n not in REAL])
def test_experiment_runs_a_few_steps(name, tiny_overrides, tmp_path):
    from mgsr.build.module import uses_student_sequences
    from mgsr.evaluation.metrics import exact_match, rouge_l
    from mgsr.pipeline import run

    cfg = compose_train([f"+experiment={name}", *fast(tiny_overrides)])
    results = run(cfg, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["name"] == cfg.name
    if name.startswith("reference_"):  # evaluated, not trained: no steps, no checkpoints, scores of its samples
        assert saved["eval_only"] == cfg.eval_only and "train_cost" not in saved
        assert not (tmp_path / "checkpoints").exists()
        samples = saved["eval"]["samples"]["test"]
        assert saved["eval"]["per_seed"]["test"]["10"]["rougeL"] == pytest.approx(
            rouge_l([x["prediction"] for x in samples], [x["references"] for x in samples]))
        return
    assert saved["train_cost"]["s_per_step"] > 0
    # the experiment's switches reached training: each active loss logged its own group, an inactive one none
    cols = _metric_columns(tmp_path)
    loss = cfg.loss
    distill = str(loss.distill.get("_target_", "")) if loss.get("distill") is not None else ""
    if loss.distill_weight > 0 and distill.endswith("DacKl"):
        assert {"dac/kl", "dac/coverage"} <= cols
    elif loss.distill_weight > 0 and distill.endswith("Divergence"):
        assert f"kd/{loss.distill.get('name', 'fkl')}" in cols
    elif loss.distill_weight > 0 and distill.endswith("Taid"):
        assert {"taid/t", "taid/kl", "taid/ce"} <= cols and not any(c.startswith(("dac/", "kd/")) for c in cols)
    elif loss.distill_weight > 0 and distill.endswith("MiniLlm"):
        assert {"minillm/pg", "minillm/single_step", "minillm/ratio", "minillm/lm_loss"} <= cols
        assert not any(c.startswith(("dac/", "kd/")) for c in cols)
    else:
        assert not any(c.startswith(("dac/", "kd/")) for c in cols)
    assert ("span/loss" in cols) == (loss.span_weight > 0 and loss.get("span") is not None)
    if name.startswith(OURS) and uses_student_sequences(cfg) and cfg.scrg.rounds > 0:
        assert "scrg/unchanged_share" in cols  # SCRG revised the rollouts
    if not uses_student_sequences(cfg):
        assert not any(c.startswith("scrg/") for c in cols)
    # the reported scores are the metrics of the saved generations (limit=4: all of them are saved)
    per_seed = saved["eval"]["per_seed"]["test"]["10"]
    samples = saved["eval"]["samples"]["test"]
    preds, refs = [x["prediction"] for x in samples], [x["references"] for x in samples]
    assert len(samples) == 4
    assert per_seed["rougeL"] == pytest.approx(rouge_l(preds, refs))
    assert per_seed["exact_match"] == pytest.approx(exact_match(preds, refs))
    assert saved["eval"]["summary"]["test"]["rougeL"] == pytest.approx([per_seed["rougeL"], 0.0])  # one eval seed
    if cfg.eval.get("exposure_bias"):
        assert results["exposure"]["n_prompts"] == 4 and len(results["exposure"]["curve"]) > 0


# -- sweep configs: composed against the plugins' config schemas, installed or not --------------------------------
# Stand-ins with the fields of hydra-optuna-sweeper's OptunaSweeperConf and hydra-submitit-launcher's
# SlurmQueueConf (structured: a key the plugin does not know fails the composition), registered only where the
# plugin is not installed; the _target_ strings are the plugins' own.
OPTUNA_TARGET = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
SLURM_TARGET = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


def _register_plugin_schemas():
    import importlib.util
    from dataclasses import dataclass, field
    from typing import Any

    from hydra.core.config_store import ConfigStore

    def installed(module):
        return importlib.util.find_spec("hydra_plugins") is not None and importlib.util.find_spec(module) is not None

    cs = ConfigStore.instance()
    if not installed("hydra_plugins.hydra_optuna_sweeper"):
        @dataclass
        class TPESamplerConf:
            _target_: str = "optuna.samplers.TPESampler"
            seed: int | None = None
            consider_prior: bool = True
            prior_weight: float = 1.0
            consider_magic_clip: bool = True
            consider_endpoints: bool = False
            n_startup_trials: int = 10
            n_ei_candidates: int = 24
            multivariate: bool = False
            warn_independent_sampling: bool = True

        @dataclass
        class OptunaSweeperConf:
            _target_: str = OPTUNA_TARGET
            sampler: TPESamplerConf = field(default_factory=TPESamplerConf)
            direction: Any = "minimize"
            storage: Any | None = None
            study_name: str | None = None
            n_trials: int = 20
            n_jobs: int = 2
            max_failure_rate: float = 0.0
            search_space: dict[str, Any] | None = None
            params: dict[str, str] | None = None
            custom_search_space: str | None = None

        cs.store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="test_stand_in")
    if not installed("hydra_plugins.hydra_submitit_launcher"):
        @dataclass
        class SlurmQueueConf:
            _target_: str = SLURM_TARGET
            submitit_folder: str = "${hydra.sweep.dir}/.submitit/%j"
            timeout_min: int = 60
            cpus_per_task: int | None = None
            gpus_per_node: int | None = None
            tasks_per_node: int = 1
            mem_gb: int | None = None
            nodes: int = 1
            name: str = "${hydra.job.name}"
            stderr_to_stdout: bool = False
            partition: str | None = None
            qos: str | None = None
            comment: str | None = None
            constraint: str | None = None
            exclude: str | None = None
            gres: str | None = None
            cpus_per_gpu: int | None = None
            gpus_per_task: int | None = None
            mem_per_gpu: str | None = None
            mem_per_cpu: str | None = None
            account: str | None = None
            signal_delay_s: int = 120
            max_num_timeout: int = 0
            additional_parameters: dict[str, Any] = field(default_factory=dict)
            array_parallelism: int = 256
            setup: list[str] | None = None
            srun_args: list[str] | None = None

        cs.store(group="hydra/launcher", name="submitit_slurm", node=SlurmQueueConf, provider="test_stand_in")


def test_seed_sweep_composes():
    cfg = _compose(["+experiment=ablation_loss_weights", "+sweep=seeds"], hydra_cfg=True)
    assert set(cfg.hydra.sweeper.params) == {"weights", "seed"} and cfg.hydra.sweeper.params.seed == "0,1,2"


def test_optuna_sweeps_compose_with_the_plugin_schema(hydra_restore_singletons):
    from omegaconf import OmegaConf

    _register_plugin_schemas()
    cfg = _compose(["+experiment=mgsr", "+sweep=optuna_weights"], hydra_cfg=True)
    sw = cfg.hydra.sweeper
    assert sw._target_ == OPTUNA_TARGET
    assert sw.direction == "maximize"  # train.py returns val/rougeL
    assert (sw.n_trials, sw.n_jobs, sw.sampler.seed, sw.storage) == (20, 1, 0, None)
    assert sw.study_name == "mgsr_weights"
    assert dict(sw.params) == {"loss.distill_weight": "interval(0.0, 2.0)", "loss.span_weight": "interval(0.0, 2.0)"}
    for key in sw.params:  # every searched key exists in the run config
        assert OmegaConf.select(cfg, key) is not None, key

    cfg = _compose(["+experiment=ablation_multi_token", "+sweep=optuna_multi_threshold"], hydra_cfg=True)
    sw = cfg.hydra.sweeper
    assert sw._target_ == OPTUNA_TARGET and sw.direction == "maximize"
    assert dict(sw.params) == {"scrg.mode": "multi", "scrg.threshold": "interval(0.1, 4.0)",
                               "scrg.max_corrections": "range(1, 16)"}
    assert cfg.scrg.mode == "multi" and cfg.scrg.threshold_mode == "fixed"
    for key in sw.params:
        assert OmegaConf.select(cfg, key) is not None, key


def test_slurm_launcher_composes_with_the_plugin_schema(hydra_restore_singletons):
    _register_plugin_schemas()
    cfg = _compose(["+experiment=ablation_loss_weights", "+sweep=slurm", "hydra.launcher.partition=gpu"],
                   hydra_cfg=True)
    la = cfg.hydra.launcher
    assert la._target_ == SLURM_TARGET
    assert (la.timeout_min, la.nodes, la.tasks_per_node, la.gpus_per_node, la.cpus_per_task, la.mem_gb) == (
        720, 1, 1, 1, 8, 64)
    assert la.partition == "gpu" and la.array_parallelism == 32
    assert la.submitit_folder == f"{cfg.hydra.sweep.dir}/.submitit/%j"
    assert set(cfg.hydra.sweeper.params) == {"weights"}  # the experiment's grid is still the sweep


@pytest.mark.parametrize(("overrides", "lr"), [
    ([], 1e-3),                                        # the tiny preset's own lr (a from-scratch student)
    (["model=gpt2_xl_to_gpt2"], 5e-4),                 # no preset lr: the paper's GPT-2 student lr
    (["optim.lr=3e-4"], 3e-4),                         # the command line wins
    (["model=gpt2_xl_to_gpt2", "+model.lr=2e-4"], 2e-4),
])
def test_learning_rate_comes_from_the_model_preset_unless_given(overrides, lr):
    assert compose_train(overrides).optim.lr == pytest.approx(lr)
