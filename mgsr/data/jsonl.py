"""Loading the real instruction sets (Dolly, SelfInst, Vicuna, S-NI, U-NI subset) from MiniLLM-format JSONL.

Each row has `prompt` (or `instruction` [+ `input`], from which the prompt is built) and `output`, a string
or a list of reference strings. Malformed rows are skipped, counted per reason, and summarised in one
warning: never silently dropped.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field

from mgsr.data.prompt import build_prompt

log = logging.getLogger(__name__)


@dataclass
class LoadResult:
    """Valid records (normalised by `normalise_record`) and skipped-row counts keyed by reason."""

    records: list[dict]
    skipped: dict[str, int] = field(default_factory=dict)


def normalise_record(row: object) -> tuple[dict | None, str | None]:
    """Validate one row; return ``(record, None)`` or ``(None, reason)``.

    The record is a copy of the row with `prompt` filled in (built from `instruction`/`input` when absent)
    and `references`: the output as a non-empty list of strings. Reasons: "not_an_object",
    "missing_field", "bad_prompt", "bad_input", "bad_output", "empty_output".
    """
    if not isinstance(row, dict):
        return None, "not_an_object"
    prompt = row.get("prompt")
    if prompt is None:
        instruction = row.get("instruction")
        if instruction is None:
            return None, "missing_field"
        inp = row.get("input") or ""
        if not isinstance(instruction, str) or not instruction.strip():
            return None, "bad_prompt"
        if not isinstance(inp, str):
            return None, "bad_input"
        prompt = build_prompt(instruction, inp)
    if not isinstance(prompt, str) or not prompt.strip():
        return None, "bad_prompt"
    if "output" not in row or row["output"] is None:
        return None, "missing_field"
    output = row["output"]
    if isinstance(output, str):
        references = [output]
    elif isinstance(output, list) and all(isinstance(o, str) for o in output):
        references = list(output)
    else:
        return None, "bad_output"
    # a list keeps its non-empty references; an all-empty output cannot be scored or trained on
    references = [r for r in references if r.strip()]
    if not references:
        return None, "empty_output"
    return {**row, "prompt": prompt, "references": references}, None


def load_jsonl_records(path: str, *, max_records: int | None = None) -> LoadResult:
    """Read a MiniLLM-format JSONL file into normalised records (see `normalise_record`).

    Blank lines are ignored; undecodable lines count as "invalid_json". `max_records` keeps the first
    that many valid records. Raises FileNotFoundError for a missing path and ValueError when no row is valid.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"data file not found: {path} — set data.path (or the eval set's path) to an existing JSONL file"
        )
    records: list[dict] = []
    skipped: Counter[str] = Counter()
    with open(path, encoding="utf-8") as f:
        for line in f:
            if max_records is not None and len(records) >= max_records:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                skipped["invalid_json"] += 1
                continue
            record, reason = normalise_record(row)
            if record is None:
                skipped[reason] += 1
            else:
                records.append(record)
    counts = dict(sorted(skipped.items()))
    if not records:
        raise ValueError(f"no usable records in {path}: skipped {counts if counts else 'nothing (file is empty)'}")
    if counts:
        log.warning("%s: kept %d records, skipped %d malformed rows %s", path, len(records), sum(counts.values()),
                    counts)
    return LoadResult(records=records, skipped=counts)
