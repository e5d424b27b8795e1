"""Batched sampling throughput (tokens/s) of evaluate.py's generator (`mgsr.evaluation.run.generate_responses`:
length-sorted batches, left padding, KV cache, our sampler) vs a plain Hugging Face `model.generate` loop over
the same prompts at the same settings (temperature 1, top_k 0, top_p 1, no_repeat_ngram_size 6, same batch
size and length cap).

    python bench/generation.py                         # tiny student and teacher architectures, 64 prompts
    python bench/generation.py --models student --prompts 32 --max-new-tokens 32
    python bench/generation.py --device cuda           # the same on a GPU (bench/gpu_check.sh)

Models are randomly initialised from conf/model/tiny.yaml (throughput does not depend on training; a random
model rarely emits EOS, so both generators run to the cap and produce the same number of tokens). Tokens are
response tokens up to and including EOS. Measured round-robin in one process; the table is last.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import REPO, add_threads_arg, machine, set_threads, table, write_json

from mgsr.build.tokenizer import build_tokenizer
from mgsr.evaluation.run import encode_prompts, generate_responses
from mgsr.generation import SamplingConfig
from mgsr.models import build_from_config


def hf_loop(model, tokenizer, prompt_ids: list[torch.Tensor], *, batch_size: int, max_new_tokens: int, seed: int,
            no_repeat_ngram_size: int) -> int:
    """The plain baseline: batches in input order, left-padded, `model.generate` with sampling; returns the
    number of generated tokens (up to and including EOS)."""
    torch.manual_seed(seed)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    n_tokens = 0
    for start in range(0, len(prompt_ids), batch_size):
        rows = prompt_ids[start:start + batch_size]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = r
            mask[i, width - len(r):] = 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, no_repeat_ngram_size=no_repeat_ngram_size, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad, eos_token_id=eos)
        new = out[:, width:]
        # tokens up to and including the first EOS of each row
        is_eos = new == eos
        first = torch.where(is_eos.any(-1), is_eos.float().argmax(-1) + 1, torch.full_like(is_eos[:, 0], new.shape[1],
                                                                                          dtype=torch.long))
        n_tokens += int(first.sum())
    return n_tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["student", "teacher"], choices=["student", "teacher"])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--no-repeat-ngram-size", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cache-dir", default=str(REPO / ".cache" / "mgsr"), help="tokenizer cache")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "generation.json"))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    add_threads_arg(p)
    args = p.parse_args()
    set_threads(args.threads)
    from step_cost import compose

    cfg = compose([f"cache_dir={args.cache_dir}"])
    tokenizer = build_tokenizer(cfg)
    from mgsr.data.synthetic import make_synthetic_splits

    records = make_synthetic_splits(cfg.data.seed, 0, 0, args.prompts)["test"][: args.prompts]
    prompt_ids, _, _ = encode_prompts(tokenizer, records, cfg.data.max_prompt_len)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, no_repeat_ngram_size=args.no_repeat_ngram_size)

    rows = []
    for which in args.models:
        model = build_from_config(dict(cfg.model[which].arch), tokenizer, seed=0).eval().to(args.device)
        runs = {
            "evaluate.py generator": lambda s, m=model: generate_responses(m, tokenizer, prompt_ids, sampling, seed=s,
                                                                           batch_size=args.batch_size)[1],
            "HF model.generate loop": lambda s, m=model: hf_loop(
                m, tokenizer, prompt_ids, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, seed=s,
                no_repeat_ngram_size=args.no_repeat_ngram_size),
        }
        rates = {k: [] for k in runs}
        tokens = {k: [] for k in runs}
        for fn in runs.values():  # warm-up
            fn(0)
        for r in range(args.rounds):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                n = fn(r + 1)
                dt = time.perf_counter() - t0
                rates[name].append(n / dt)
                tokens[name].append(n)
        ours = statistics.median(rates["evaluate.py generator"])
        for name in runs:
            rate = statistics.median(rates[name])
            rows.append({"model": which, "generator": name, "tokens_per_s": rate, "x_hf": None, "tokens": statistics.mean(tokens[name]),
                         "params_m": sum(p.numel() for p in model.parameters()) / 1e6})
        rows[-2]["x_hf"] = ours / statistics.median(rates["HF model.generate loop"])
        rows[-1]["x_hf"] = 1.0
        print(f"{which}: done", flush=True)

    payload = {"machine": machine(), "args": vars(args), "rows": rows}
    path = write_json(args.out, payload)
    m = payload["machine"]
    print(f"\nwrote {path}\n")
    print(f"sampling throughput, {args.prompts} synthetic prompts, batch {args.batch_size}, max_new_tokens "
          f"{args.max_new_tokens}, no_repeat_ngram_size {args.no_repeat_ngram_size}, {m['cpu']} "
          f"({m['torch_threads']} threads); x_hf = tokens/s over the HF loop's")
    print(table(rows, ["model", "generator", "tokens_per_s", "x_hf", "tokens", "params_m"]))


if __name__ == "__main__":
    main()
