"""Per-token divergences between the teacher `p` and the student `q` (METHOD.md section 5).

Every divergence takes aligned logits `teacher_logits`, `student_logits` [B, T, V] and returns the
per-token value [B, T], summed over V. The teacher is a constant (detached here, so callers that forgot
to detach still get a student-only gradient). Math runs in float32, or in float64 when an input is
float64 (the gradcheck path); bf16 inputs are upcast.

Numerics: every `a * log(a / b)` term uses the convention 0 * log 0 = 0 *in value and in gradient*
(`weighted_log_ratio`), so -inf logits (masked vocabulary columns) give finite results, never NaN.
Mixtures `log(w p + (1 - w) q)` are formed with a log-sum-exp of log-probs, not by adding probabilities.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch

from mgsr.losses.common import log_probs, masked_mean

# --------------------------------------------------------------------------- numerical helpers (shared)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64 (so gradcheck can run), float32 otherwise."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def to_log_probs(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Log-softmax over the last dim in `dtype` (float32 goes through the shared `log_probs`)."""
    if dtype == torch.float32:
        return log_probs(logits)
    return torch.log_softmax(logits.to(dtype), dim=-1)


def teacher_student_log_probs(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log q) in the compute dtype; the teacher is detached."""
    dtype = compute_dtype(teacher_logits, student_logits)
    return to_log_probs(teacher_logits.detach(), dtype), to_log_probs(student_logits, dtype)


def weighted_log_ratio(weight: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Elementwise `weight * (log_a - log_b)`, exactly 0 where `weight == 0`.

    The difference is masked *before* the product, so a -inf - (-inf) = NaN never reaches the value or
    the gradient (the classic `torch.where` NaN-gradient trap). Where weight > 0 and log_b = -inf the
    result is +inf, which is the true value.
    """
    live = weight > 0
    diff = torch.where(live, log_a - log_b, torch.zeros_like(log_a))
    return weight * diff


def safe_log(x: torch.Tensor) -> torch.Tensor:
    """log(x) for x >= 0 with log(0) = -inf and a zero (not NaN/inf) gradient at 0."""
    pos = x > 0
    return torch.where(pos, torch.log(torch.where(pos, x, torch.ones_like(x))), torch.full_like(x, -math.inf))


def safe_logsumexp(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """logsumexp over `dim` that returns -inf for an all -inf slice with a zero gradient.

    `torch.logsumexp` back-propagates exp(x - out) = exp(-inf + inf) = NaN there, which poisons the
    whole batch even when the caller multiplies the result by 0.
    """
    shift = x.detach().amax(dim=dim, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    total = (x - shift).exp().sum(dim=dim)
    return safe_log(total) + shift.squeeze(dim)


def log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight: float) -> torch.Tensor:
    """log(weight * a + (1 - weight) * b) from log-probs, stable for weight in [0, 1] (ends included)."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"mixture weight must lie in [0, 1], got {weight}")
    log_w = math.log(weight) if weight > 0 else -math.inf
    log_1w = math.log1p(-weight) if weight < 1 else -math.inf
    return safe_logsumexp(torch.stack([log_a + log_w, log_b + log_1w]), dim=0)


def kl_from_log_probs(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum_v a_v (log a_v - log b_v), per row [..., V] -> [...], with 0 log 0 = 0."""
    return weighted_log_ratio(log_a.exp(), log_a, log_b).sum(-1)


def token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`masked_mean` after zeroing masked-out entries, so garbage (inf/NaN) there cannot leak in."""
    mask = mask.bool()
    return masked_mean(torch.where(mask, values, torch.zeros_like(values)), mask)


# --------------------------------------------------------------------------- the registry

# name -> per-token divergence [B, T, V] x [B, T, V] -> [B, T]. The one list every user of a divergence reads: the
# distillation loss (mgsr.objectives.Divergence), SCRG's error ranking (scrg.divergence) and config validation.
DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {}


def register_divergence(name: str):
    """Decorator: make `fn(teacher_logits, student_logits, **params) -> [B, T]` available as `name` (with a YAML
    in conf/loss/distill/ it is then `loss/distill=<name>` and `scrg.divergence=<name>`)."""
    def add(fn):
        if name in DIVERGENCES:
            raise ValueError(f"divergence {name!r} is registered twice ({DIVERGENCES[name].__name__}, {fn.__name__})")
        DIVERGENCES[name] = fn
        return fn
    return add


def divergence_params(name: str) -> dict[str, object]:
    """The keyword parameters of a registered divergence and their defaults (e.g. jsd: {"beta": 0.5})."""
    sig = inspect.signature(DIVERGENCES[name])
    return {k: p.default for k, p in list(sig.parameters.items())[2:]}


def check_divergence(name: str, params: dict | None = None, *, where: str = "loss.distill") -> None:
    """ValueError naming what to change when `name` is not registered or `params` are not its parameters."""
    if name not in DIVERGENCES:
        raise ValueError(f"{where}.name={name!r}: unknown divergence; choose one of {', '.join(sorted(DIVERGENCES))}")
    allowed = divergence_params(name)
    unknown = sorted(set(params or {}) - set(allowed))
    if unknown:
        takes = ", ".join(allowed) or "no parameters"
        raise ValueError(f"{where}: {name} has no parameter {', '.join(unknown)} (it takes: {takes})")


# --------------------------------------------------------------------------- divergences, [B,T,V] -> [B,T]


@register_divergence("fkl")
def forward_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """FKL = KL(p || q) = sum_v p_v (log p_v - log q_v). Returns [B, T]."""
    lp, lq = teacher_student_log_probs(teacher_logits, student_logits)
    return kl_from_log_probs(lp, lq)


@register_divergence("rkl")
def reverse_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """RKL = KL(q || p) = sum_v q_v (log q_v - log p_v). Returns [B, T]."""
    lp, lq = teacher_student_log_probs(teacher_logits, student_logits)
    return kl_from_log_probs(lq, lp)


@register_divergence("skl")
def symmetric_kl(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, lam: float = 0.9
) -> torch.Tensor:
    """SKL = (1 - lam) KL(p || q) + lam KL(q || p) (DistiLLM's lam = 0.9). Returns [B, T]."""
    lp, lq = teacher_student_log_probs(teacher_logits, student_logits)
    return (1.0 - lam) * kl_from_log_probs(lp, lq) + lam * kl_from_log_probs(lq, lp)


@register_divergence("jsd")
def js_divergence(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, beta: float = 0.5
) -> torch.Tensor:
    """Generalised JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q (GKD).

    beta in [0, 1]; both ends are exactly 0 (m equals the distribution that carries weight) and finite.
    Note trl's GKD code instead *defines* beta=0/1 as FKL/RKL; use "fkl"/"rkl" for those. Returns [B, T].
    """
    lp, lq = teacher_student_log_probs(teacher_logits, student_logits)
    lm = log_mixture(lp, lq, beta)
    out = torch.zeros(lp.shape[:-1], dtype=lp.dtype, device=lp.device)
    # Skipping a zero-weight term avoids 0 * inf when the other distribution has -inf where this has mass.
    if beta > 0:
        out = out + beta * kl_from_log_probs(lp, lm)
    if beta < 1:
        out = out + (1.0 - beta) * kl_from_log_probs(lq, lm)
    return out


@register_divergence("tvd")
def total_variation(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """TVD = 0.5 sum_v |p_v - q_v|. Returns [B, T]."""
    lp, lq = teacher_student_log_probs(teacher_logits, student_logits)
    return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)


@register_divergence("sfkl")
def skew_forward_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """Skew FKL(alpha) = KL(p || alpha p + (1 - alpha) q) (DistiLLM, alpha = 0.1). alpha=0 is FKL. [B, T]."""
    lp, lq = teacher_student_log_probs(teacher_logits, student_logits)
    return kl_from_log_probs(lp, log_mixture(lp, lq, alpha))


@register_divergence("srkl")
def skew_reverse_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """Skew RKL(alpha) = KL(q || alpha q + (1 - alpha) p) (DistiLLM, alpha = 0.1). alpha=0 is RKL. [B, T]."""
    lp, lq = teacher_student_log_probs(teacher_logits, student_logits)
    return kl_from_log_probs(lq, log_mixture(lq, lp, alpha))


@register_divergence("akl")
def adaptive_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mu: float = 0.5) -> torch.Tensor:
    """AKL (Wu et al. 2024, arXiv 2404.02657) = w_head * FKL + w_tail * RKL. Returns [B, T].

    Sort p descending; the head is the top-1 class plus every class whose inclusive cumulative teacher
    mass is <= mu, the tail is the rest (the split of the authors' code). g_head / g_tail = sum |p_v - q_v|
    over each part; w_head = g_head / (g_head + g_tail), w_tail = g_tail / (g_head + g_tail), detached
    (when p == q both gaps vanish and so do both KLs, so the 0/0 is resolved to weight 0).
    """
    lp, lq = teacher_student_log_probs(teacher_logits, student_logits)
    p_sorted, order = lp.exp().sort(dim=-1, descending=True, stable=True)
    q_sorted = lq.detach().exp().gather(-1, order)
    gap = (p_sorted - q_sorted).abs()
    head = p_sorted.cumsum(-1) <= mu
    head[..., 0] = True
    g_head = torch.where(head, gap, torch.zeros_like(gap)).sum(-1)
    g_tail = torch.where(head, torch.zeros_like(gap), gap).sum(-1)
    denom = (g_head + g_tail).clamp_min(torch.finfo(gap.dtype).tiny)
    return (g_head / denom) * kl_from_log_probs(lp, lq) + (g_tail / denom) * kl_from_log_probs(lq, lp)



@register_divergence("ab")
def alpha_beta_divergence(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, alpha: float = 0.2, beta: float = 0.7
) -> torch.Tensor:
    """The alpha-beta divergence D_AB^(alpha, beta)(p || q) of ABKD (Wang et al., ICML 2025), summed over V. [B, T].

    General case (alpha, beta, alpha + beta all != 0; ABKD's definition, from Cichocki, Cruces & Amari 2011):
        D = -1 / (alpha beta) sum_v [ p^alpha q^beta - alpha/(alpha+beta) p^(alpha+beta) - beta/(alpha+beta) q^(alpha+beta) ]
    Limits (the continuous extension, derived by a first-order expansion in the vanishing parameter):
        beta = 0:          (1/alpha^2) sum_v [ p^alpha log(p^alpha / q^alpha) - p^alpha + q^alpha ]
        alpha = 0:         (1/beta^2)  sum_v [ q^beta log(q^beta / p^beta) - q^beta + p^beta ]
        alpha + beta = 0:  (1/alpha^2) sum_v [ (p/q)^alpha - 1 - log((p/q)^alpha) ]
        alpha = beta = 0:  (1/2) sum_v (log p - log q)^2
    so (1, 0) is FKL = KL(p||q) and (0, 1) is RKL = KL(q||p), as the paper states, and alpha + beta = 1 is
    Amari's alpha-divergence (1 - sum p^alpha q^(1-alpha)) / (alpha (1 - alpha)). The official code
    (ghwang-s/abkd, distillation_llm/distillm/losses.py, `ab_div`) scales the three one-parameter limits by 1/alpha
    (1/beta) instead of 1/alpha^2 (1/beta^2); that agrees at |alpha| = 1 (|beta| = 1), i.e. at FKL and RKL, but
    is not the limit of its own general case elsewhere. Here every case is the limit, so D is continuous.

    Defaults alpha = 0.2, beta = 0.7: the instruction-following (Dolly, GPT-2 XL teacher) setting of the authors'
    GPT-2 scripts (scripts/gpt2/ab/train_0.3B_1.5B.sh, train_0.7B_1.5B.sh: alpha = 0.2, alpha + beta = 0.9);
    their OpenLLaMA-2 script uses alpha = 0.1, beta = 0.8.

    Entries where both p and q are 0 (masked vocabulary columns) contribute exactly 0, value and gradient; any
    real alpha, beta is accepted (a negative power of a zero probability the other side does not share is +inf,
    the true value). A parameter (or alpha + beta) with |x| < 1e-6 is taken as 0, i.e. as its limit: that close
    the general formula is all cancellation. For alpha, beta > 0 the general case is evaluated as
    p^s / (alpha beta) * [(beta/s) expm1(s d) - expm1(beta d)],  s = alpha + beta, d = log q - log p <= 0
    (and the mirror image, factoring q^s, where q > p): exactly 0 when p == q, no cancellation of O(1) terms.
    """
    a, b = _snap_zero(alpha), _snap_zero(beta)
    if a != 0 and b != 0 and _snap_zero(a + b) == 0:
        b = -a
    lp, lq = teacher_student_log_probs(teacher_logits, student_logits)
    dead = torch.isneginf(lp) & torch.isneginf(lq)
    zero = torch.zeros_like(lq)
    lp, lq = torch.where(dead, zero, lp), torch.where(dead, zero, lq)  # finite there: every term below is 0 there
    if a == 0 and b == 0:
        term = 0.5 * (lp - lq) ** 2
    elif b == 0:
        pa, qa = (a * lp).exp(), (a * lq).exp()
        term = (a * weighted_log_ratio(pa, lp, lq) - pa + qa) / a**2
    elif a == 0:
        qb, pb = (b * lq).exp(), (b * lp).exp()
        term = (b * weighted_log_ratio(qb, lq, lp) - qb + pb) / b**2
    elif a + b == 0:
        x = a * (lp - lq)
        term = (torch.expm1(x) - x) / a**2
    elif a > 0 and b > 0:
        s = a + b
        p_big = lp >= lq
        d_p = torch.where(p_big, lq - lp, zero)  # <= 0 where used, 0 elsewhere: both branches stay finite
        d_q = torch.where(p_big, zero, lp - lq)
        from_p = (s * lp).exp() * ((b / s) * torch.expm1(s * d_p) - torch.expm1(b * d_p))
        from_q = (s * lq).exp() * ((a / s) * torch.expm1(s * d_q) - torch.expm1(a * d_q))
        term = torch.where(p_big, from_p, from_q) / (a * b)
    else:
        s = a + b
        term = -((a * lp + b * lq).exp() - (a / s) * (s * lp).exp() - (b / s) * (s * lq).exp()) / (a * b)
    return torch.where(dead, zero, term).sum(-1)


def _snap_zero(x: float, tol: float = 1e-6) -> float:
    """float(x), or 0.0 when |x| < tol (alpha-beta parameters that close to 0 mean the limit case)."""
    x = float(x)
    return 0.0 if abs(x) < tol else x


def divergence_loss(
    name: str,
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    mask: torch.Tensor,
    **params: float,
) -> torch.Tensor:
    """Mean over masked tokens of `DIVERGENCES[name](teacher_logits, student_logits, **params)`.

    teacher/student logits [B, T, V], mask [B, T] bool. Returns a 0-dim tensor; an empty mask gives 0.
    """
    check_divergence(name, params)
    return token_mean(DIVERGENCES[name](teacher_logits, student_logits, **params), mask)


def align_vocab(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncate both [..., V_model] logits to the first `vocab_size` columns (the shared tokenizer length).

    Models often pad their output matrix past the tokenizer (e.g. to a multiple of 64); those padding
    rows are never real tokens and differ between teacher and student.
    """
    widths = (teacher_logits.shape[-1], student_logits.shape[-1])
    if vocab_size < 1 or vocab_size > min(widths):
        raise ValueError(f"vocab_size={vocab_size} must be in [1, {min(widths)}] for logits widths {widths}")
    return teacher_logits[..., :vocab_size], student_logits[..., :vocab_size]
