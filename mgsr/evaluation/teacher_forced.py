"""Deterministic held-out metrics: the student on clean reference responses, teacher-forced [ours].

Sampled ROUGE-L carries the noise of its prompts and decoding seeds; these carry none (no sampling), so a paired
difference of them over training seeds measures training alone. On each record's first reference response
y (EOS included), with p = teacher and q = student:

    NLL = - sum_t log q(y_t | x, y_<t) / sum_t 1          (nats per response token)
    FKL =   sum_t KL(p(. | x, y_<t) || q(. | x, y_<t)) / sum_t 1

both averaged over every response token of the split (a token-weighted mean). Lower is better for both.
"""

from __future__ import annotations

import torch

from mgsr.data.collate import encode_records, pad_rows
from mgsr.generation import response_logits
from mgsr.losses.divergences import align_vocab, forward_kl
from mgsr.models import shared_vocab_size


@torch.no_grad()
def teacher_forced_metrics(student, teacher, tokenizer, records: list[dict], *, batch_size: int = 32,
                           max_prompt_len: int = 256, max_len: int = 512) -> dict:
    """{"nll", "fkl", "tokens", "records"} of `student` on `records` (dicts with "prompt" and "output" or
    "references"; records whose prompt is too long are left out, as in the sampled evaluation). `teacher` may be
    None: then "fkl" is None. Both models must sit on one device; their train/eval modes are restored."""
    was = student.training, (teacher.training if teacher is not None else None)
    student.eval()
    if teacher is not None:
        teacher.eval()
    device = next(student.parameters()).device
    vocab = shared_vocab_size(tokenizer, *(m for m in (teacher, student) if m is not None))
    features = [f for f in encode_records(tokenizer, records, max_prompt_len=max_prompt_len, max_len=max_len,
                                          train=True) if f is not None]
    nll_sum, fkl_sum, n_tok = 0.0, 0.0, 0
    try:
        for start in range(0, len(features), batch_size):
            rows = [(torch.tensor(f["prompt_ids"]), torch.tensor(f["response_ids"]))
                    for f in features[start:start + batch_size]]
            seqs = pad_rows(rows, pad_id=tokenizer.pad_token_id, device=device)
            P = seqs["prompt_len"]
            mask = seqs["response_mask"][:, P:]                      # [B, R]
            targets = seqs["input_ids"][:, P:]                       # [B, R]
            s_logits = response_logits(student, seqs).float()[..., :vocab]   # [B, R, V]
            logq = torch.log_softmax(s_logits, dim=-1)
            nll = -logq.gather(-1, targets.clamp_max(vocab - 1).unsqueeze(-1)).squeeze(-1)
            nll_sum += float(nll[mask].sum())
            n_tok += int(mask.sum())
            if teacher is not None:
                t_logits, s_aligned = align_vocab(response_logits(teacher, seqs).float(), s_logits, vocab)
                fkl_sum += float(forward_kl(t_logits, s_aligned)[mask].sum())
    finally:
        student.train(was[0])
        if teacher is not None:
            teacher.train(was[1])
    n = max(n_tok, 1)
    return {"nll": nll_sum / n, "fkl": fkl_sum / n if teacher is not None else None, "tokens": n_tok,
            "records": len(features)}
