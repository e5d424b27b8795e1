"""FSDP2 (`trainer=fsdp2`, mgsr/fsdp2.py) on 2 CPU processes with gloo: the full MGSR step (student rollouts, SCRG
revision, DAC-KL with its learnable head, span loss, validation sampling) sharded.

- Equality: both ranks are fed the same batches (the sampler is told the world has one replica), so the
  averaged gradient is the single-process gradient and every difference from a single-process run comes from
  sharding itself (all-gathers, reduce-scatters, the optimiser on shards, the sharded gradient-norm clip). Every
  step's losses and rollouts, the final weights, val/rougeL and the exported student's test metrics must equal
  the single-process run's to a relative 1e-5.
- Kill/resume: the same sharded run SIGKILLed (both processes) right after its step-2 checkpoint (a directory of
  shards) and resumed with ckpt_path must end exactly as the uninterrupted run: steps 3-4, weights, evaluation.
- Sharding is real: each rank holds about half of the student and of the teacher.

This file doubles as the worker (`python tests/test_fsdp2.py OUT_DIR RUN_DIR [kill] OVERRIDES...`); Lightning's
launcher re-runs that same command for rank 1.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from conftest import TINY, compose_train  # noqa: E402

STEPS, KILL_AT = 4, 2
RUN = [*TINY, "+experiment=mgsr", f"trainer.max_steps={STEPS}", "trainer.val_check_interval=3",
       f"checkpoint.every_n_train_steps={KILL_AT}", "eval.exposure_bias=false", "data.batch_size=4",
       "trainer.deterministic=true"]
FSDP2 = ["trainer=fsdp2", "trainer.devices=2"]
LOGGED = ("train/loss", "train/sft", "dac/loss", "span/loss", "train/distill_tokens", "scrg/corrected_per_seq")
REL = 1e-5  # float32 sums in a different order (reduce-scatter, sharded norms); observed differences are ~1e-7


# -- worker side ---------------------------------------------------------------------------------------------
def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p  # a collective: every rank calls it in order


def _local_numel(model) -> int:
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())


def _recorder(out_dir: Path, kill_at: int | None):
    import lightning as L

    class Recorder(L.Callback):
        """Per rank: each step's logged losses; the weights' checksum at the end; local parameter counts."""

        def __init__(self):
            self.steps, self.numel = [], {}

        def on_train_start(self, trainer, pl_module):
            self.numel = {name: [_local_numel(m), sum(_full(p).numel() for p in m.parameters())]
                          for name, m in (("student", pl_module.student), ("teacher", pl_module.teacher))}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if kill_at is not None and trainer.global_step == kill_at and trainer.is_global_zero:
                os.killpg(os.getpgrp(), signal.SIGKILL)  # a hard kill of both ranks, after the step's checkpoint

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged = trainer.callback_metrics
            self.steps.append({"step": trainer.global_step, **{k: float(logged[k]) for k in LOGGED if k in logged}})

        def on_train_end(self, trainer, pl_module):
            weights = [_full(p.detach()) for p in pl_module.student.parameters()]
            head = [_full(p.detach()) for p in pl_module.distill.parameters()]
            out = {"steps": self.steps, "numel": self.numel, "checksum": float(sum(w.double().sum() for w in weights)),
                   "head_checksum": float(sum(w.double().sum() for w in head)),
                   "val_rougeL": float(trainer.callback_metrics["val/rougeL"])}
            (out_dir / f"rank{trainer.global_rank}_of{trainer.world_size}.json").write_text(json.dumps(out))

    return Recorder()


def _run(out_dir: Path, run_dir: Path, overrides: list[str], kill_at: int | None) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    import mgsr.data.datamodule as datamodule
    import mgsr.pipeline as pipeline

    # every rank draws the single-process order: the same batches everywhere (see the module docstring)
    datamodule.EpochPermutationSampler.num_replicas = property(lambda self: 1)
    datamodule.EpochPermutationSampler.rank = property(lambda self: 0)
    cfg = compose_train(overrides)
    OmegaConf.resolve(cfg)
    HydraConfig.instance().cfg = None  # Lightning's launcher re-runs this script as it is, not via Hydra
    build = pipeline.build_trainer
    pipeline.build_trainer = lambda cfg, run_dir, callbacks, loggers, module=None: build(
        cfg, run_dir, [*callbacks, _recorder(out_dir, kill_at)], loggers, module=module)
    pipeline.run(cfg, run_dir)


# -- test side ------------------------------------------------------------------------------------------------
def _worker(out_dir: Path, run_dir: Path, overrides: list[str], kill: bool = False) -> subprocess.CompletedProcess:
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get(
        "PYTHONPATH", "")])}
    env.pop("MASTER_PORT", None)
    cmd = [sys.executable, str(Path(__file__).resolve()), str(out_dir), str(run_dir), *(["kill"] if kill else []),
           *overrides]
    # its own session: the kill takes the worker and the rank it launched, nothing else
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
                          start_new_session=True)


def _load(out_dir: Path, rank: int = 0, world: int = 2) -> dict:
    return json.loads((out_dir / f"rank{rank}_of{world}.json").read_text())


def _test_metrics(run_dir: Path) -> dict:
    """The exported student's final evaluation (ROUGE-L, Distinct-n, EM), minus its timing."""
    summary = json.loads((run_dir / "results.json").read_text())["eval"]["summary"]["test"]
    return {k: v[0] for k, v in summary.items() if k != "tokens_per_s"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir) -> Path:
    """single (1 process), fsdp2 (2 processes), killed + resumed (2 processes): ~2 min on 2 idle cores."""
    root = tmp_path_factory.mktemp("fsdp2")
    base = [*RUN, f"cache_dir={cache_dir}"]
    for name, extra in (("single", []), ("fsdp2", FSDP2)):
        proc = _worker(root / name, root / name / "run", [*base, *extra])
        assert proc.returncode == 0, proc.stderr[-4000:]
    killed = root / "killed" / "run"
    proc = _worker(root / "killed", killed, [*base, *FSDP2], kill=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-4000:]
    proc = _worker(root / "resumed", killed, [*base, *FSDP2, f"ckpt_path={killed / 'checkpoints' / 'last.ckpt'}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


@pytest.mark.slow
def test_fsdp2_mgsr_steps_equal_single_process(runs):
    one, r0, r1 = _load(runs / "single", 0, 1), _load(runs / "fsdp2", 0), _load(runs / "fsdp2", 1)
    assert [s["step"] for s in one["steps"]] == [s["step"] for s in r0["steps"]] == list(range(1, STEPS + 1))
    for a, b, s in zip(r0["steps"], r1["steps"], one["steps"]):
        assert set(s) == {"step", *LOGGED}  # every part of the MGSR step ran (SCRG, DAC-KL, span)
        for key in LOGGED:
            assert a[key] == pytest.approx(s[key], rel=REL), (s["step"], key)
            assert b[key] == pytest.approx(s[key], rel=REL), (s["step"], key)
    for key in ("checksum", "head_checksum", "val_rougeL"):
        assert r0[key] == r1[key] == pytest.approx(one[key], rel=REL), key
    assert _test_metrics(runs / "fsdp2" / "run") == pytest.approx(_test_metrics(runs / "single" / "run"), rel=REL)


@pytest.mark.slow
def test_fsdp2_shards_student_and_teacher(runs):
    for rank in (0, 1):
        for model, (local, total) in _load(runs / "fsdp2", rank)["numel"].items():
            assert 0.45 * total < local < 0.55 * total, (rank, model, local, total)
    ckpt = runs / "fsdp2" / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (runs / "fsdp2" / "run" / "student" / "config.json").is_file()  # exported from the shards by rank 0


@pytest.mark.slow
def test_fsdp2_sigkill_then_resume_matches_uninterrupted(runs):
    straight, resumed = _load(runs / "fsdp2"), _load(runs / "resumed")
    assert [s["step"] for s in resumed["steps"]] == list(range(KILL_AT + 1, STEPS + 1))
    assert resumed["steps"] == straight["steps"][KILL_AT:]  # bit-exact: same shards, optimiser state and RNG
    for key in ("checksum", "head_checksum", "val_rougeL"):
        assert resumed[key] == straight[key], key
    assert _test_metrics(runs / "killed" / "run") == _test_metrics(runs / "fsdp2" / "run")


def test_fsdp2_bad_settings_fail_before_any_model_loads(tmp_path):
    from mgsr.build.validate import validate
    from mgsr.config import ConfigError

    for override, message in (("trainer.strategy.teacher=both", "choose shard or replicate"),
                              ("trainer.strategy.rollout_gather=layer", "FSDP2 gathers rollouts whole")):
        with pytest.raises(ConfigError, match=message):
            validate(compose_train(["trainer=fsdp2", override]))


if __name__ == "__main__":
    args = sys.argv[1:]
    kill = args[2] == "kill"
    _run(Path(args[0]), Path(args[1]), [a for a in args[2 + kill:] if not a.startswith("hydra.")],
         KILL_AT if kill else None)
