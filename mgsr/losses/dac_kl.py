"""DAC-KL: distribution-adaptive clipping KL (METHOD.md section 3), the public entry point.

The formulas, and the reference formulation that defines the values, are in dac_kl_reference.py.
`dac_kl_loss` computes that loss; for the default band="mass", remainder="merge" it routes the masked tokens
to the custom autograd Functions of dac_kl_fast.py (hand-written backward passes, reused buffers):

* hard mask (fixed head): the top-k Function with a cap (`TOPK_CAP`) plus the exact tail masses, for the
  tokens whose top `TOPK_CAP` classes reach the band's upper quantile (exact there); it is used when at
  least half of the tokens qualify (splitting a batch between paths copies rows). Other tokens take the
  full-sort path.
* soft mask (learnable head): the soft top-k Function (`SOFT_TOPK_CAP` head classes exact, the tail's cumulative
  masses from a log-p histogram, within float32 tolerance of the full sort, not bit-identical) for the tokens
  whose head reaches u and whose error bound is within `SOFT_TAIL_TOL`; the rest take the full-sort Function.
* tokens whose fast value is not finite or whose remainder mass is below sqrt(float tiny) (masked -inf
  vocabulary columns, extreme logits) are recomputed with the reference formulation (log-space sums,
  guarded 0 log 0), so values and gradients match it wherever the fast path is not exact.
The other bands / remainders use the reference formulation directly.
The quantile heads (`QuantileHead`, `FixedQuantileHead`) are in quantile_head.py, re-exported here.
`shared_teacher_rows` computes the teacher's log-softmax (and the soft path's top-k) on the masked tokens once,
for the learnable head's features and the loss (`dac_kl_loss(..., teacher=)`; `DacKl` in objectives.py wires it).
"""

from __future__ import annotations

import functools

import torch

from mgsr.losses import dac_kl_fast as fast
from mgsr.losses.dac_kl_reference import (
    BANDS,
    DEFAULT_KAPPA,
    REMAINDERS,
    DacKlOutput,
    TeacherRows,
    check_options,
    masked_token_loss,
    reference_row_terms,
    teacher_rows,
)
from mgsr.losses.divergences import compute_dtype, to_log_probs
from mgsr.losses.quantile_head import FixedQuantileHead, QuantileHead

__all__ = [
    "BANDS", "REMAINDERS", "TOPK_CAP", "TOPK_MIN_ROW_SHARE", "DacKlOutput", "FixedQuantileHead", "QuantileHead",
    "TeacherRows", "dac_kl_loss", "shared_teacher_rows",
]

# Classes sorted exactly by the hard-mask top-k path; the rest only enter through their summed mass.
TOPK_CAP = 256
# Share of the masked tokens that must qualify for the top-k path before it is used: splitting a batch
# between paths copies rows, worth it only when most rows can take the cheap one.
TOPK_MIN_ROW_SHARE = 0.5
# Soft mask (learnable head), `TopkSoftMassMerge`: the top SOFT_TOPK_CAP classes exactly, the tail through a
# histogram of SOFT_BUCKETS buckets of SOFT_BUCKET_WIDTH nats of log p below the cap's last class.
SOFT_TOPK_CAP = 256
SOFT_BUCKETS = 8192
SOFT_BUCKET_WIDTH = 1.0 / 512
# Rows need kappa (C_K - l) >= this (sigmoid(kappa (c_v - l)) is 1 in float32 in the tail; the tail's l-gradient
# is below kappa e^-20) and C_K >= u (the hard band, hence `kept`, lies in the head).
SOFT_TAIL_MIN_A = 20.0
# A row keeps the soft top-k value when the worst-case bound of the tail estimate's error (on its u-gradient
# per unit loss weight; 1/kappa of it on its KL) is at most this; the rest take the full-sort path.
SOFT_TAIL_TOL = 1e-2
# Vocabularies below this keep the full sort for the soft mask: there it costs little next to the forward KL, and
# the soft top-k path (within float32 tolerance, not bit-identical) would change small runs for no gain; the
# embedded default (1,768 tokens) therefore trains exactly as before. Real vocabularies (50k, 152k) take it.
SOFT_TOPK_MIN_VOCAB = 8192


def soft_topk_applies(vocab: int, hard: bool) -> bool:
    """Whether the soft mask's top-k path is tried at this vocabulary size (see SOFT_TOPK_MIN_VOCAB)."""
    return not hard and vocab >= SOFT_TOPK_MIN_VOCAB and vocab > SOFT_TOPK_CAP + 1


def soft_top(teacher: TeacherRows):
    """The teacher rows' stable top-`SOFT_TOPK_CAP`, computed once (the learnable head's features read it too)."""
    if teacher.top is None:
        teacher.top = fast.stable_topk(teacher.log_probs, SOFT_TOPK_CAP)
    return teacher.top


def shared_teacher_rows(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor, *,
                        band: str = "mass", remainder: str = "merge", hard: bool = False, **_) -> TeacherRows:
    """The masked teacher rows for `dac_kl_loss(..., teacher=)` and `QuantileHead.from_rows`: one log-softmax of
    the teacher, and the soft top-k path's top classes computed up front where that path will be tried."""
    teacher = teacher_rows(teacher_logits, mask, compute_dtype(teacher_logits, student_logits))
    n, vocab = teacher.logits.shape
    if n and band == "mass" and remainder == "merge" and soft_topk_applies(vocab, hard):
        soft_top(teacher)
    return teacher


def _mass_merge_rows(teacher: TeacherRows, s, lower, upper, dtype, *, kappa, hard, target_class):
    """Per-row (kl, coverage, kept) for the teacher rows and student logits rows [n, V] (band=mass,
    remainder=merge).

    Routing: hard mask -> top-k path where exact; the rest -> full-sort path; tokens either flags -> the
    reference formulation.
    """
    t, lp = teacher.logits, teacher.log_probs
    n, V = t.shape
    out = [torch.zeros(n, dtype=dtype, device=t.device) for _ in range(3)]
    todo = torch.ones(n, dtype=torch.bool, device=t.device)

    def run(mask, fn):
        """fn(rows or None) on the rows where `mask` holds; stores its values, returns its 'bad' flags there."""
        nonlocal out
        rows = None if bool(mask.all()) else mask.nonzero().squeeze(-1)
        *values, bad = fn(rows)
        if rows is None:
            out = list(values)
            return bad.clone()
        out = [x.index_put((rows,), v) for x, v in zip(out, values)]
        flags = torch.zeros_like(mask)
        flags[rows] = bad
        return flags

    def rows_of(rows, *xs):
        return xs if rows is None else tuple(x.index_select(0, rows) for x in xs)

    if hard and V > TOPK_CAP + 1:
        head_lp, head_idx, clean = fast.stable_topk(lp, TOPK_CAP)
        ok = clean & (head_lp.exp().cumsum(-1)[:, -1] >= upper.detach().to(dtype))
        if int(ok.sum()) >= TOPK_MIN_ROW_SHARE * n:  # see TOPK_MIN_ROW_SHARE
            # lp is consumed by this path: later paths recompute the log-probs of their rows
            todo = ~ok | run(ok, lambda rows: fast.TopkHardMassMerge.apply(
                *rows_of(rows, s, lp, head_lp, head_idx, lower, upper), target_class))
            lp = None
    if soft_topk_applies(V, hard):
        head_lp, head_idx, clean = soft_top(teacher)
        c_k = head_lp.exp().cumsum(-1)[:, -1]
        ok = clean & (c_k >= upper.detach().to(dtype)) & (kappa * (c_k - lower.detach().to(dtype)) >= SOFT_TAIL_MIN_A)
        if int(ok.sum()) >= TOPK_MIN_ROW_SHARE * n:  # see TOPK_MIN_ROW_SHARE
            todo = ~ok | run(ok, lambda rows: fast.TopkSoftMassMerge.apply(
                *rows_of(rows, s, lp, head_lp, head_idx, lower, upper), kappa, target_class, SOFT_BUCKETS,
                SOFT_BUCKET_WIDTH, SOFT_TAIL_TOL))
            lp = None
    if bool(todo.any()):
        def sorted_path(rows):
            lp_r = lp if lp is not None and rows is None else to_log_probs(rows_of(rows, t)[0], dtype)
            lo_r, up_r = rows_of(rows, lower, upper)
            return fast.SortedMassMerge.apply(*rows_of(rows, s), lp_r, lo_r, up_r, kappa, hard, target_class)

        todo = run(todo, sorted_path)
        lp = None
    if bool(todo.any()):
        def reference(rows):
            (t_r,) = rows_of(rows, t)
            terms = reference_row_terms(band="mass", remainder="merge", kappa=kappa, hard=hard,
                                        target_class=target_class)(
                TeacherRows(t_r, to_log_probs(t_r, dtype)), *rows_of(rows, s, lower, upper), dtype)
            return (*terms, torch.zeros_like(terms[2], dtype=torch.bool))

        run(todo, reference)
    return tuple(out)


def dac_kl_loss(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    mask: torch.Tensor,
    lower: torch.Tensor | float,
    upper: torch.Tensor | float,
    *,
    kappa: float = DEFAULT_KAPPA,
    remainder: str = "merge",
    band: str = "mass",
    target_class: bool = True,
    beta: float = 1.0,
    hard: bool = False,
    teacher: TeacherRows | None = None,
) -> DacKlOutput:
    """DAC-KL loss (formulas: dac_kl_reference.py; fast path: the module docstring).

    teacher_logits, student_logits: [B, T, V]; mask: [B, T] bool (response tokens);
    lower, upper: quantiles broadcastable to [B, T] (per-token from `QuantileHead`, or scalars).
    kappa: soft-mask sharpness; hard=True uses the 0/1 mask (no gradient to lower/upper).
    band: "mass" (cumulative-mass band, [ours]) | "logprob" (band on log-prob values) | "off" (no band).
    target_class: keep k* = argmax p as its own entry (True) or treat it like any other class (False).
    remainder: "merge" (clipped classes form one entry, [ours]) | "drop" (renormalise the kept entries;
        with band="off" only the target is kept, so drop gives KL = 0 by construction).
    beta: weight of the coverage term, which depends only on the teacher and m, so it moves only l/u.
    teacher: `shared_teacher_rows(teacher_logits, student_logits, mask, ...)` when the caller (the learnable
        head) has read the teacher's log-probs already; the loss may overwrite them.
    Reduction: mean over masked tokens; an empty mask gives loss 0. Masked-out tokens are never computed.
    """
    check_options(band, remainder, target_class)
    if band == "mass" and remainder == "merge":
        terms = functools.partial(_mass_merge_rows, kappa=kappa, hard=hard, target_class=target_class)
    else:
        terms = reference_row_terms(band=band, remainder=remainder, kappa=kappa, hard=hard,
                                    target_class=target_class)
    return masked_token_loss(teacher_logits, student_logits, mask, lower, upper, beta=beta, row_terms=terms,
                             teacher=teacher)
