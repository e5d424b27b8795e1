"""Exposure bias as MiniLLM measures it (ExAccErr, METHOD.md 7), with the teacher as the oracle.

On dev prompts, sample one response with the STUDENT (prefixes y^s) and one with the TEACHER (y^t), using
the training sampler (temperature 1, top_k 0, top_p 1, no n-gram ban) and a fixed seed (10). On every
prefix of each response, one teacher and one student forward give the per-step error

    KL_t = KL(p(. | x, y_<=t) || q(. | x, y_<=t))      p = teacher, q = student, t = 1..L

i.e. the prediction after t generated tokens, as MiniLLM's table (its logits start at the first generated
token): the prediction from the prompt alone is the same on both prefixes and is left out, as there.

`mgsr.evaluation.metrics.exposure_bias` turns the two [N, L] tables into
R(l) (student prefixes), eps(l) (teacher prefixes) and ExAccErr(l) = (R(l) - eps(l)) / eps(l) x 100%.
A positive value: the student's own prefixes lead it further from the teacher than the teacher's do.
"""

from __future__ import annotations

import math

import torch

from mgsr.data.collate import pad_rows
from mgsr.evaluation.metrics import exposure_bias
from mgsr.evaluation.run import encode_prompts
from mgsr.generation import SamplingConfig, generate, response_logits
from mgsr.losses.divergences import align_vocab, forward_kl
from mgsr.models import shared_vocab_size


@torch.no_grad()
def prefix_kl(teacher, student, seqs: dict, vocab_size: int) -> torch.Tensor:
    """Per-step KL(p || q) [B, R] on the responses of canonical-layout `seqs`, NaN past each response's end
    (so padding never enters a mean). Math in float32."""
    P = seqs["prompt_len"]
    t_logits, s_logits = align_vocab(response_logits(teacher, seqs).float(),
                                     response_logits(student, seqs).float(), vocab_size)
    kl = forward_kl(t_logits, s_logits)
    return kl.masked_fill(~seqs["response_mask"][:, P:], math.nan)


def _pad_nan(rows: list[torch.Tensor]) -> torch.Tensor:
    width = max((r.shape[1] for r in rows), default=0)
    return torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1]), value=math.nan) for r in rows], 0)


@torch.no_grad()
def measure_exposure_bias(teacher, student, tokenizer, records: list[dict], *, n_prompts: int = 1000, seed: int = 10,
                          max_new_tokens: int = 256, batch_size: int = 16, max_prompt_len: int = 256,
                          at: int = 15) -> dict:
    """ExAccErr of `student` against `teacher` on the first `n_prompts` of `records` (dicts with "prompt").

    Returns {"at": at, "exacc_err": ExAccErr(at) in %, "curve": [ExAccErr(l)], "R": [R(l)], "eps": [eps(l)],
    "n_prompts": prompts used}. Both models are put in eval mode and must sit on the same device.
    """
    was = teacher.training, student.training
    teacher.eval(), student.eval()
    device = next(student.parameters()).device
    vocab = shared_vocab_size(tokenizer, teacher, student)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0, top_k=0, top_p=1.0)
    prompt_ids, _, _ = encode_prompts(tokenizer, records[:n_prompts], max_prompt_len)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))  # less padding per batch
    # One generator per sampler, so either table is reproducible on its own.
    gens = {"student": torch.Generator(device).manual_seed(seed), "teacher": torch.Generator(device).manual_seed(seed)}
    tables: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = pad_rows([(prompt_ids[i], torch.empty(0, dtype=torch.long)) for i in idx],
                             pad_id=tokenizer.pad_token_id, device=device)
            for who, model in (("student", student), ("teacher", teacher)):
                seqs = generate(model, batch["prompt_ids"], batch["prompt_attention_mask"], sampling,
                                eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, generator=gens[who])
                # column 0 predicts from the prompt alone: no generated prefix yet, so not in MiniLLM's table
                tables[who].append(prefix_kl(teacher, student, seqs, vocab)[:, 1:].cpu())
    finally:
        teacher.train(was[0]), student.train(was[1])
    if not prompt_ids:
        return {"at": at, "exacc_err": math.nan, "curve": [], "R": [], "eps": [], "n_prompts": 0}
    res = exposure_bias(_pad_nan(tables["student"]), _pad_nan(tables["teacher"]), at=at)
    return {"at": at, "exacc_err": res["at_15"], "curve": res["curve"], "R": res["R"], "eps": res["eps"],
            "n_prompts": len(prompt_ids)}
