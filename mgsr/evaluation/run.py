"""Evaluation protocol (METHOD.md 7): sample one response per prompt per seed, score, aggregate over seeds.

Prompts are sorted by length before batching (less padding), left-padded, and generated with the same
sampler as training (`mgsr.generation`, KV cache); outputs are put back in the original order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from mgsr.data.collate import pad_rows
from mgsr.evaluation.metrics import distinct_n, exact_match, postprocess, rouge_l_per_example
from mgsr.evaluation.tables import summarise_seeds
from mgsr.generation import SamplingConfig, generate

LENGTH_BUDGETS = ("padded", "per_row")


@dataclass
class EvalSettings:
    """How evaluation generates and scores. The response length is bounded either by `max_new_tokens`, or by
    `max_length` (prompt + response tokens, MiniLLM / DistiLLM's `--max-length`) with `length_budget`:

    - ``padded`` (MiniLLM / DistiLLM exactly): every prompt is left-padded to `max_prompt_len` columns and the
      budget is `max_length - max_prompt_len` new tokens for every prompt (512 - 256 = 256 in the paper setup);
    - ``per_row``: `max_length` minus the prompt's own length, so short prompts may generate longer answers.
    """

    seeds: tuple = (10, 20, 30, 40, 50)
    batch_size: int = 32
    max_new_tokens: int | None = 256
    max_length: int | None = None
    length_budget: str = "padded"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    no_repeat_ngram_size: int = 6
    max_prompt_len: int = 256
    limit: int | None = None
    exact_match: str = "minillm"   # normalisation: minillm (keeps articles) | squad (drops a/an/the)

    def sampling(self) -> SamplingConfig:
        new, total = self.max_new_tokens, None
        if self.max_length is not None:
            if self.length_budget == "padded":
                new = self.max_length - self.max_prompt_len
            else:
                new, total = self.max_length, self.max_length
        return SamplingConfig(max_new_tokens=new, max_length=total, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, no_repeat_ngram_size=self.no_repeat_ngram_size)


def encode_prompts(tokenizer, records: list[dict], max_prompt_len: int) -> tuple[list[torch.Tensor], list[int], int]:
    """Prompt ids of the records that fit; returns (ids, kept record indices, number dropped as too long)."""
    ids, kept = [], []
    for i, r in enumerate(records):
        p = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        if len(p) <= max_prompt_len:
            ids.append(torch.tensor(p, dtype=torch.long))
            kept.append(i)
    return ids, kept, len(records) - len(kept)


@torch.no_grad()
def generate_responses(model, tokenizer, prompt_ids: list[torch.Tensor], sampling: SamplingConfig, *, seed: int,
                       batch_size: int, device=None) -> tuple[list[str], int]:
    """Sampled, decoded, stripped responses in input order, and the number of generated tokens."""
    device = device or next(model.parameters()).device
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    gen = torch.Generator(device).manual_seed(seed)
    texts: list[str] = [""] * len(prompt_ids)
    n_tokens = 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = pad_rows([(prompt_ids[i], torch.empty(0, dtype=torch.long)) for i in idx],
                         pad_id=tokenizer.pad_token_id, device=device)
        P = batch["prompt_len"]
        out = generate(model, batch["prompt_ids"], batch["prompt_attention_mask"], sampling,
                       eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, generator=gen)
        resp_mask = out["response_mask"][:, P:]
        n_tokens += int(resp_mask.sum())
        ids = out["input_ids"][:, P:].masked_fill(~resp_mask, tokenizer.pad_token_id)
        for i, t in zip(idx, tokenizer.batch_decode(ids, skip_special_tokens=True)):
            texts[i] = postprocess(t)
    return texts, n_tokens


def score(predictions: list[str], references: list[list[str]], *, em_style: str = "minillm",
          per_example: list[float] | None = None) -> dict[str, float]:
    if per_example is None:
        per_example = rouge_l_per_example(predictions, references)
    return {"rougeL": sum(per_example) / len(per_example) if per_example else 0.0,
            "exact_match": exact_match(predictions, references, style=em_style),
            "distinct_1": distinct_n(predictions, 1), "distinct_2": distinct_n(predictions, 2)}


def evaluate_sets(model, tokenizer, sets: dict[str, list[dict]], settings: EvalSettings, *, log=print) -> dict:
    """Evaluate `model` on named record lists. Returns per-seed scores, the mean ± std summary,
    tokens/s, dropped-prompt counts, samples of the first seed's generations, and each prompt's ROUGE-L per seed
    (`per_prompt[set][seed]`, in record order, 2 decimals): what the noise budget splits prompts from seeds with."""
    model.eval()
    sampling = settings.sampling()
    per_seed: dict[str, dict[int, dict[str, float]]] = {}
    samples, dropped, per_prompt = {}, {}, {}
    for name, records in sets.items():
        records = records[: settings.limit] if settings.limit else records
        prompt_ids, kept, n_drop = encode_prompts(tokenizer, records, settings.max_prompt_len)
        dropped[name] = n_drop
        refs = [records[i]["references"] for i in kept]
        per_seed[name], per_prompt[name] = {}, {}
        for seed in settings.seeds:
            t0 = time.perf_counter()
            preds, n_tok = generate_responses(model, tokenizer, prompt_ids, sampling, seed=seed,
                                              batch_size=settings.batch_size)
            dt = time.perf_counter() - t0
            rouge = rouge_l_per_example(preds, refs)
            per_prompt[name][seed] = [round(x, 2) for x in rouge]
            per_seed[name][seed] = {**score(preds, refs, em_style=settings.exact_match, per_example=rouge),
                                    "tokens_per_s": n_tok / max(dt, 1e-9)}
            if seed == settings.seeds[0]:
                samples[name] = [{"prompt": records[i]["prompt"], "prediction": p, "references": r}
                                 for i, p, r in list(zip(kept, preds, refs))[:20]]
            log(f"eval {name} seed={seed}: rougeL={per_seed[name][seed]['rougeL']:.2f} "
                f"({len(preds)} prompts, {n_tok / max(dt, 1e-9):.0f} tok/s)")
    return {"per_seed": per_seed, "summary": summarise_seeds(per_seed), "dropped_too_long": dropped,
            "samples": samples, "seeds": list(settings.seeds), "per_prompt": per_prompt}
