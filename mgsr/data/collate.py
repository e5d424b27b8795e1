"""Record -> token ids, and features -> the canonical batch layout.

Canonical layout (shared by data, generation, SCRG, losses and the module), for B rows, prompt width P
and response width R:

    input_ids       [B, P+R] long  columns [0, P): prompt LEFT-padded; [P, P+R): response RIGHT-padded
    attention_mask  [B, P+R] long  1 on real tokens, 0 on padding
    response_mask   [B, P+R] bool  True exactly on response tokens (EOS included)
    prompt_len      int P          every response starts at column P
    prompt_ids, prompt_attention_mask  [B, P]  the prompt part alone
    prompts         list[str]      the prompt strings
    references      list[list[str]]  acceptable answers (ROUGE-L takes the max over them)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _references(record: dict) -> list[str]:
    refs = record.get("references")
    if refs is None:
        out = record.get("output")
        refs = [] if out is None else ([out] if isinstance(out, str) else list(out))
    return list(refs)


def _assemble(prompt: str, refs: list[str], prompt_ids: list[int], full_ids: list[int] | None, eos_id: int, *,
              max_prompt_len: int, max_len: int, train: bool) -> dict | None:
    if len(prompt_ids) > max_prompt_len:
        return None
    if full_ids is not None:
        response_ids = full_ids[len(prompt_ids):] + [eos_id]
    elif train:
        raise ValueError(f"training record has no output: {prompt[:80]!r}")
    else:
        response_ids = []
    response_ids = response_ids[: max(max_len - len(prompt_ids), 0)]
    return {"prompt_ids": prompt_ids, "response_ids": response_ids, "prompt": prompt, "references": refs}


def encode_record(tokenizer, record: dict, *, max_prompt_len: int = 256, max_len: int = 512,
                  train: bool = True) -> dict | None:
    """Tokenise one normalised record (`prompt`, `references` or `output`) into a feature dict
    ``{"prompt_ids", "response_ids", "prompt", "references"}``.

    Following MiniLLM: ``prompt_ids = ids(prompt)`` and
    ``response_ids = ids(prompt + output)[len(prompt_ids):] + [eos]`` (no special tokens otherwise), so the
    response tokens are exactly those the model sees after the prompt in the joint text. The output is the
    first reference (a synthetic train record holds a single sampled answer).

    Returns None when the prompt is longer than `max_prompt_len` tokens (the caller counts it as
    "prompt_too_long"; MiniLLM drops these rather than truncating). Otherwise the response, EOS included,
    is cut to ``max_len - len(prompt_ids)`` tokens: a truncated response therefore has no EOS, as in
    MiniLLM's ``[:max_length]`` cut of prompt + response + EOS.

    `train=False` (evaluation) tolerates a record without any reference (empty response ids); with a
    reference it still encodes the gold response so a validation loss can be computed.
    """
    return encode_records(tokenizer, [record], max_prompt_len=max_prompt_len, max_len=max_len, train=train)[0]


def encode_records(
    tokenizer,
    records: Sequence[dict],
    *,
    max_prompt_len: int = 256,
    max_len: int = 512,
    train: bool = True,
) -> list[dict | None]:
    """`encode_record` over many records with two batched tokenizer calls (same result, much faster)."""
    if not records:
        return []
    refs = [_references(r) for r in records]
    prompts = [r["prompt"] for r in records]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    with_ref = [i for i, rs in enumerate(refs) if rs]
    joint = tokenizer([prompts[i] + refs[i][0] for i in with_ref], add_special_tokens=False)["input_ids"] \
        if with_ref else []
    full_ids: list[list[int] | None] = [None] * len(records)
    for i, ids in zip(with_ref, joint):
        full_ids[i] = ids
    return [
        _assemble(prompts[i], refs[i], prompt_ids[i], full_ids[i], tokenizer.eos_token_id,
                  max_prompt_len=max_prompt_len, max_len=max_len, train=train)
        for i in range(len(records))
    ]


class Collator:
    """Stack feature dicts from `encode_record` into the canonical batch (see the module docstring)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: Sequence[dict]) -> dict:
        b = len(features)
        p = max(len(f["prompt_ids"]) for f in features)
        r = max(len(f["response_ids"]) for f in features)
        input_ids = torch.full((b, p + r), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((b, p + r), dtype=torch.long)
        response_mask = torch.zeros((b, p + r), dtype=torch.bool)
        for i, f in enumerate(features):
            n_p, n_r = len(f["prompt_ids"]), len(f["response_ids"])
            input_ids[i, p - n_p : p] = torch.tensor(f["prompt_ids"], dtype=torch.long)
            attention_mask[i, p - n_p : p] = 1
            if n_r:
                input_ids[i, p : p + n_r] = torch.tensor(f["response_ids"], dtype=torch.long)
                attention_mask[i, p : p + n_r] = 1
                response_mask[i, p : p + n_r] = True
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "response_mask": response_mask,
            "prompt_len": p,
            "prompt_ids": input_ids[:, :p].clone(),
            "prompt_attention_mask": attention_mask[:, :p].clone(),
            "prompts": [f["prompt"] for f in features],
            "references": [list(f["references"]) for f in features],
        }


def pad_rows(rows: list[tuple[torch.Tensor, torch.Tensor]], *, pad_id: int, device=None) -> dict:
    """(prompt, response) id pairs -> canonical layout (prompt left-padded, response right-padded)."""
    P = max(len(p) for p, _ in rows)
    R = max(max(len(r) for _, r in rows), 1)
    B = len(rows)
    ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + R), dtype=torch.long)
    resp_mask = torch.zeros((B, P + R), dtype=torch.bool)
    for b, (p, r) in enumerate(rows):
        ids[b, P - len(p):P], attn[b, P - len(p):P] = p, 1
        ids[b, P:P + len(r)], attn[b, P:P + len(r)], resp_mask[b, P:P + len(r)] = r, 1, True
    out = {"input_ids": ids, "attention_mask": attn, "response_mask": resp_mask, "prompt_len": P,
           "prompt_ids": ids[:, :P], "prompt_attention_mask": attn[:, :P]}
    if device is not None:
        out = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in out.items()}
    return out

