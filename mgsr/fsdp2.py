"""FSDP2 (torch `fully_shard`) under Lightning's `ModelParallelStrategy`: the sharding strategy that runs on CPU
(gloo) as well as on GPUs (nccl), so the sharded path is tested in CI (tests/test_fsdp2.py).

What is sharded, over the data-parallel mesh (every rank):
- the student: one group per transformer block (the classes in the model's `_no_split_modules`, or
  `shard_classes`), plus one for the rest (embeddings, final norm, the tied head);
- the teacher: the same (`teacher: shard`), or kept whole on every rank (`teacher: replicate`: no
  all-gathers for a frozen model, at the cost of its full memory per rank);
- every other module with trainable parameters (DAC-KL's quantile head): one group each, so its gradients
  are averaged across ranks like the student's.
Every group reshards after forward (`fsdp2_gathered` in mgsr/sharding.py relies on it). Rollouts and
validation generation run with all groups gathered once (the ranks decode different numbers of steps).

Checkpoints are `torch.distributed.checkpoint` directories (`<name>.ckpt/`: one shard file per rank +
`meta.pt`), written without the teacher (DistillModule.on_save_checkpoint), so loading skips the teacher's
keys; `load_student_state` reads the student's whole weights back from one on a single process.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from lightning.pytorch.strategies import ModelParallelStrategy

from mgsr.fsdp2_checkpoint import METADATA, load_sharded
from mgsr.sharding import unsharded

log = logging.getLogger(__name__)

TEACHER_PLACEMENTS = ("shard", "replicate")


class FSDP2Strategy(ModelParallelStrategy):
    """`ModelParallelStrategy` with a data-parallel mesh over all ranks (no tensor parallelism) whose
    `configure_model` step is `shard_distill_module`. `shard_classes`: resolved block classes (a set), given by
    mgsr.strategies.build_strategy from the config's names."""

    def __init__(self, *, shard_classes=frozenset(), teacher: str = "shard", save_distributed_checkpoint: bool = True,
                 process_group_backend: str | None = None, **kwargs):
        self.check(teacher=teacher)
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)
        self.shard_classes, self.teacher = set(shard_classes), teacher

    @staticmethod
    def check(*, teacher: str = "shard", rollout_gather: str = "full", **_) -> None:
        if teacher not in TEACHER_PLACEMENTS:
            raise ValueError(f"trainer.strategy.teacher={teacher!r}: choose shard or replicate")
        if rollout_gather != "full":
            raise ValueError(f"trainer.strategy.rollout_gather={rollout_gather!r}: FSDP2 gathers rollouts whole "
                             "(ranks decode different numbers of steps, so per-layer gathers would deadlock); "
                             "use full")

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":  # all processes shard one model; none split a layer (TP = 1)
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
        # Lightning applies parallelism in the module's `configure_model` hook, called after this; DistillModule
        # knows no strategy, so the hook is this strategy's for the module it was given.
        module = self.lightning_module
        module.configure_model = functools.partial(shard_distill_module, module, self.device_mesh["data_parallel"],
                                                   self.shard_classes, teacher=self.teacher)

    def validation_step(self, *args, **kwargs):
        with unsharded(self.model):  # validation samples val/rougeL: ragged decoding, as in rollouts
            return super().validation_step(*args, **kwargs)

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        path = Path(self.broadcast(checkpoint_path))
        if not (path.is_dir() and (path / METADATA).is_file()):
            return super().load_checkpoint(path, weights_only=weights_only)
        metadata = load_sharded(self.model, self.optimizers, path, skip_prefix="teacher.")
        metadata["state_dict"] = {}  # loaded already; on_load_checkpoint adds the teacher's entries to it
        return metadata


def shard_distill_module(module, mesh, shard_classes, *, teacher: str = "shard") -> None:
    """`fully_shard` the student, the teacher (unless replicated) and every other trainable submodule."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if any(isinstance(m, FSDPModule) for m in module.modules()):
        return  # a second fit of the same module: already sharded

    def shard_model(model):
        for block in [m for m in model.modules() if type(m) in shard_classes]:
            fully_shard(block, mesh=mesh, reshard_after_forward=True)
        fully_shard(model, mesh=mesh, reshard_after_forward=True)

    shard_model(module.student)
    if module.teacher is not None and teacher == "shard":
        shard_model(module.teacher)
    for name, child in module.named_children():
        if name not in ("student", "teacher") and any(p.requires_grad for p in child.parameters()):
            fully_shard(child, mesh=mesh, reshard_after_forward=True)
    log.info("FSDP2: %d groups over %d ranks (teacher %s)",
             sum(isinstance(m, FSDPModule) for m in module.modules()), mesh.size(), teacher)
