"""Language-modelling text for MiniLLM's pre-training loss (their `--lm-data-dir`, OpenWebText chunks): a JSONL
file, one object a line with a `text` field (else `prompt` + `output`, or `instruction` + `input` + `output`).

Each text is tokenised once, EOS appended, cut to `max_len` tokens. Batch i of size b is rows (i b + j) mod N,
j < b, in file order: a function of the step alone, so a resume continues exactly without any state.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _text(row: dict) -> str | None:
    if isinstance(row.get("text"), str):
        return row["text"]
    if isinstance(row.get("output"), str):
        head = row.get("prompt") or " ".join(str(row.get(k) or "") for k in ("instruction", "input")).strip()
        return f"{head} {row['output']}".strip()
    return None


class LmText:
    def __init__(self, path: str, tokenizer, *, max_len: int = 512):
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"loss.distill.lm_data={path}: no such file")
        self.rows: list[list[int]] = []
        for line in p.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                text = _text(json.loads(line))
            except (json.JSONDecodeError, AttributeError):
                continue
            if not text:
                continue
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            self.rows.append(ids[:max_len])
        if not self.rows:
            raise ValueError(f"loss.distill.lm_data={path}: no usable texts")

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, step: int, size: int, *, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) [size, L], right-padded with `pad_id`."""
        rows = [self.rows[(step * size + j) % len(self.rows)] for j in range(size)]
        width = max(len(r) for r in rows)
        ids = torch.full((size, width), pad_id, dtype=torch.long)
        attn = torch.zeros((size, width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            attn[i, :len(r)] = 1
        return ids, attn
