"""SFT loss: golden value against a python loop, masking, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from mgsr.losses import sft_loss


def _ref(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> float:
    total, count = 0.0, 0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if not mask[b, t]:
                continue
            row = logits[b, t].double().tolist()
            log_z = math.log(sum(math.exp(x) for x in row))
            total += log_z - row[int(targets[b, t])]
            count += 1
    return total / count


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 5, generator=g) * 2
    targets = torch.randint(0, 5, (2, 3), generator=g)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    return logits, targets, mask


def test_golden_against_loop() -> None:
    logits, targets, mask = _inputs()
    got = sft_loss(logits, targets, mask)
    assert got.shape == () and got.dtype == torch.float32
    assert got.item() == pytest.approx(_ref(logits, targets, mask), rel=1e-6)


def test_hand_computed_uniform() -> None:
    # uniform over 4 classes: -log(1/4) = log 4 whatever the target
    loss = sft_loss(torch.zeros(1, 1, 4), torch.tensor([[2]]), torch.tensor([[True]]))
    assert loss.item() == pytest.approx(math.log(4), rel=1e-6)


def test_matches_torch_cross_entropy() -> None:
    logits, targets, mask = _inputs(1)
    ref = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
    torch.testing.assert_close(sft_loss(logits, targets, mask), ref)


def test_masked_positions_ignored() -> None:
    logits, targets, mask = _inputs(2)
    base = sft_loss(logits, targets, mask)
    logits2, targets2 = logits.clone(), targets.clone()
    logits2[~mask] = float("nan")
    targets2[~mask] = -100  # the usual ignore index must not crash the gather
    assert sft_loss(logits2, targets2, mask).item() == base.item()
    assert sft_loss(logits, targets, torch.zeros_like(mask)).item() == 0.0


def test_gradient_and_bf16() -> None:
    logits, targets, mask = _inputs(3)
    x = logits.to(torch.bfloat16).requires_grad_()
    loss = sft_loss(x, targets, mask)
    assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad is not None and x.grad.float().abs().sum() > 0
    assert (x.grad[~mask] == 0).all()


def test_gradcheck_float64() -> None:
    logits, targets, mask = _inputs(4)
    x = logits.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: sft_loss(z, targets, mask), (x,))
