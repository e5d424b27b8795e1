"""The module's generators: one sampling generator per device, saved and restored per device (issue 14.7), and the
training steps' own RNG stream that leaves the global generators to the caller between steps (issue 14.10)."""

from __future__ import annotations

import random
import types

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from mgsr.generation import SamplingConfig
from mgsr.module import DistillModule
from mgsr.rng import DeviceGenerators, StepRngStream
from mgsr.scrg import ScrgConfig

EOS, PAD = 1, 0


def _gpt(seed):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=30, n_positions=64, n_embd=16, n_layer=1, n_head=2,
                                      bos_token_id=EOS, eos_token_id=EOS)).eval()


def _module(seed=0):
    tok = types.SimpleNamespace(pad_token_id=PAD, eos_token_id=EOS)
    # plain student rollouts (no teacher, rounds 0): drawn from the sampling generator of the module's device
    return DistillModule(_gpt(0), tok, seed=seed, train_sampling=SamplingConfig(max_new_tokens=8),
                         scrg=ScrgConfig(rounds=0))


def _draw(gen, n=4):
    return torch.randint(0, 1000, (n,), generator=gen, device=gen.device).tolist()


def _roundtrip(module, seed=0):
    ckpt = {"state_dict": {}}
    module.on_save_checkpoint(ckpt)
    fresh = _module(seed)
    fresh.on_load_checkpoint(ckpt)
    return fresh, ckpt


def test_fake_device_move_keeps_each_devices_stream_and_checkpoints_them(monkeypatch):
    # A second "device" on CPU: its generators are CPU generators, but it has its own key and stream.
    module = _module(seed=5)
    monkeypatch.setattr(module.sample_gens, "factory", lambda device: torch.Generator())
    cpu_ref = torch.Generator().manual_seed(5)
    assert _draw(module.sample_gen) == _draw(cpu_ref)
    module._device = torch.device("cuda", 0)  # what .to("cuda") would set
    other = _draw(module.sample_gen)
    assert other == _draw(torch.Generator().manual_seed(5))  # first use on a device: seeded, not a copy of cpu
    module._device = torch.device("cpu")
    assert _draw(module.sample_gen) == _draw(cpu_ref)  # back on cpu: carried on, not re-seeded
    fresh, ckpt = _roundtrip(module, seed=5)
    assert set(ckpt["rng"]["sample_gens"]) == {"cpu", "cuda:0"}
    monkeypatch.setattr(fresh.sample_gens, "factory", lambda device: torch.Generator())
    assert _draw(fresh.sample_gen) == _draw(cpu_ref)  # each device's state restored for that device
    fresh._device = torch.device("cuda", 0)
    assert _draw(fresh.sample_gen) == _draw(module.sample_gens.get("cuda:0"))


def test_old_single_state_checkpoints_still_load():
    gens = DeviceGenerators(0)
    state = torch.Generator().manual_seed(9).get_state()
    gens.load_state_dict(state)  # a pre-issue-14 checkpoint: one CPU state under "sample_gen"
    assert _draw(gens.get("cpu")) == _draw(torch.Generator().manual_seed(9))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_resume_restores_the_sampling_generator_of_the_device(device):
    # Before issue 14 a CUDA generator's 16-byte state was restored into a CPU generator: resume crashed.
    module = _module(seed=3).to(device)
    prompts = torch.tensor([[5, 6, 7], [8, 9, 10]], device=device)
    batch = {"prompt_ids": prompts, "prompt_attention_mask": torch.ones_like(prompts), "input_ids": prompts}
    module.make_student_sequences(batch)
    assert module.sample_gen.device.type == device
    ckpt = {"state_dict": {}}
    module.on_save_checkpoint(ckpt)
    expect = module.make_student_sequences(batch)["input_ids"]
    fresh = _module(seed=3)
    fresh.on_load_checkpoint(ckpt)  # loaded on CPU, moved afterwards (either order must work)
    fresh.to(device)
    assert torch.equal(fresh.make_student_sequences(batch)["input_ids"], expect)


def test_step_stream_gives_the_global_rng_back_between_steps():
    stream = StepRngStream()
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    stream.enter()
    a = torch.rand(3)
    stream.exit()
    # between steps the caller's generators are where they were before the step
    assert torch.equal(torch.rand(3), a)
    outside = (torch.get_rng_state(), random.getstate())
    stream.enter()
    b = (torch.rand(3), random.random(), np.random.rand())
    stream.exit()
    assert torch.equal(torch.get_rng_state(), outside[0]) and random.getstate() == outside[1]
    # the stream continues from the end of the first step whatever ran in between
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    torch.rand(3)
    ref = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(b[0], ref[0]) and b[1:] == ref[1:]


def test_step_stream_is_checkpointed_and_the_global_rng_is_not_touched_on_load():
    module = _module()
    torch.manual_seed(1)
    module.on_train_batch_start(None, 0)
    torch.rand(5)  # what a training step draws (dropout)
    module.on_train_batch_end(None, None, 0)
    ckpt = {"state_dict": {}}
    module.on_save_checkpoint(ckpt)
    fresh = _module()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    fresh.on_load_checkpoint(ckpt)
    assert torch.equal(torch.get_rng_state(), before)  # loading does not overwrite the caller's generator
    draws = []
    for m, outside_seed in ((module, 7), (fresh, 8)):  # whatever the global state before the step
        torch.manual_seed(outside_seed)
        m.on_train_batch_start(None, 1)
        draws.append(torch.rand(4))
        m.on_train_batch_end(None, None, 1)
    assert torch.equal(draws[0], draws[1])  # both steps continue the saved stream
