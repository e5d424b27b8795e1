"""Loss functions: pure tensor math on aligned teacher/student logits (see METHOD.md sections 1, 3-5)."""

from mgsr.losses.common import log_probs, masked_mean
from mgsr.losses.dac_kl import DacKlOutput, FixedQuantileHead, QuantileHead, dac_kl_loss
from mgsr.losses.divergences import (
    DIVERGENCES,
    adaptive_kl,
    align_vocab,
    divergence_loss,
    forward_kl,
    js_divergence,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    symmetric_kl,
    total_variation,
)
from mgsr.losses.sft import sft_loss
from mgsr.losses.span import SpanOutput, span_correlation_loss

__all__ = [
    "DIVERGENCES",
    "DacKlOutput",
    "FixedQuantileHead",
    "QuantileHead",
    "SpanOutput",
    "adaptive_kl",
    "align_vocab",
    "dac_kl_loss",
    "divergence_loss",
    "forward_kl",
    "js_divergence",
    "log_probs",
    "masked_mean",
    "reverse_kl",
    "sft_loss",
    "skew_forward_kl",
    "skew_reverse_kl",
    "span_correlation_loss",
    "symmetric_kl",
    "total_variation",
]
