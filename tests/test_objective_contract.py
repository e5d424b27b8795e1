"""The `Objective` contract (mgsr/losses/objective.py): DistillModule calls every objective the same way, and adding an
objective is one class file + one YAML (shown in a copy of the tree, trained by `train.py` on the tiny budget)."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO, TINY, copy_of_the_tree
from omegaconf import OmegaConf
from transformers import GPT2Config, GPT2LMHeadModel

from mgsr.data.collate import Collator
from mgsr.losses.divergences import forward_kl, token_mean
from mgsr.losses.objective import LmBatch, Objective
from mgsr.module import DistillModule
from mgsr.objectives import DacKl, Divergence, MiniLlm, SpanCorrelation, Taid

VOCAB = 60


class _Tok:
    """Just what DistillModule reads from a tokenizer: 60 real tokens, EOS = PAD = 0."""

    pad_token_id = eos_token_id = 0

    def __len__(self):
        return VOCAB


def _gpt2(seed: int, layers: int = 1):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=layers, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def _features(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"prompt_ids": torch.randint(1, VOCAB, (3 + i % 3,), generator=g).tolist(),
             "response_ids": torch.randint(1, VOCAB, (2 + i % 4,), generator=g).tolist() + [0], "prompt": "",
             "references": []} for i in range(n)]


class Recorder(Objective):
    """Every hook of the contract, each recording what it was given."""

    group = "rec"

    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.0))
        self.lr, self.seen = lr, []

    def losses(self, ctx):
        B, R, V = ctx.student_logits.shape
        assert ctx.teacher_logits.shape == (B, R, V) and V == VOCAB and not ctx.teacher_logits.requires_grad
        assert ctx.mask.shape == ctx.response_ids.shape == (B, R) and ctx.mask.dtype == torch.bool
        assert ctx.batch["input_ids"].shape[0] == B and ctx.seqs is ctx.batch  # KD: the gold batch
        kl = token_mean(forward_kl(ctx.teacher_logits, ctx.student_logits), ctx.mask)
        self.seen.append(("losses", ctx.step))
        return self.scale * kl, {"kl": float(kl), "scale": float(self.scale.detach())}

    def after_step(self, ctx):
        self.seen.append(("after_step", ctx.step, ctx.total_steps, ctx.accumulate))

    def extra_batch(self, ctx):
        return LmBatch(ctx.batch["input_ids"], ctx.batch["attention_mask"], with_teacher=True)

    def extra_losses(self, lm):
        B, L1, V = lm.student_logits.shape
        assert lm.teacher_logits.shape == (B, L1, V) and lm.targets.shape == lm.mask.shape == (B, L1)
        self.seen.append(("extra", B, L1))
        return 0.0 * lm.student_logits.sum(), {"extra": 1.0}

    def param_groups(self):
        return [{"params": [self.scale], "weight_decay": 0.0, "lr": self.lr}]


def test_module_calls_every_hook_the_same_way():
    rec = Recorder()
    module = DistillModule(_gpt2(1), _Tok(), teacher=_gpt2(0, layers=2), sft_weight=0.5, distill=rec,
                           distill_weight=0.5, span_weight=0.0, val_generate=0)
    loader = torch.utils.data.DataLoader(_features(8), batch_size=2, shuffle=False, collate_fn=Collator(0))
    trainer = L.Trainer(accelerator="cpu", max_steps=2, accumulate_grad_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(module, train_dataloaders=loader)
    # per micro-batch: the losses, then the per-step hook (step, total steps, accumulation), then the extra batch
    assert [s[:2] for s in rec.seen[:3]] == [("losses", 0), ("after_step", 0), ("extra", 2)]
    assert [s for s in rec.seen if s[0] == "after_step"] == [("after_step", 0, 2, 2)] * 2 + [("after_step", 1, 2, 2)] * 2
    assert {"rec/loss", "rec/kl", "rec/scale", "rec/extra", "train/sft"} <= set(trainer.callback_metrics)
    groups = trainer.optimizers[0].param_groups
    assert [g["initial_lr"] for g in groups] == [5e-4, 5e-4, 0.05]  # the student's lr, the objective's own
    assert groups[2]["params"] == [rec.scale] and groups[2]["weight_decay"] == 0.0
    assert float(rec.scale) != 1.0  # trained with the student


def test_every_objective_is_an_objective_with_a_group():
    for cls in (DacKl, Divergence, Taid, MiniLlm, SpanCorrelation):
        assert issubclass(cls, Objective) and cls.group
    assert MiniLlm.rollout_logprobs and not DacKl.rollout_logprobs


@pytest.mark.parametrize(("yaml_name", "cls"), [("dac_kl", DacKl), ("taid", Taid), ("minillm", MiniLlm)])
def test_a_yaml_restates_its_class_defaults_exactly(yaml_name, cls):
    """Defaults are written in the constructor's signature; the YAML repeats them (so Hydra can override a key) and
    must agree, and `check` takes what a config leaves out from the signature too."""
    node = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "loss" / "distill" / f"{yaml_name}.yaml"))
    params = {k: v for k, v in node.items() if not k.startswith("_")}
    defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in cls.defaults().items()}
    assert params == defaults
    cls.check()  # the defaults are valid


def test_check_fills_what_a_config_leaves_out_from_the_signature():
    with pytest.raises(ValueError, match="got lower=0.9, upper=0.8"):  # upper: the signature's default
        DacKl.check(head="fixed", lower=0.9)
    with pytest.raises(ValueError, match="t_end=0.3"):  # against t_start's default 0.4
        Taid.check(t_end=0.3)
    with pytest.raises(ValueError, match="fkl has no parameter beta"):
        Divergence.check(beta=0.5)


# -- a new objective in a copy of the tree: one class file and one YAML --------------------------------------------
TOY = '''"""A test's objective: forward KL times a learnable scale with its own lr, a per-step counter, and an extra
language-modelling batch (the gold text) with its cross-entropy."""

import torch
import torch.nn.functional as F

from mgsr.losses.divergences import forward_kl, token_mean
from mgsr.losses.objective import LmBatch, Objective


class Toy(Objective):
    group = "toy"

    def __init__(self, weight: float = 1.0, lm_weight: float = 0.5, lr: float = 0.05):
        super().__init__()
        self.check(weight=weight, lm_weight=lm_weight, lr=lr)
        self.weight, self.lm_weight, self.lr = float(weight), float(lm_weight), float(lr)
        self.scale = torch.nn.Parameter(torch.tensor(1.0))
        self.register_buffer("steps", torch.tensor(0))

    @classmethod
    def check(cls, **params):
        p = {**cls.defaults(), **params}
        if float(p["weight"]) <= 0:
            raise ValueError(f"loss.distill.weight={p['weight']}: need > 0")

    def losses(self, ctx):
        kl = token_mean(forward_kl(ctx.teacher_logits, ctx.student_logits), ctx.mask)
        logs = {"kl": float(kl), "scale": float(self.scale.detach()), "steps": float(self.steps)}
        return self.weight * self.scale * kl, logs

    def after_step(self, ctx):
        self.steps += 1

    def extra_batch(self, ctx):
        return LmBatch(ctx.batch["input_ids"], ctx.batch["attention_mask"])

    def extra_losses(self, lm):
        logp = F.log_softmax(lm.student_logits.float(), dim=-1)
        ce = token_mean(-logp.gather(-1, lm.targets.unsqueeze(-1)).squeeze(-1), lm.mask)
        return self.lm_weight * ce, {"lm_ce": float(ce)}

    def param_groups(self):
        return [{"params": [self.scale], "weight_decay": 0.0, "lr": self.lr}]
'''

TOY_YAML = "# a test's objective (mgsr/losses/toy.py)\n_target_: mgsr.losses.toy.Toy\nweight: 1.0\nlm_weight: 0.5\nlr: 0.05\n"


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = copy_of_the_tree(tmp_path_factory)
    (root / "mgsr" / "losses" / "toy.py").write_text(TOY)
    (root / "conf" / "loss" / "distill" / "toy.yaml").write_text(TOY_YAML)
    return root


def _train(tree: Path, run: Path, cache_dir, *overrides) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    return subprocess.run([sys.executable, "train.py", *TINY, f"cache_dir={cache_dir}", f"hydra.run.dir={run}",
                           "eval.exposure_bias=false", *overrides], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=600)


def test_a_bad_parameter_of_the_new_objective_fails_before_anything_loads(tree, tmp_path):
    out = _train(tree, tmp_path / "run", tmp_path / "cache", "+experiment=baseline_kd", "loss/distill=toy",
                 "loss.distill.weight=-1")
    assert out.returncode == 2 and out.stderr.strip().splitlines() == ["error: loss.distill.weight=-1: need > 0"]
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow  # a real train.py run on the tiny budget (~1 min)
def test_a_new_objective_trains_with_every_hook(tree, tmp_path, cache_dir):
    out = _train(tree, tmp_path / "run", cache_dir, "+experiment=baseline_kd", "loss/distill=toy")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "run" / "csv" / "metrics.csv")))

    def logged(key):
        return [float(r[key]) for r in rows if r.get(key)]

    assert logged("toy/steps") == [0.0, 1.0, 2.0]  # per-step state, stepped after each step's losses
    assert all(math.isfinite(v) and v >= 0 for v in logged("toy/kl") + logged("toy/lm_ce")) and logged("toy/lm_ce")
    scale = logged("toy/scale")
    assert scale[0] == 1.0 and scale[-1] != 1.0  # its parameter group trains (with its own lr)
