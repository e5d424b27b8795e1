"""Layer-pruned students: which blocks are kept, and that the pruned model computes exactly the teacher's
embeddings -> kept blocks -> final norm -> head, for the GPT-2 and Llama (RoPE, GQA) families."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from mgsr.config import ConfigError
from mgsr.generation import SamplingConfig, generate
from mgsr.prune import kept_layers, prune_layers, spread_layers

V = 64


def _gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=5, n_head=4,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()


def _llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=True)).eval()


def _by_hand_gpt2(t, ids, keep):
    pos = torch.arange(ids.shape[1])[None]
    h = t.transformer.wte(ids) + t.transformer.wpe(pos)
    for i in keep:
        h = t.transformer.h[i](h)
        h = h[0] if isinstance(h, tuple) else h
    return t.lm_head(t.transformer.ln_f(h))


def _by_hand_llama(t, ids, keep):
    pos = torch.arange(ids.shape[1])[None]
    h = t.model.embed_tokens(ids)
    rope = t.model.rotary_emb(h, pos)
    causal = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
    for i in keep:
        h = t.model.layers[i](h, attention_mask=causal, position_ids=pos, position_embeddings=rope)
        h = h[0] if isinstance(h, tuple) else h
    return t.lm_head(t.model.norm(h))


def test_a_count_is_spread_evenly_keeping_the_first_and_last_block():
    assert spread_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert spread_layers(5, 2) == [0, 4] and spread_layers(5, 5) == [0, 1, 2, 3, 4] and spread_layers(5, 1) == [0]
    assert kept_layers(5, [0, 2, 4]) == [0, 2, 4]
    for bad in (0, 6, [], [2, 1], [0, 0], [0, 5], [-1, 2]):
        with pytest.raises(ConfigError, match="keep_layers"):
            kept_layers(5, bad)


@pytest.mark.parametrize(("family", "by_hand"), [(_gpt2, _by_hand_gpt2), (_llama, _by_hand_llama)])
@pytest.mark.parametrize("keep", [[0, 2, 4], [1, 3], 3])
def test_pruned_logits_equal_the_kept_teacher_blocks_run_by_hand(family, by_hand, keep):
    teacher = family()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = prune_layers(teacher, keep).eval()
    idx = kept_layers(5, keep)
    assert student.config.num_hidden_layers == len(idx)
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = student(input_ids=ids).logits
        ref = by_hand(teacher, ids, idx)
        full = teacher(input_ids=ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, full, atol=1e-3)  # blocks really were dropped
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())  # teacher untouched
    # the kept blocks are copies, not shared: training the student leaves the teacher alone
    assert student.get_input_embeddings().weight.data_ptr() != teacher.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("family", [_gpt2, _llama])
def test_pruned_model_decodes_with_its_own_kv_cache(family):
    """Cached decoding of the pruned model equals recomputing the whole prefix each step (its attention
    layers index the cache by their new positions)."""
    student = prune_layers(family(), [1, 4]).eval()
    ids = torch.tensor([[3, 4, 5, 6]])
    seqs = generate(student, ids, torch.ones_like(ids), SamplingConfig(max_new_tokens=6, greedy=True),
                    eos_id=V + 1, pad_id=0)
    ref = ids
    for _ in range(6):
        with torch.no_grad():
            nxt = student(input_ids=ref).logits[:, -1].argmax(-1, keepdim=True)
        ref = torch.cat([ref, nxt], 1)
    assert torch.equal(seqs["input_ids"], ref)
