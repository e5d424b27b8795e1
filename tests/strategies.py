"""Hypothesis strategies shared by the loss tests."""

import math

import torch
from hypothesis import strategies as st


@st.composite
def extreme_pair(draw: st.DrawFn, vocab: int = 5, positions: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher, student) [1, positions, vocab] logits from the nasty cases: values up to ±1e4, ties, one-hot,
    -inf columns (in both models, never the whole row), in float32 or bf16."""

    def row(kind: str) -> list[float]:
        if kind == "random":
            return draw(st.lists(st.floats(-1e4, 1e4), min_size=vocab, max_size=vocab))
        if kind == "equal":
            return [draw(st.floats(-1e4, 1e4))] * vocab
        hot = draw(st.integers(0, vocab - 1))
        return [1e4 if v == hot else -1e4 for v in range(vocab)]

    kinds = st.sampled_from(["random", "equal", "onehot"])
    t = torch.tensor([[row(draw(kinds)) for _ in range(positions)]])
    s = torch.tensor([[row(draw(kinds)) for _ in range(positions)]])
    if draw(st.booleans()):
        cols = draw(st.lists(st.integers(0, vocab - 2), max_size=2, unique=True))
        t[..., cols] = -math.inf
        s[..., cols] = -math.inf
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    return t.to(dtype), s.to(dtype)
