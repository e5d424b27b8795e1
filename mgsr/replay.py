"""Replay buffer of distillation sequences (SCRG between triggers; DistiLLM's off-policy re-use).

Stores one example per entry as CPU tensors (prompt ids and response ids, unpadded), so examples from
batches of different widths mix freely; `sample` re-pads them into the canonical layout.
"""

from __future__ import annotations

import logging
import random

import torch

from mgsr.data.collate import pad_rows

log = logging.getLogger(__name__)


class ReplayBuffer:
    def __init__(self, capacity: int = 256, seed: int = 0):
        if capacity <= 0:
            raise ValueError(f"replay buffer capacity must be > 0, got {capacity}")
        self.capacity = capacity
        self.items: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._next = 0  # ring position once full
        self._rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, seqs: dict) -> None:
        """Split a canonical-layout batch into rows and store them (oldest overwritten first)."""
        P = seqs["prompt_len"]
        for b in range(seqs["input_ids"].shape[0]):
            prompt = seqs["input_ids"][b, :P][seqs["attention_mask"][b, :P].bool()].cpu()
            resp = seqs["input_ids"][b, P:][seqs["response_mask"][b, P:]].cpu()
            if len(self.items) < self.capacity:
                self.items.append((prompt, resp))
            else:
                self.items[self._next] = (prompt, resp)
                self._next = (self._next + 1) % self.capacity

    def sample(self, n: int, *, pad_id: int, device=None) -> dict:
        if not self.items:
            raise RuntimeError("replay buffer is empty: sample only after the first add")
        rows = [self.items[self._rng.randrange(len(self.items))] for _ in range(n)]
        return pad_rows(rows, pad_id=pad_id, device=device)

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "items": self.items, "next": self._next, "rng": self._rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the contents; the capacity stays the configured one. A checkpoint written with another
        capacity keeps its newest entries that fit, with a warning (the config decides, not the checkpoint)."""
        items, nxt = list(state["items"]), state["next"]
        if state["capacity"] != self.capacity:
            oldest_first = items[nxt:] + items[:nxt] if len(items) == state["capacity"] else items
            dropped = max(len(oldest_first) - self.capacity, 0)
            log.warning("replay buffer: the checkpoint's capacity is %d, the config's (scrg.buffer_capacity) %d; "
                        "using %d%s", state["capacity"], self.capacity, self.capacity,
                        f" and dropping the {dropped} oldest entries" if dropped else "")
            items, nxt = oldest_first[dropped:], 0
        self.items, self._next = items, nxt
        self._rng.setstate(state["rng"])
