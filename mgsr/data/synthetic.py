"""The embedded default task: a procedurally generated instruction-following dataset.

Nine task families, each with several natural-language phrasings, built from small word tables so
the whole set uses a few hundred distinct words and a 2-4 layer GPT-2 of ~1-3M parameters learns it
in minutes on a CPU. Some families have one right answer (arithmetic, list operations, morphology,
yes/no facts, sentence rewriting); others accept several answers (naming an item of a category,
describing an animal or object, summarising or titling a short text, writing a short story). For those,
a training record carries ONE reference drawn at random per record, so a prompt that recurs in train
appears with different answers and a teacher fitted to it is multi-modal; val/test records carry the
full list of references (ROUGE-L is the max over references).

The word tables are in synthetic_words.py, the per-family generators in synthetic_families.py; this file
holds the prompt template, the splits, the label noise and the tokenizer corpus.

Everything is a pure function of `seed` (``random.Random`` only, no set iteration order involved).
Each distinct prompt string is assigned to exactly one split by a seeded hash, so the splits never share
a prompt; val/test prompts are also distinct within their split.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Iterator

from mgsr.data.synthetic_families import FAMILIES

# Part of every cache key built on this data: bump it whenever a change here, in synthetic_words.py or in
# synthetic_families.py changes any generated record.
SYNTHETIC_VERSION = 2

# The Alpaca template's section markers without its boilerplate sentence, which carries no information and
# would be 38% of every sequence's tokens (so of the teacher's, the student's and every rollout's compute).
SHORT_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
SHORT_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


def build_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 - the record field's name
    if input:
        return SHORT_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return SHORT_PROMPT_NO_INPUT.format(instruction=instruction)


SPLIT_FRACTIONS = {"test": 0.15, "val": 0.15}  # of the prompt space; the rest is train's
# Draws per record before a split is declared out of fresh prompts (an error, not a silent short split).
MAX_PROMPT_ATTEMPTS = 1000


def _split_of(prompt: str, seed: int) -> str:
    """Stable seeded hash of the prompt string -> split name (never Python's salted ``hash``)."""
    u = int.from_bytes(hashlib.blake2b(f"{seed}\0{prompt}".encode(), digest_size=8).digest(), "big") / 2**64
    if u < SPLIT_FRACTIONS["test"]:
        return "test"
    if u < SPLIT_FRACTIONS["test"] + SPLIT_FRACTIONS["val"]:
        return "val"
    return "train"


def _make_split(split: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(f"mgsr-synthetic/{seed}/{split}")
    names = list(FAMILIES)
    records: list[dict] = []
    seen: set[str] = set()
    for _ in range(n):
        for _attempt in range(MAX_PROMPT_ATTEMPTS):
            family = rng.choice(names)
            instruction, inp, refs = FAMILIES[family](rng)
            prompt = build_prompt(instruction, inp)
            # eval prompts are unique within their split; train keeps repeats (they carry different answers)
            if _split_of(prompt, seed) == split and (split == "train" or prompt not in seen):
                break
        else:
            raise RuntimeError(f"synthetic {split!r} split ran out of fresh prompts after {len(records)} records")
        seen.add(prompt)
        if split == "train":
            output: str | list[str] = rng.choice(refs)
        else:
            output = refs if len(refs) > 1 else refs[0]
        records.append({"instruction": instruction, "input": inp, "output": output, "prompt": prompt,
                        "family": family})
    return records


def add_label_noise(records: list[dict], rate: float, seed: int) -> int:
    """Replace the response of a `rate` share of training records, in place, by the response of another record
    of the same family (a fluent answer to a different question: the kind of error human-written instruction
    data has). Prompts are unchanged. Returns how many responses changed; those records get `noisy: True`.

    The draws come from their own seeded stream, so the records (and which of them are noisy) are a pure
    function of (seed, rate), and the first n records of a longer split get the same noise as a split of n."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"data.label_noise must be in [0, 1), got {rate}")
    if rate == 0.0:
        return 0
    rng = random.Random(f"mgsr-synthetic/{seed}/label-noise")
    by_family: dict[str, list[int]] = {}
    changed = 0
    originals = [r["output"] for r in records]
    for i, rec in enumerate(records):
        pool = by_family.setdefault(rec["family"], [])
        u, pick = rng.random(), rng.random()
        if u < rate and pool:  # donors are earlier records: a prefix of the split is noised the same way
            donor = originals[pool[int(pick * len(pool))]]
            if donor != rec["output"]:
                rec["output"], rec["noisy"] = donor, True
                changed += 1
        pool.append(i)
    return changed


def make_synthetic_splits(seed: int = 0, n_train: int = 4000, n_val: int = 200, n_test: int = 200, *,
                          label_noise: float = 0.0) -> dict[str, list[dict]]:
    """Generate the train/val/test splits of the synthetic task: records with `instruction`, `input`,
    `output` (str; a list of acceptable references for multi-answer val/test records), `prompt`, `family`.
    `label_noise` corrupts that share of the training responses (`add_label_noise`); val/test stay clean."""
    splits = {split: _make_split(split, n, seed) for split, n in (("train", n_train), ("val", n_val),
                                                                  ("test", n_test))}
    add_label_noise(splits["train"], label_noise, seed)
    return splits


def synthetic_corpus(records: Iterable[dict]) -> Iterator[str]:
    """Prompt + response texts (one per reference) for training a tokenizer on the synthetic task."""
    for rec in records:
        outputs = rec["output"] if isinstance(rec["output"], list) else [rec["output"]]
        for out in outputs:
            yield rec["prompt"] + out
