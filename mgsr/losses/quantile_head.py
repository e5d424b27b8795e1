"""DAC-KL's quantile heads (METHOD.md section 3): the band (l, u) per token, learnable (`f_sub`) or fixed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mgsr.losses.divergences import compute_dtype, to_log_probs

# Std of the learnable head's output weights at init: small (not zero), so (l, u) start near mid-range,
# yet every parameter gets a gradient from the first step (zero weights would block the first layer once).
OUTPUT_INIT_STD = 0.01


def _check_ranges(lower_range: tuple[float, float], upper_range: tuple[float, float]) -> None:
    lo0, lo1 = lower_range
    up0, up1 = upper_range
    if not 0.0 <= lo0 <= lo1 <= up0 <= up1 <= 1.0 or lo0 >= up1:
        raise ValueError(
            "quantile head ranges must satisfy 0 <= lower_range[0] <= lower_range[1] <= upper_range[0]"
            f" <= upper_range[1] <= 1, got lower_range={lower_range}, upper_range={upper_range}"
        )


class QuantileHead(nn.Module):
    """f_sub [ours]: per-token band quantiles (l, u) from the teacher's distribution shape.

    Features per token (detached): the teacher's top-k sorted probabilities (zero-padded when V < k) and
    its entropy in nats -> Linear(k+1, hidden) -> GELU -> Linear(hidden, 2) -> sigmoid, mapped to
    l in lower_range and u in upper_range. forward: [B, T, V] -> (lower [B, T], upper [B, T]).
    """

    def __init__(
        self,
        top_k: int = 32,
        hidden: int = 64,
        lower_range: tuple[float, float] = (0.0, 0.3),
        upper_range: tuple[float, float] = (0.7, 1.0),
    ) -> None:
        super().__init__()
        if top_k < 1 or hidden < 1:
            raise ValueError(f"quantile head needs top_k >= 1 and hidden >= 1, got {top_k}, {hidden}")
        _check_ranges(tuple(lower_range), tuple(upper_range))
        self.top_k = top_k
        self.lower_range = (float(lower_range[0]), float(lower_range[1]))
        self.upper_range = (float(upper_range[0]), float(upper_range[1]))
        self.net = nn.Sequential(nn.Linear(top_k + 1, hidden), nn.GELU(), nn.Linear(hidden, 2))
        nn.init.normal_(self.net[2].weight, std=OUTPUT_INIT_STD)  # see OUTPUT_INIT_STD
        nn.init.zeros_(self.net[2].bias)

    def features(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        """[B, T, V] -> [B, T, top_k + 1]: sorted top-k teacher probabilities and the entropy."""
        return self.features_from_log_probs(
            to_log_probs(teacher_logits.detach(), compute_dtype(teacher_logits, self.net[0].weight)))

    def features_from_log_probs(self, lp: torch.Tensor, top: torch.Tensor | None = None) -> torch.Tensor:
        """[..., V] teacher log-probs -> [..., top_k + 1]. top: the teacher's top log-probs in descending order
        ([..., >= top_k]) when the caller has them (the loss's top-k path), which saves a V-wide top-k."""
        p = lp.exp()
        k = min(self.top_k, p.shape[-1])
        top = p.topk(k, dim=-1).values if top is None or top.shape[-1] < k else top[..., :k].exp()
        top = F.pad(top, (0, self.top_k - k))
        entropy = -torch.special.xlogy(p, p).sum(-1, keepdim=True)  # 0 log 0 = 0; two V-wide passes
        return torch.cat([top, entropy], dim=-1).to(self.net[0].weight.dtype)

    def shares_log_probs_with(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> bool:
        """Whether the loss's teacher log-probs are in this head's compute dtype (then `from_rows` can read them)."""
        return compute_dtype(teacher_logits, self.net[0].weight) == compute_dtype(teacher_logits, student_logits)

    def from_rows(self, lp_rows: torch.Tensor, mask: torch.Tensor, top: torch.Tensor | None = None):
        """(lower, upper) [B, T] from the teacher log-probs of the masked tokens only ([n, V], mask [B, T]).

        The features of the other tokens are left at 0 (their quantiles are never read): the net still runs on
        all B x T rows, so the masked tokens' quantiles are bit-identical to `forward`'s.
        """
        feats = self.features_from_log_probs(lp_rows, top)
        full = feats.new_zeros(*mask.shape, feats.shape[-1])
        full[mask.bool()] = feats
        return self.quantiles(full)

    def quantiles(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[..., top_k + 1] features -> (lower, upper) [...]."""
        gates = torch.sigmoid(self.net(features))
        (lo0, lo1), (up0, up1) = self.lower_range, self.upper_range
        return lo0 + (lo1 - lo0) * gates[..., 0], up0 + (up1 - up0) * gates[..., 1]

    def forward(self, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.quantiles(self.features(teacher_logits))


class FixedQuantileHead(nn.Module):
    """Fixed-quantile variant (dac.head: fixed): constant (l, u) per token, no parameters."""

    def __init__(self, lower: float = 0.2, upper: float = 0.8) -> None:
        super().__init__()
        if not 0.0 <= lower < upper <= 1.0:
            raise ValueError(
                f"dac quantiles must satisfy 0 <= lower < upper <= 1, got lower={lower}, upper={upper}"
            )
        self.lower, self.upper = float(lower), float(upper)

    def forward(self, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T, V] -> (lower [B, T], upper [B, T]) filled with the constants."""
        kw = {"dtype": compute_dtype(teacher_logits), "device": teacher_logits.device}
        shape = teacher_logits.shape[:-1]
        return torch.full(shape, self.lower, **kw), torch.full(shape, self.upper, **kw)
