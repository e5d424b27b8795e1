import inspect
import warnings

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from mgsr.generation import CACHE_KW, SamplingConfig, continue_generation, generate, model_cache

EOS, PAD = 1, 0


def _build(family):
    torch.manual_seed(0)
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                          bos_token_id=EOS, eos_token_id=EOS)).eval()
    # RoPE and grouped-query attention: the cache holds rotated keys for 2 KV heads shared by 4 query heads
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD)).eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    return _build(request.param)


def _prompts():
    ids = torch.tensor([[PAD, PAD, 5, 6, 7], [8, 9, 10, 11, 12], [PAD, PAD, PAD, 13, 14]])
    return ids, (ids != PAD).long()


def _greedy_unpadded(model, prompt, n):
    """Reference: one row, no padding, no cache, argmax each step."""
    ids = prompt[None]
    out = []
    for _ in range(n):
        nxt = model(input_ids=ids).logits[0, -1].argmax()
        out.append(int(nxt))
        if nxt == EOS:
            break
        ids = torch.cat([ids, nxt.view(1, 1)], 1)
    return out


def _response(seqs, b):
    P = seqs["prompt_len"]
    return seqs["input_ids"][b, P:][seqs["response_mask"][b, P:]].tolist()


def test_batched_greedy_matches_unpadded_reference(model):
    ids, mask = _prompts()
    cfg = SamplingConfig(max_new_tokens=8, greedy=True)
    seqs = generate(model, ids, mask, cfg, eos_id=EOS, pad_id=PAD)
    for b in range(3):
        assert _response(seqs, b) == _greedy_unpadded(model, ids[b][mask[b].bool()], 8)
    # layout: attention_mask is zero exactly on padding
    assert torch.equal(seqs["attention_mask"][:, :5], mask)


def test_sampling_is_seeded(model):
    ids, mask = _prompts()
    cfg = SamplingConfig(max_new_tokens=8)
    a = generate(model, ids, mask, cfg, eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(3))
    b = generate(model, ids, mask, cfg, eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(3))
    c = generate(model, ids, mask, cfg, eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["input_ids"], c["input_ids"])


@pytest.mark.parametrize("use_cache", [True, False])
def test_continuation_of_ragged_prefixes_matches_reference(model, use_cache):
    ids, mask = _prompts()
    cfg = SamplingConfig(max_new_tokens=10, greedy=True)
    seqs = generate(model, ids, mask, SamplingConfig(max_new_tokens=10), eos_id=EOS, pad_id=PAD,
                    generator=torch.Generator().manual_seed(0))
    P = seqs["prompt_len"]
    keep = torch.tensor([1, 3, 2])
    # splice a "teacher token" at the last kept position of each row
    spliced = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in seqs.items()}
    for b, k in enumerate(keep.tolist()):
        spliced["input_ids"][b, P + k - 1] = 20 + b
        spliced["attention_mask"][b, P + k - 1] = 1
        spliced["response_mask"][b, P + k - 1] = True
    kwargs = {}
    if use_cache:
        out = model(input_ids=seqs["input_ids"], attention_mask=seqs["attention_mask"],
                    position_ids=(seqs["attention_mask"].cumsum(-1) - 1).clamp_min(0), use_cache=True)
        kwargs = dict(cache=model_cache(out), cache_valid=keep - 1)
    res = continue_generation(model, spliced, keep, cfg, eos_id=EOS, pad_id=PAD, **kwargs)
    for b in range(3):
        prefix = spliced["input_ids"][b, P:P + keep[b]].tolist()
        full_prompt = torch.cat([ids[b][mask[b].bool()], torch.tensor(prefix)])
        ref = _greedy_unpadded(model, full_prompt, 10 - keep[b].item()) if prefix[-1] != EOS else []
        got = _response(res, b)
        assert got[: len(prefix)] == prefix  # prefix before the splice is unchanged
        assert got[len(prefix):] == ref
        assert len(got) <= 10


def test_inactive_rows_come_back_unchanged(model):
    ids, mask = _prompts()
    seqs = generate(model, ids, mask, SamplingConfig(max_new_tokens=6), eos_id=EOS, pad_id=PAD,
                    generator=torch.Generator().manual_seed(1))
    active = torch.tensor([False, True, False])
    res = continue_generation(model, seqs, torch.tensor([1, 1, 1]), SamplingConfig(max_new_tokens=6, greedy=True),
                              eos_id=EOS, pad_id=PAD, active=active)
    for b in (0, 2):
        assert _response(res, b) == _response(seqs, b)


def test_bad_sampling_config():
    with pytest.raises(ValueError, match="max_new_tokens must be > 0"):
        SamplingConfig(max_new_tokens=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_cache_api_the_generator_relies_on_exists(family):
    """If transformers moves the KV cache again, this fails first and says where: the forward must take the
    cache under CACHE_KW, return a DynamicCache under the same name, and expose per-layer key/value tensors
    [B, heads, T, d] that `continue_generation` shifts row by row."""
    model = _build(family)
    assert CACHE_KW in inspect.signature(model.forward).parameters, f"forward() has no {CACHE_KW!r} argument"
    ids = torch.tensor([[5, 6, 7]])
    out = model(input_ids=ids, use_cache=True)
    cache = model_cache(out)
    assert isinstance(cache, DynamicCache) and len(cache.layers) == model.config.num_hidden_layers
    layer = cache.layers[0]
    assert layer.keys.dim() == 4 and layer.keys.shape[2] == 3 and layer.values.shape == layer.keys.shape
    step = model(input_ids=torch.tensor([[8]]), use_cache=True, **{CACHE_KW: cache})
    assert model_cache(step).layers[0].keys.shape[2] == 4  # the passed cache was extended, not replaced


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoding_emits_no_cache_deprecation_warning(family, caplog):
    from transformers.utils import logging as hf_logging

    model = _build(family)
    ids, mask = _prompts()
    getattr(hf_logging.get_logger("transformers").warning_once, "cache_clear", lambda: None)()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seqs = generate(model, ids, mask, SamplingConfig(max_new_tokens=6), eos_id=EOS, pad_id=PAD,
                        generator=torch.Generator().manual_seed(0))
        out = model(input_ids=seqs["input_ids"], attention_mask=seqs["attention_mask"], use_cache=True)
        continue_generation(model, seqs, torch.tensor([1, 2, 1]), SamplingConfig(max_new_tokens=6, greedy=True),
                            eos_id=EOS, pad_id=PAD, cache=model_cache(out), cache_valid=torch.tensor([0, 1, 0]))
    cache_warnings = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
                      and ("past_key_values" in str(w.message) or "cache" in str(w.message))]
    assert not cache_warnings, cache_warnings
    assert "past_key_values" not in caplog.text


def _batch_sizes(model):
    """Record the batch size of every forward the model runs (prefill and decode steps)."""
    sizes = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True)
    return sizes, handle


def _ragged_prompts():
    # six prompts of 1-6 tokens: with max_length=10, budgets of 4-9 new tokens, so rows finish one by one
    ids = torch.full((6, 6), PAD)
    for b in range(6):
        ids[b, 6 - (b + 1):] = torch.arange(2, 3 + b) + 3 * b
    return ids, (ids != PAD).long()


@pytest.mark.parametrize("ngram", [0, 2])
def test_ragged_decode_draws_the_same_tokens_with_finished_rows_dropped(model, ngram):
    ids, mask = _ragged_prompts()
    runs = {}
    for compact in (False, True):
        cfg = SamplingConfig(max_new_tokens=9, max_length=10, no_repeat_ngram_size=ngram, compact=compact)
        sizes, handle = _batch_sizes(model)
        try:
            runs[compact] = generate(model, ids, mask, cfg, eos_id=EOS, pad_id=PAD,
                                     generator=torch.Generator().manual_seed(5)), sizes
        finally:
            handle.remove()
    (full, full_sizes), (ragged, ragged_sizes) = runs[False], runs[True]
    for k in ("input_ids", "attention_mask", "response_mask"):
        assert torch.equal(full[k], ragged[k]), k
    assert set(full_sizes) == {6}
    assert ragged_sizes[0] == 6 and ragged_sizes[-1] < 6  # finished rows left the model's batch
    assert ragged_sizes == sorted(ragged_sizes, reverse=True)
    assert sum(ragged_sizes) < sum(full_sizes)


def test_ragged_regeneration_skips_rows_not_revised_and_keeps_the_tokens(model):
    ids, mask = _prompts()
    seqs = generate(model, ids, mask, SamplingConfig(max_new_tokens=10), eos_id=EOS, pad_id=PAD,
                    generator=torch.Generator().manual_seed(2))
    keep, active = torch.tensor([2, 1, 4]), torch.tensor([True, False, True])
    runs = {}
    for compact in (False, True):
        out = model(input_ids=seqs["input_ids"], attention_mask=seqs["attention_mask"], use_cache=True)
        sizes, handle = _batch_sizes(model)
        try:
            res = continue_generation(model, seqs, keep, SamplingConfig(max_new_tokens=10, compact=compact),
                                      eos_id=EOS, pad_id=PAD, cache=model_cache(out),
                                      cache_valid=torch.tensor([1, 0, 2]), active=active,
                                      generator=torch.Generator().manual_seed(9))
        finally:
            handle.remove()
        runs[compact] = res, sizes
    (full, full_sizes), (ragged, ragged_sizes) = runs[False], runs[True]
    for k in ("input_ids", "attention_mask", "response_mask"):
        assert torch.equal(full[k], ragged[k]), k
    assert _response(ragged, 1) == _response(seqs, 1)
    assert set(full_sizes) == {3}
    assert max(ragged_sizes[1:]) <= 2  # after the prefix, the row not revised is never decoded
