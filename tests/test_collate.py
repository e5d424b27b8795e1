"""encode_record (MiniLLM response definition, prompt filter, truncation) and the canonical batch layout."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mgsr.data.collate import Collator, encode_record, encode_records
from mgsr.data.prompt import build_prompt
from mgsr.data.synthetic import make_synthetic_splits, synthetic_corpus
from mgsr.data.tokenizer import build_tokenizer

PAD = 0


@pytest.fixture(scope="module")
def tok():
    splits = make_synthetic_splits(seed=0, n_train=300, n_val=20, n_test=20)
    return build_tokenizer(synthetic_corpus(splits["train"]), vocab_size=600)


def _rec(instruction: str, output, inp: str = "") -> dict:
    refs = output if isinstance(output, list) else [output]
    return {"prompt": build_prompt(instruction, inp), "references": refs}


def test_encode_record_follows_minillm(tok):
    rec = _rec("Name a red fruit.", "A cherry is a red fruit.")
    f = encode_record(tok, rec)
    p_ids = tok(rec["prompt"], add_special_tokens=False)["input_ids"]
    full = tok(rec["prompt"] + "A cherry is a red fruit.", add_special_tokens=False)["input_ids"]
    assert f["prompt_ids"] == p_ids
    assert f["response_ids"] == full[len(p_ids):] + [tok.eos_token_id]
    assert f["response_ids"][-1] == tok.eos_token_id
    assert tok.decode(f["prompt_ids"] + f["response_ids"][:-1]) == rec["prompt"] + "A cherry is a red fruit."
    assert f["prompt"] == rec["prompt"] and f["references"] == ["A cherry is a red fruit."]


def test_encode_record_uses_first_reference_and_keeps_all(tok):
    refs = ["A cherry is a red fruit.", "An apple is a red fruit."]
    f = encode_record(tok, _rec("Name a red fruit.", refs), train=False)
    assert tok.decode(f["response_ids"][:-1]) == refs[0]
    assert f["references"] == refs


def test_encode_record_accepts_raw_output_field(tok):
    rec = {"prompt": build_prompt("Say yes."), "output": "Yes."}
    assert encode_record(tok, rec)["references"] == ["Yes."]


def test_prompt_too_long_returns_none(tok):
    rec = _rec("Name a red fruit.", "A cherry.")
    n = len(tok(rec["prompt"])["input_ids"])
    assert encode_record(tok, rec, max_prompt_len=n) is not None  # the limit is inclusive
    assert encode_record(tok, rec, max_prompt_len=n - 1) is None


def test_max_len_truncates_response_and_drops_eos(tok):
    out = "Once upon a time, a fox lived in the forest. One day it met a bear near the river."
    rec = _rec("Write a short story about a fox.", out)
    full = encode_record(tok, rec)
    n_p, n_r = len(full["prompt_ids"]), len(full["response_ids"])
    exact = encode_record(tok, rec, max_len=n_p + n_r)
    assert exact["response_ids"] == full["response_ids"]  # fits exactly: untouched, EOS kept
    cut = encode_record(tok, rec, max_len=n_p + 5)
    assert cut["response_ids"] == full["response_ids"][:5]
    assert tok.eos_token_id not in cut["response_ids"]
    assert len(cut["prompt_ids"]) + len(cut["response_ids"]) == n_p + 5


def test_eval_record_without_reference_has_empty_response(tok):
    rec = {"prompt": build_prompt("Describe a fox."), "references": []}
    assert encode_record(tok, rec, train=False)["response_ids"] == []
    with pytest.raises(ValueError, match="no output"):
        encode_record(tok, rec, train=True)


def test_encode_records_matches_encode_record(tok):
    recs = make_synthetic_splits(seed=1, n_train=30, n_val=5, n_test=5)["test"]
    recs = [{**r, "references": r["output"] if isinstance(r["output"], list) else [r["output"]]} for r in recs]
    batched = encode_records(tok, recs, max_prompt_len=25, max_len=45, train=False)
    single = [encode_record(tok, r, max_prompt_len=25, max_len=45, train=False) for r in recs]
    assert batched == single
    kept = [f for f in batched if f is not None]
    assert 0 < len(kept) < len(batched)  # the limit bites on some prompts only
    assert all(len(f["prompt_ids"]) <= 25 and len(f["prompt_ids"]) + len(f["response_ids"]) <= 45 for f in kept)


def _feature(n_p: int, n_r: int, offset: int) -> dict:
    return {"prompt_ids": list(range(offset + 1, offset + 1 + n_p)),
            "response_ids": list(range(offset + 500, offset + 500 + n_r)),
            "prompt": f"p{offset}", "references": [f"r{offset}", "alt"]}


def _check_layout(batch: dict, feats: list[dict]) -> None:
    p = batch["prompt_len"]
    ids, am, rm = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    b = len(feats)
    r = max(len(f["response_ids"]) for f in feats)
    assert isinstance(p, int) and p == max(len(f["prompt_ids"]) for f in feats)
    assert ids.shape == am.shape == rm.shape == (b, p + r)
    assert ids.dtype == am.dtype == torch.long and rm.dtype == torch.bool
    assert torch.equal(batch["prompt_ids"], ids[:, :p]) and torch.equal(batch["prompt_attention_mask"], am[:, :p])
    for i, f in enumerate(feats):
        n_p, n_r = len(f["prompt_ids"]), len(f["response_ids"])
        # prompt left-padded so that it ends at column P; response starts at column P
        assert ids[i, p - n_p : p].tolist() == f["prompt_ids"]
        assert ids[i, p : p + n_r].tolist() == f["response_ids"]
        assert (ids[i, : p - n_p] == PAD).all() and (ids[i, p + n_r :] == PAD).all()
        expected_am = [0] * (p - n_p) + [1] * (n_p + n_r) + [0] * (r - n_r)
        assert am[i].tolist() == expected_am  # zeros exactly at padding
        expected_rm = [False] * p + [True] * n_r + [False] * (r - n_r)
        assert rm[i].tolist() == expected_rm  # exactly the response (EOS included)
    assert batch["prompts"] == [f["prompt"] for f in feats]
    assert batch["references"] == [f["references"] for f in feats]


def test_collator_layout_golden():
    feats = [_feature(3, 2, 0), _feature(1, 4, 10)]
    batch = Collator(PAD)(feats)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 500, 501, 0, 0], [0, 0, 11, 510, 511, 512, 513]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]]
    assert batch["response_mask"].tolist() == [[False] * 3 + [True] * 2 + [False] * 2, [False] * 3 + [True] * 4]
    assert batch["prompt_len"] == 3
    _check_layout(batch, feats)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 9), st.integers(0, 9)), min_size=1, max_size=6))
def test_collator_layout_invariants(lengths):
    feats = [_feature(n_p, n_r, 20 * i) for i, (n_p, n_r) in enumerate(lengths)]
    batch = Collator(PAD)(feats)
    _check_layout(batch, feats)
    # the position-id convention of the contract gives 0..n-1 over every row's real tokens
    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    for i, (n_p, n_r) in enumerate(lengths):
        real = batch["attention_mask"][i].bool()
        assert pos[i][real].tolist() == list(range(n_p + n_r))


def test_collator_on_real_encodings(tok):
    recs = [_rec("Name a red fruit.", "A cherry is a red fruit."),
            _rec("Sort the words in alphabetical order.", "bear, cat, fox", inp="fox, cat, bear")]
    feats = [encode_record(tok, r) for r in recs]
    batch = Collator(tok.pad_token_id)(feats)
    p = batch["prompt_len"]
    for i, rec in enumerate(recs):
        row = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
        assert tok.decode(row[:-1]) == rec["prompt"] + rec["references"][0]
        resp = batch["input_ids"][i][batch["response_mask"][i]].tolist()
        assert resp[-1] == tok.eos_token_id and batch["response_mask"][i, p]
