"""Teacher, student and tokenizer: built from a config (tiny default, tests) or loaded by name or directory.

The loading path is the real one (`AutoModelForCausalLM.from_pretrained`), so `gpt2-xl`, `facebook/opt-6.7b`
or a local directory work unchanged on a machine that can reach them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def build_from_config(arch: dict, tokenizer: PreTrainedTokenizerBase, *, seed: int = 0):
    """A randomly initialised causal LM of `arch` (a dict of HF config fields, `model_type` default gpt2)."""
    arch = dict(arch)
    model_type = arch.pop("model_type", "gpt2")
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **arch,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


def load_model(name_or_path: str, *, dtype: str = "float32", trust_remote_code: bool = False, **kwargs):
    """Load a causal LM from the hub or a local directory (real path; hub access needs network)."""
    return AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, **kwargs
    )


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:  # GPT-2 / LLaMA ship without one; EOS is the usual stand-in
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def check_tokenizers(teacher_tok: PreTrainedTokenizerBase, student_tok: PreTrainedTokenizerBase) -> None:
    """Token-level distillation needs one vocabulary; padded embedding rows are fine, other tokens are not."""
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise ValueError(
            "teacher and student tokenizers differ (token-level KD needs a shared vocabulary): "
            f"{getattr(teacher_tok, 'name_or_path', '?')} vs {getattr(student_tok, 'name_or_path', '?')}; "
            "use models of one family or set model.tokenizer to the shared one"
        )


def shared_vocab_size(tokenizer, *models) -> int:
    """Columns of the logits that both models share: the tokenizer's length (embedding rows past it are padding,
    e.g. 50257 tokens in a 50304-row matrix)."""
    n = len(tokenizer)
    for m in models:
        output_rows(m, n)
    return n


def output_rows(model, n_tokens: int) -> int:
    """The model's output rows; fewer than the tokenizer's `n_tokens` is a ValueError (wrong tokenizer)."""
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < n_tokens:
        raise ValueError(f"{type(model).__name__} has {rows} output rows but the tokenizer has {n_tokens} tokens; "
                         "wrong tokenizer?")
    return rows


def freeze(model):
    model.eval()
    model.requires_grad_(False)
    return model


def is_hf_dir(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


def merge_lora(model, adapter_path: str):
    """`model` with the PEFT LoRA adapter saved at `adapter_path` merged into its weights (a plain model again:
    no adapter overhead in the frozen teacher's forward)."""
    from peft import PeftModel

    log.info("merging LoRA adapter %s into %s", adapter_path, type(model).__name__)
    return PeftModel.from_pretrained(model, adapter_path).merge_and_unload()


def trim_vocab(model, n_tokens: int):
    """Drop output/embedding rows past the tokenizer's `n_tokens` (padding rows, e.g. OPT's 50272 for 50265
    tokens), so teacher and student logits have the tokenizer's width: SCRG compares them position by
    position, and a padding id can never be sampled. Softmax over the kept rows is what `align_vocab` computes
    for the losses anyway. Fewer rows than tokens is an error (wrong tokenizer)."""
    rows = output_rows(model, n_tokens)
    if rows > n_tokens:
        log.info("%s: dropping %d padded vocabulary rows (%d -> %d)", type(model).__name__, rows - n_tokens, rows,
                 n_tokens)
        model.resize_token_embeddings(n_tokens, mean_resizing=False)
    return model
