"""The module's random streams: per-device sampling generators and the training steps' own RNG stream, both
checkpointed so that a resumed run draws exactly what the uninterrupted run drew."""

from __future__ import annotations

import random

import numpy as np
import torch

_CPU_STATE_BYTES = torch.Generator().get_state().numel()


def _device_key(device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


class DeviceGenerators:
    """The module's sampling generators, one per device, each seeded with `seed` on its first use there.

    A generator's state only fits a generator of its own device type (a CUDA state is 16 bytes, a CPU one
    5056), so moving the module between devices switches generators instead of converting one: each device's
    stream continues where it was. `state_dict` holds every device's state; after `load_state_dict` each is
    restored when that device is next used (the module may be moved after loading).
    `factory(device)` builds a generator (tests pass one to fake a device move on CPU).
    """

    def __init__(self, seed: int, factory=torch.Generator):
        self.seed, self.factory = seed, factory
        self._gens: dict[str, torch.Generator] = {}
        self._pending: dict[str, torch.Tensor] = {}

    def get(self, device) -> torch.Generator:
        key = _device_key(device)
        gen = self._gens.get(key)
        if gen is None:
            gen = self.factory(torch.device(key))
            gen.manual_seed(self.seed)
            if key in self._pending:
                gen.set_state(self._pending.pop(key))
            self._gens[key] = gen
        return gen

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self._pending, **{k: g.get_state() for k, g in self._gens.items()}}

    def load_state_dict(self, states) -> None:
        if torch.is_tensor(states):  # checkpoints before per-device generators: one state, device by its size
            states = {"cpu" if states.numel() == _CPU_STATE_BYTES else "cuda:0": states}
        self._gens, self._pending = {}, dict(states)


class StepRngStream:
    """The training steps' own RNG stream (torch CPU, python `random`, numpy), owned by the module.

    Dropout and other library code draw from the global generators, so during a step (`enter` .. `exit`)
    the stream is installed there; after it the caller's states are put back. Whatever runs between steps
    (validation, a DataLoader iterator drawing its seed) then neither moves the training stream nor is moved
    by it, and a run resumed from a step checkpoint draws exactly what the uninterrupted run drew. The first
    step starts from the global states as they are (after `seed_everything`).
    """

    def __init__(self):
        self.state = None      # (torch, python, numpy) states after the last step; None before the first
        self._outside = None   # the caller's states while a step runs

    @staticmethod
    def _capture():
        return torch.get_rng_state(), random.getstate(), np.random.get_state()

    @staticmethod
    def _install(state):
        torch.set_rng_state(state[0])
        random.setstate(state[1])
        np.random.set_state(state[2])

    def enter(self) -> None:
        self._outside = self._capture()
        if self.state is not None:
            self._install(self.state)

    def exit(self) -> None:
        self.state = self._capture()
        if self._outside is not None:
            self._install(self._outside)
            self._outside = None

    def current(self):
        """The stream's state now: the live global states inside a step, the saved ones between steps."""
        return self._capture() if self._outside is not None or self.state is None else self.state

    def state_dict(self) -> dict:
        # numpy's state goes in as a tensor so the checkpoint loads with torch.load(weights_only=True)
        t, py, (kind, keys, pos, has_gauss, cached) = self.current()
        return {"torch": t, "python": py, "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                     cached]}

    def load_state_dict(self, state: dict) -> None:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        self.state = (state["torch"], state["python"], (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
