"""MiniLLM (Gu et al., ICLR 2024) as pure tensor math: the policy gradient of the sequence-level reverse KL with its
single-step decomposition, teacher-mixed importance weights, length-normalised long-term rewards, PPO ratio
clipping, and the language-modelling (pre-training) loss. Follows microsoft/LMOps `minillm/minillm/losses.py`
(`_get_advantages_and_returns`, `_pg_loss`, `_reg_loss`, `pt_loss`) and `sampler.py` (rewards, `w`).

Shapes: B rows, R response columns, V vocabulary. Every per-token tensor is [B, R], aligned with the response
columns of the canonical layout (column t = response token t); `mask` [B, R] bool marks the real tokens. Logits
[B, R, V] at column t predict response token t (`mgsr.generation.response_logits`).

Notation: p the teacher, q_theta the student being trained, q_old the student when the rollout was sampled,
p_mix = a p + (1 - a) q_old the distribution the tokens were drawn from (teacher-mixed sampling).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mgsr.losses.divergences import token_mean


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tokens]: [B, R, V], [B, R] -> [B, R] (float32 or the logits' wider dtype)."""
    logp = F.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=-1)
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def single_step_rkl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """The single-step part, exact over the vocabulary: KL(q_theta || p) = sum_v q_theta(v) [log q_theta(v) - log p(v)]
    per position, [B, R, V] x2 -> [B, R]. Differentiable in the student logits (their `_reg_loss`: x-entropy minus
    entropy). Zero-probability teacher entries where q_theta > 0 are clamped (finite, never inf)."""
    s = student_logits.float() if student_logits.dtype in (torch.float16, torch.bfloat16) else student_logits
    t = teacher_logits.to(s.dtype)
    log_q, log_p = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    log_p = log_p.clamp_min(torch.finfo(log_p.dtype).min / 4)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def token_rewards(teacher_logprob: torch.Tensor, old_logprob: torch.Tensor, mask: torch.Tensor, *,
                  scaling: float | None = 0.5, clip: float | None = 100.0) -> torch.Tensor:
    """r_t = (log p(y_t | .) - log q_old(y_t | .)) / scaling, clipped to [-clip, clip], 0 off the mask; [B, R].

    As their sampler: `rewards = t_rewards + ent_rewards` (teacher log-prob + the entropy reward -log q at sampling
    time), `/ reward_scaling` (0.5), `clip(-cliprange_reward, cliprange_reward)` (100). No gradient."""
    r = (teacher_logprob - old_logprob).detach()
    if scaling is not None:
        r = r / scaling
    if clip:
        r = r.clamp(-clip, clip)
    return torch.where(mask.bool(), r, torch.zeros_like(r))


def future_returns(rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 0.95, length_norm: bool = True,
                   include_current: bool = True) -> torch.Tensor:
    """Long-term returns [B, R]: R_t = sum_{t' >= t} gamma^(t' - t) r_t' (their `_get_advantages_and_returns`; with
    `include_current=False`
    R_{t+1} = sum_{t' > t} gamma^(t' - t - 1) r_t', the paper's long-term part of eq. 5). `length_norm`: divided by
    the number of summed (unmasked) tokens, floored at 1 (their `lens`; they always divide). 0 off the mask."""
    m = mask.to(rewards.dtype)
    r = rewards * m
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0]) if r.shape[1] else None
    for t in reversed(range(r.shape[1])):
        if include_current:
            running = r[:, t] + gamma * running
            out[:, t] = running
        else:
            out[:, t] = running
            running = r[:, t] + gamma * running
    if length_norm:
        remaining = m.flip(-1).cumsum(-1).flip(-1)  # valid tokens at columns >= t
        if not include_current:
            remaining = remaining - m
        out = out / remaining.clamp_min(1)
    return out * m


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with the mean and the unbiased variance over the masked entries (their `whiten`
    takes every entry, padding included); 0 off the mask. One valid entry: variance 0."""
    m = mask.bool()
    n = m.sum()
    x = torch.where(m, values, torch.zeros_like(values))
    mean = x.sum() / n.clamp_min(1)
    var = (torch.where(m, values - mean, torch.zeros_like(values)) ** 2).sum() / (n - 1).clamp_min(1)
    return torch.where(m, (values - mean) * torch.rsqrt(var + eps), torch.zeros_like(values))


def importance_weights(old_logprob: torch.Tensor, mix_logprob: torch.Tensor, mask: torch.Tensor, *,
                       clip: float | None = None) -> torch.Tensor:
    """w_t = q_old(y_t) / p_mix(y_t) (their sampler: `exp(logprobs - mix_logprobs)`, the single-step approximation of
    the paper's product), optionally capped at `clip`; 1 off the mask. Their code has no cap of its own: w multiplies
    the PPO ratio, whose clip then bounds it (`clipped_surrogate`). No gradient."""
    w = (old_logprob - mix_logprob).detach().exp()
    if clip is not None:
        w = w.clamp(max=clip)
    return torch.where(mask.bool(), w, torch.ones_like(w))


def clipped_surrogate(logprob: torch.Tensor, old_logprob: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, weights: torch.Tensor | None = None, *, clip: float = 0.2) -> torch.Tensor:
    """PPO's clipped objective as their `_pg_loss`: ratio = exp(log q_theta - log q_old) * w,
    loss = token mean of max(-A ratio, -A clip(ratio, 1 - clip, 1 + clip)); scalar, gradient through `logprob`."""
    m = mask.bool()
    log_ratio = torch.where(m, logprob - old_logprob.detach(), torch.zeros_like(logprob))
    ratio = log_ratio.exp()
    if weights is not None:
        ratio = ratio * weights.detach()
    adv = advantages.detach()
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip, 1.0 + clip))
    return token_mean(loss, m)


def lm_loss(student_logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
            teacher_logits: torch.Tensor | None = None, *, kd_ratio: float | None = 0.5) -> tuple:
    """Their `pt_loss` on language-modelling text: (1 - kd_ratio) CE(targets) + kd_ratio (-sum_v p log q_theta), token
    means over `mask`; kd_ratio None / no teacher: the CE alone. Logits [B, L, V] predict targets [B, L].
    Returns (loss, ce, distil) (the last two detached floats' tensors)."""
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    ce = token_mean(-log_q.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1), mask)
    if teacher_logits is None or kd_ratio is None:
        return ce, ce.detach(), torch.zeros_like(ce)
    p = F.softmax(teacher_logits.float(), dim=-1)
    distil = token_mean(-(p * log_q).sum(-1), mask)
    return (1.0 - kd_ratio) * ce + kd_ratio * distil, ce.detach(), distil.detach()


@dataclass
class MiniLlmOut:
    loss: torch.Tensor       # pg + single-step term (if on)
    pg: torch.Tensor         # the clipped surrogate (long-term part)
    single_step: torch.Tensor  # token mean of the exact per-step reverse KL
    reward: torch.Tensor     # mean per-sequence discounted return of r (their `reward` stat)
    ratio: torch.Tensor      # token mean of q_theta / q_old
    clip_frac: torch.Tensor  # share of tokens whose ratio * w is outside [1 - clip, 1 + clip]
    weight: torch.Tensor     # token mean of w


def minillm_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, tokens: torch.Tensor,
                 mask: torch.Tensor, old_logprob: torch.Tensor, mix_logprob: torch.Tensor | None = None, *,
                 gamma: float = 0.95, length_norm: bool = True, include_current: bool = True, whitening: bool = True,
                 reward_scaling: float | None = 0.5, reward_clip: float | None = 100.0, clip: float = 0.2,
                 weight_clip: float | None = None, single_step: bool = True) -> MiniLlmOut:
    """The MiniLLM RL loss of one rollout batch (their `ppo_loss`):

        r_t = (log p(y_t) - log q_old(y_t)) / scaling            token rewards (teacher log-prob + entropy reward)
        A_t = whiten(sum_{t'>=t} gamma^(t'-t) r_t' / #tokens>=t)  length-normalised long-term return
        L   = mean_t max(-A_t rho_t, -A_t clip(rho_t)) + mean_t KL(q_theta(.|y_<t) || p(.|y_<t))
        rho_t = q_theta(y_t) / q_old(y_t) * w_t,   w_t = q_old(y_t) / p_mix(y_t)

    tokens [B, R] the sampled response; old_logprob / mix_logprob [B, R] recorded at sampling (mix None: student
    sampling, w = 1)."""
    m = mask.bool()
    with torch.no_grad():
        t_logprob = gather_logprobs(teacher_logits, tokens)
        rewards = token_rewards(t_logprob, old_logprob, m, scaling=reward_scaling, clip=reward_clip)
        adv = future_returns(rewards, m, gamma=gamma, length_norm=length_norm, include_current=include_current)
        if whitening:
            adv = whiten(adv, m)
        w = importance_weights(old_logprob, mix_logprob, m, clip=weight_clip) if mix_logprob is not None else \
            torch.ones_like(old_logprob)
        seq_return = future_returns(rewards, m, gamma=gamma, length_norm=False)[:, 0] if rewards.shape[1] else \
            rewards.new_zeros(rewards.shape[0])
    logprob = gather_logprobs(student_logits, tokens)
    pg = clipped_surrogate(logprob, old_logprob, adv, m, w, clip=clip)
    ss = token_mean(single_step_rkl(teacher_logits, student_logits), m)
    loss = pg + ss if single_step else pg
    with torch.no_grad():
        ratio = torch.where(m, (logprob - old_logprob).exp(), torch.ones_like(logprob))
        rw = ratio * w
        clipped = ((rw < 1 - clip) | (rw > 1 + clip)) & m
        n = m.sum().clamp_min(1)
        stats = dict(reward=seq_return.mean(), ratio=(ratio * m).sum() / n, clip_frac=clipped.sum() / n,
                     weight=(w * m).sum() / n)
    return MiniLlmOut(loss=loss, pg=pg, single_step=ss, **stats)
