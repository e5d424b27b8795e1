"""mgsr/data/lm_text.py: MiniLLM's language-modelling text (`loss.distill.lm_data`), read once, served by step."""

from __future__ import annotations

import json

import pytest
import torch

from mgsr.data.lm_text import LmText

EOS = 1


class _Tok:
    """One token per character (its code point), EOS = 1."""

    eos_token_id = EOS

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [ord(c) for c in text]}


def _write(tmp_path, lines) -> str:
    path = tmp_path / "lm.jsonl"
    path.write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines) + "\n")
    return str(path)


def _ids(text: str) -> list[int]:
    return [ord(c) for c in text] + [EOS]


def test_each_record_shape_gives_its_text_with_eos(tmp_path):
    path = _write(tmp_path, [
        {"text": "ab", "output": "ignored"},              # `text` wins
        {"prompt": "p", "output": "o"},                   # prompt + output
        {"instruction": "i", "input": "n", "output": "o"},  # instruction + input + output
        {"instruction": "i", "output": "o"},              # no input
        "", "not json", json.dumps(["a list"]), {"title": "no text"},  # skipped
    ])
    lm = LmText(path, _Tok())
    assert len(lm) == 4
    assert lm.rows == [_ids("ab"), _ids("p o"), _ids("i n o"), _ids("i o")]


def test_texts_are_cut_to_max_len(tmp_path):
    lm = LmText(_write(tmp_path, [{"text": "abcdef"}, {"text": "x"}]), _Tok(), max_len=3)
    assert lm.rows == [_ids("abcdef")[:3], _ids("x")]  # the cut drops EOS of a long text


def test_batch_i_is_rows_i_b_to_i_b_plus_b_mod_n_right_padded(tmp_path):
    lm = LmText(_write(tmp_path, [{"text": "a"}, {"text": "bcd"}, {"text": "ef"}]), _Tok())
    assert lm.rows[0] == [97, EOS]
    ids, attn = lm.batch(0, 2, pad_id=0)
    assert ids.tolist() == [_ids("a") + [0, 0], _ids("bcd")]
    assert attn.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]] and ids.dtype == attn.dtype == torch.long
    ids, attn = lm.batch(1, 2, pad_id=7)  # rows 2, 3 mod 3 = 0: wraps around
    assert ids.tolist() == [_ids("ef"), _ids("a") + [7]] and attn.tolist() == [[1, 1, 1], [1, 1, 0]]
    fresh = LmText(_write(tmp_path, [{"text": "a"}, {"text": "bcd"}, {"text": "ef"}]), _Tok())
    assert fresh.batch(1, 2, pad_id=7)[0].tolist() == ids.tolist()  # a function of the step alone: no state to resume


def test_a_missing_file_or_no_usable_text_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="loss.distill.lm_data=.*: no such file"):
        LmText(str(tmp_path / "missing.jsonl"), _Tok())
    with pytest.raises(ValueError, match="loss.distill.lm_data=.*: no usable texts"):
        LmText(_write(tmp_path, ["", "{}", json.dumps({"text": ""})]), _Tok())
