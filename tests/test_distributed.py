"""Multi-process strategies on CPU.

- DDP: the real pipeline (`trainer=ddp`) in 2 processes with gloo: each rank trains on its own shard, the two
  shards of a step are exactly the single-process batch of twice the size, the first-step losses agree with
  a single-process run of that global batch, and the ranks end with identical weights.
- FSDP: Lightning refuses FSDP on CPU, so its config is checked by composing and building the strategy; the
  part that is ours (student rollouts outside forward under sharded parameters) runs with torch FSDP itself
  on CPU (gloo, 2 processes): generation gives exactly the unsharded result, teacher sharded or replicated.
- DeepSpeed is not installed here: its configs are checked by composing only.

This file doubles as the worker script (`python tests/test_distributed.py ddp|fsdp ...`).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from conftest import compose_train  # noqa: E402

from mgsr.config import to_container  # noqa: E402

PER_RANK_BATCH, STEPS = 4, 3
DDP_OVERRIDES = [
    "loss=sft", "data.n_train=64", "model.student_init.max_steps=2", "model.teacher_sft.n_train=64", "data.n_val=8", "data.n_test=8", f"trainer.max_steps={STEPS}",
    "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "val_generate=2", "eval.seeds=[10]",
    "eval.limit=2", "eval.max_new_tokens=4", "eval.exposure_bias=false", "logger=csv",
    "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
]


# -- worker side ---------------------------------------------------------------------------------------------
def _recorder(out_dir: Path):
    import lightning as L

    class Recorder(L.Callback):
        """Per rank: each step's prompts/answers, loss and response-token count; the final weights' checksum."""

        def __init__(self):
            self.steps = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            P = batch["prompt_len"]
            self.steps.append({"items": [[p, r[0]] for p, r in zip(batch["prompts"], batch["references"])],
                               "tokens": int(batch["response_mask"][:, P:].sum())})

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.steps[-1]["loss"] = float(outputs["loss"])

        def on_train_end(self, trainer, pl_module):
            checksum = float(sum(p.detach().double().sum() for p in pl_module.student.parameters()))
            out = {"rank": trainer.global_rank, "world": trainer.world_size, "steps": self.steps,
                   "checksum": checksum}
            (out_dir / f"rank{trainer.global_rank}_of{trainer.world_size}.json").write_text(json.dumps(out))

    return Recorder()


def run_recorded(overrides: list[str], run_dir: Path, out_dir: Path) -> dict:
    """`mgsr.pipeline.run` with a recording callback added to the trainer."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    import mgsr.pipeline as pipeline

    cfg = compose_train(overrides)
    OmegaConf.resolve(cfg)
    HydraConfig.instance().cfg = None  # so Lightning's DDP launcher re-runs this script as it is, not via Hydra
    build = pipeline.build_trainer

    def build_with_recorder(cfg, run_dir, callbacks, loggers, module=None):
        return build(cfg, run_dir, [*callbacks, _recorder(out_dir)], loggers, module=module)

    pipeline.build_trainer = build_with_recorder
    try:
        return pipeline.run(cfg, run_dir)
    finally:
        pipeline.build_trainer = build


def _fsdp_rank(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from mgsr.data.synthetic import make_synthetic_splits, synthetic_corpus
    from mgsr.data.tokenizer import build_tokenizer
    from mgsr.generation import SamplingConfig
    from mgsr.models import build_from_config
    from mgsr.module import DistillModule
    from mgsr.scrg import ScrgConfig, rollout_and_revise
    from mgsr.sharding import unsharded
    from mgsr.strategies import fsdp_policy_classes

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    records = make_synthetic_splits(0, 200, 0, 4)
    tok = build_tokenizer(synthetic_corpus(records["train"]), vocab_size=400)
    arch = {"n_positions": 256, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "n_head": 2}

    def module():
        teacher = build_from_config({**arch, "n_layer": 2, "n_embd": 32}, tok, seed=1).to(torch.bfloat16)
        student = build_from_config({**arch, "n_layer": 2, "n_embd": 16}, tok, seed=2)
        return DistillModule(student, tok, teacher=teacher, sft_weight=1.0, distill_weight=0.0, span_weight=0.0)

    prompts = [tok(r["prompt"])["input_ids"] for r in records["test"]]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()

    def rollout(m):
        out = rollout_and_revise(m.teacher, m.student, ids, mask, ScrgConfig(rounds=1),
                                 SamplingConfig(max_new_tokens=8), eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                                 generator=torch.Generator().manual_seed(0))
        return out["input_ids"].tolist()

    results = {}
    plain = module().eval()
    with torch.no_grad():
        reference = rollout(plain)
    for name, placement, gather in (("shard_full", "shard", "full"), ("shard_layer", "shard", "layer"),
                                    ("replicate_layer", "replicate", "layer")):
        m = module().eval()
        kwargs = {"ignored_modules": [m.teacher]} if placement == "replicate" else {}
        wrapper = FSDP(m, auto_wrap_policy=ModuleWrapPolicy(fsdp_policy_classes(m, "auto")), use_orig_params=True,
                       device_id=torch.device("cpu"), **kwargs)
        local = sum(p.numel() for p in m.teacher.parameters())
        with torch.no_grad(), unsharded(wrapper, gather=gather):
            results[name] = {"same": rollout(m) == reference, "teacher_local_numel": local}
    results["teacher_numel"] = sum(p.numel() for p in plain.teacher.parameters())
    (Path(out_dir) / f"fsdp_rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(argv: list[str]) -> None:
    if argv[0] == "ddp":  # ddp OUT_DIR RUN_DIR OVERRIDES... (Lightning re-runs this same command for rank 1)
        run_recorded([a for a in argv[3:] if not a.startswith("hydra.")], Path(argv[2]), Path(argv[1]))
    elif argv[0] == "fsdp":  # fsdp OUT_DIR
        import torch.multiprocessing as mp

        mp.spawn(_fsdp_rank, args=(_free_port(), argv[1]), nprocs=2)


def _run_worker(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    env.pop("MASTER_PORT", None)
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


# -- tests ----------------------------------------------------------------------------------------------------
@pytest.mark.slow  # two processes + a single-process reference run (~20 s idle, more on a loaded machine)
def test_ddp_two_cpu_processes_shard_data_and_match_single_process(tmp_path, cache_dir):
    base = [*DDP_OVERRIDES, f"cache_dir={cache_dir}"]
    single = tmp_path / "single"
    single.mkdir()
    run_recorded([*base, f"data.batch_size={2 * PER_RANK_BATCH}"], tmp_path / "single_run", single)
    ddp = tmp_path / "ddp"
    ddp.mkdir()
    proc = _run_worker(["ddp", str(ddp), str(tmp_path / "ddp_run"), *base, f"data.batch_size={PER_RANK_BATCH}",
                        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
                        f"trainer.max_steps={STEPS}"])
    assert proc.returncode == 0, proc.stderr[-3000:]

    one = json.loads((single / "rank0_of1.json").read_text())
    r0, r1 = (json.loads((ddp / f"rank{r}_of2.json").read_text()) for r in (0, 1))
    assert len(r0["steps"]) == len(r1["steps"]) == len(one["steps"]) == STEPS
    for s0, s1, s in zip(r0["steps"], r1["steps"], one["steps"]):
        assert len(s0["items"]) == len(s1["items"]) == PER_RANK_BATCH
        assert s0["items"] != s1["items"]  # the ranks saw different data ...
        assert sorted(s0["items"] + s1["items"]) == sorted(s["items"])  # ... together the global batch
        assert s0["tokens"] + s1["tokens"] == s["tokens"]
    # step 1 (same weights everywhere): the token-weighted mean of the rank losses is the global-batch loss
    a, b, s = r0["steps"][0], r1["steps"][0], one["steps"][0]
    ddp_loss = (a["loss"] * a["tokens"] + b["loss"] * b["tokens"]) / (a["tokens"] + b["tokens"])
    assert ddp_loss == pytest.approx(s["loss"], rel=1e-5)
    assert r0["checksum"] == r1["checksum"]  # gradients were all-reduced: the replicas stayed identical
    results = json.loads((tmp_path / "ddp_run" / "results.json").read_text())  # rank 0 exported + evaluated
    assert (tmp_path / "ddp_run" / "student" / "config.json").is_file() and "eval" in results


@pytest.mark.slow  # spawns two processes
def test_fsdp_rollouts_on_cpu_match_unsharded_generation(tmp_path):
    proc = _run_worker(["fsdp", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        res = json.loads((tmp_path / f"fsdp_rank{rank}.json").read_text())
        for name in ("shard_full", "shard_layer", "replicate_layer"):
            assert res[name]["same"], (rank, name)
        # sharded: each rank holds about half the teacher; replicated (ignored by FSDP): all of it
        assert res["shard_full"]["teacher_local_numel"] < 0.6 * res["teacher_numel"]
        assert res["replicate_layer"]["teacher_local_numel"] == res["teacher_numel"]


def _tiny_module():
    from mgsr.data.tokenizer import build_tokenizer
    from mgsr.models import build_from_config
    from mgsr.module import DistillModule

    tok = build_tokenizer(["a tiny corpus for a tiny test"] * 4, vocab_size=300)
    arch = {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 64}
    teacher = build_from_config(arch, tok).to(torch.bfloat16)
    return DistillModule(build_from_config(arch, tok), tok, teacher=teacher, distill_weight=0.0, span_weight=0.0)


def test_fsdp_config_builds_the_strategy_lightning_runs_it_on_gpus_only():
    import lightning as L
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block, GPT2LMHeadModel

    from mgsr.sharding import is_sharded
    from mgsr.strategies import build_strategy, strategy_callbacks

    cfg = compose_train(["trainer=fsdp"])
    assert (cfg.trainer.precision, cfg.trainer.strategy.sharding_strategy) == ("bf16-mixed", "FULL_SHARD")
    module = _tiny_module()
    spec = to_container(cfg.trainer.strategy)
    strategy = build_strategy(spec, module)
    assert isinstance(strategy, FSDPStrategy) and is_sharded(strategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {GPT2Block, GPT2LMHeadModel}
    assert "ignored_modules" not in strategy.kwargs and strategy.kwargs["use_orig_params"]
    assert module.rollout_gather == "full" and strategy_callbacks(spec) == []

    spec.update(teacher="replicate", auto_wrap_policy=["GPT2Block"], rollout_gather="layer",
                activation_checkpointing_policy=["transformers.models.gpt2.modeling_gpt2.GPT2Block"])
    strategy = build_strategy(spec, module)
    assert strategy.kwargs["ignored_modules"] == [module.teacher] and module.rollout_gather == "layer"
    assert len(strategy_callbacks(spec)) == 1  # moves the replicated teacher to the device
    with pytest.raises(ValueError, match="GPU"):  # why FSDP is tested with torch FSDP on CPU above
        L.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False)
    with pytest.raises(ValueError, match="NoSuchBlock"):
        build_strategy({**spec, "auto_wrap_policy": ["NoSuchBlock"]}, module)


def test_ddp_and_deepspeed_configs_compose():
    from lightning.pytorch.strategies import DDPStrategy

    from mgsr.sharding import is_sharded
    from mgsr.strategies import build_strategy

    ddp = compose_train(["trainer=ddp"]).trainer
    strategy = build_strategy(to_container(ddp.strategy))
    assert isinstance(strategy, DDPStrategy) and not is_sharded(strategy)
    assert (ddp.accelerator, ddp.devices, ddp.precision) == ("gpu", -1, "bf16-mixed")
    for name, stage in (("deepspeed", 2), ("deepspeed_zero2", 2), ("deepspeed_zero3", 3)):
        t = compose_train([f"trainer={name}"]).trainer
        assert t.strategy._target_ == "lightning.pytorch.strategies.DeepSpeedStrategy" and t.strategy.stage == stage
        assert t.precision == "bf16-mixed"
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        with pytest.raises(Exception, match="(?i)deepspeed"):
            build_strategy(to_container(compose_train(["trainer=deepspeed_zero3"]).trainer.strategy))


def test_sampler_shards_by_rank_like_distributed_sampler():
    from mgsr.data.datamodule import EpochPermutationSampler

    full = EpochPermutationSampler(10, seed=3).order(0)
    shards = [EpochPermutationSampler(10, seed=3, num_replicas=3, rank=r) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]  # ceil(10 / 3): every rank runs the same number of steps
    orders = [s.order(0) for s in shards]
    padded = full + full[:2]
    assert orders == [padded[r::3] for r in range(3)]
    shards[1].skip = 2  # resuming after 2 samples on rank 1 continues its own shard
    assert list(shards[1]) == orders[1][2:]


if __name__ == "__main__":
    _worker(sys.argv[1:])
