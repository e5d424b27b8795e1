"""SeqKD (Kim & Rush 2016): fine-tune the student on the teacher's own responses instead of the gold ones.

The teacher samples one response per training prompt, once, with the shared sampler
(`mgsr.generation.generate`, training sampler: temperature 1, top_k 0, top_p 1 by default). The responses
are cached at ``${cache_dir}/seqkd-<key>.pt``, the key hashing everything that determines them: the
teacher's identity (hub name or directory and its files, or the spec of the fine-tuned tiny teacher), the
data config, the tokenizer, the sampling settings and the seed. The file is written atomically, so a killed
run never leaves half a cache, and a later run with the same key re-uses it without loading the teacher.
The datamodule then serves those responses as the gold training responses (validation and test keep the
real references).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from mgsr.config import to_container
from mgsr.data.collate import Collator
from mgsr.generation import SamplingConfig, generate
from mgsr.sft_stage import stable_hash

log = logging.getLogger("mgsr")

_DATA_KEYS = ("source", "path", "train_file", "seed", "n_train", "max_prompt_len", "max_len", "max_train_records")


def teacher_identity(cfg, tokenizer) -> dict:
    """What names the teacher without loading it: a hub name (+ revision), a directory's files, or the spec
    the pipeline fine-tunes the default teacher from (the same inputs as its own cache key)."""
    spec = cfg.model.teacher
    name = spec.get("name_or_path")
    if name:
        ident = {"name_or_path": name, "revision": spec.get("revision"), "dtype": spec.get("dtype")}
        path = Path(os.path.expanduser(name))
        if path.is_dir():  # local weights: their names, sizes and times change when the model does
            ident["files"] = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime))
                                    for p in path.iterdir() if p.is_file())
        if int(cfg.model.teacher_sft.get("max_steps") or 0) > 0:  # fine-tuned before use (mgsr.build.teacher.ensure_teacher)
            ident["sft"] = to_container(cfg.model.teacher_sft)
        return ident
    return {"arch": to_container(spec.arch), "sft": to_container(cfg.model.teacher_sft),
            "data": to_container(cfg.data), "dtype": spec.get("dtype")}


def sampling_config(cfg) -> SamplingConfig:
    return SamplingConfig(**to_container(cfg.seqkd.sampling))


def cache_path(cfg, tokenizer) -> Path:
    data = to_container(cfg.data)
    key = stable_hash({
        "teacher": teacher_identity(cfg, tokenizer),
        "data": {k: data.get(k) for k in _DATA_KEYS},
        "tokenizer": [len(tokenizer), stable_hash(tokenizer.get_vocab())],
        "sampling": to_container(cfg.seqkd.sampling),
        "seed": int(cfg.seqkd.seed),
    })
    return Path(cfg.cache_dir) / f"seqkd-{key}.pt"


def _prompts_digest(features: list[dict]) -> str:
    h = hashlib.sha1()
    for f in features:
        h.update(json.dumps(f["prompt_ids"]).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def generate_responses(teacher, features: list[dict], sampling: SamplingConfig, *, eos_id: int, pad_id: int,
                       max_len: int, batch_size: int = 32, seed: int = 0) -> list[list[int]]:
    """One teacher sample per feature's prompt, returned in the order of `features` (response ids with the
    EOS when the teacher emitted one, cut so that prompt + response <= max_len).

    Prompts are batched by length (less padding); the sampler's generator is seeded once, so the result is
    a function of (teacher, prompts, sampling, seed, batch_size)."""
    device = next(teacher.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    collate = Collator(pad_id)
    order = sorted(range(len(features)), key=lambda i: len(features[i]["prompt_ids"]))
    out: list[list[int] | None] = [None] * len(features)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate([{"prompt_ids": features[i]["prompt_ids"], "response_ids": [], "prompt": "",
                          "references": []} for i in idx])
        seqs = generate(teacher, batch["prompt_ids"].to(device), batch["prompt_attention_mask"].to(device),
                        sampling, eos_id=eos_id, pad_id=pad_id, generator=gen)
        P = seqs["prompt_len"]
        resp, mask = seqs["input_ids"][:, P:].cpu(), seqs["response_mask"][:, P:].cpu()
        for row, i in enumerate(idx):
            budget = max(max_len - len(features[i]["prompt_ids"]), 0)
            out[i] = resp[row][mask[row]].tolist()[:budget]
        if (start // batch_size) % 20 == 0:
            log.info("seqkd: teacher responses %d/%d", min(start + batch_size, len(order)), len(order))
    return out  # type: ignore[return-value]


def _pack(responses: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in responses], dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    flat = torch.tensor([t for r in responses for t in r], dtype=torch.long)
    return flat, offsets


def _unpack(flat: torch.Tensor, offsets: torch.Tensor) -> list[list[int]]:
    o = offsets.tolist()
    ids = flat.tolist()
    return [ids[o[i]:o[i + 1]] for i in range(len(o) - 1)]


def save_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic on one filesystem: readers see the old file or the whole new one


def load_or_generate(cfg, tokenizer, features: list[dict],
                     get_teacher: Callable[[], object]) -> tuple[list[list[int]], Path, bool]:
    """(responses aligned with `features`, cache file, whether they were generated now)."""
    path = cache_path(cfg, tokenizer)
    digest = _prompts_digest(features)
    if path.is_file():
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("prompts") == digest and int(payload["offsets"].numel()) == len(features) + 1:
            log.info("seqkd: re-using %d cached teacher responses from %s", len(features), path)
            return _unpack(payload["ids"], payload["offsets"]), path, False
        log.warning("seqkd: cache %s does not match the training prompts; generating again", path)
    teacher = get_teacher()
    if torch.cuda.is_available() and cfg.trainer.get("accelerator") != "cpu":
        teacher = teacher.to("cuda")
    log.info("seqkd: sampling one teacher response for each of %d training prompts (cached at %s)",
             len(features), path)
    responses = generate_responses(
        teacher, features, sampling_config(cfg), eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
        max_len=int(cfg.data.max_len), batch_size=int(cfg.seqkd.batch_size), seed=int(cfg.seqkd.seed))
    flat, offsets = _pack(responses)
    save_atomic(path, {"ids": flat, "offsets": offsets, "prompts": digest,
                       "meta": json.dumps({"teacher": teacher_identity(cfg, tokenizer), "n": len(responses)},
                                          default=str)})
    return responses, path, True


def apply_seqkd(cfg, tokenizer, dm, get_teacher: Callable[[], object]) -> dict:
    """Replace the datamodule's training responses by the teacher's (cached); returns stats for results.json."""
    dm.setup("fit")
    features = dm.datasets["train"].features
    responses, path, generated = load_or_generate(cfg, tokenizer, features, get_teacher)
    dm.set_train_responses(responses)
    lengths = [len(r) for r in responses]
    eos = tokenizer.eos_token_id
    return {"cache": str(path), "generated": generated, "n": len(responses),
            "mean_response_tokens": sum(lengths) / max(len(lengths), 1),
            "ended_with_eos": sum(1 for r in responses if r and r[-1] == eos) / max(len(responses), 1)}
