"""Teacher-forced held-out metrics (mgsr/evaluation/teacher_forced.py) against a one-record-at-a-time reference."""

import math

import pytest
import torch

from mgsr.data.tokenizer import build_tokenizer
from mgsr.evaluation.teacher_forced import teacher_forced_metrics
from mgsr.models import build_from_config

RECORDS = [{"prompt": "Say hi to", "output": "hi there friend"},
           {"prompt": "A much longer prompt with many words in it:", "output": "ok"},
           {"prompt": "Count", "output": ["one two three four five", "unused second reference"]}]


@pytest.fixture(scope="module")
def models():
    tok = build_tokenizer([r["prompt"] + " " + str(r["output"]) for r in RECORDS] * 4, vocab_size=300)
    arch = {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 128}
    return tok, build_from_config(arch, tok, seed=1), build_from_config(arch, tok, seed=2)


def _reference(tok, student, teacher):
    """No padding, no batching: one sequence at a time, every response token (EOS included) scored."""
    nll, fkl, n = 0.0, 0.0, 0
    student.eval(), teacher.eval()  # no dropout: the metric is deterministic
    for r in RECORDS:
        ref = r["output"] if isinstance(r["output"], str) else r["output"][0]
        p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        full = tok(r["prompt"] + ref, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([full])
        with torch.no_grad():
            lq = torch.log_softmax(student(input_ids=ids).logits[0].double(), -1)
            lp = torch.log_softmax(teacher(input_ids=ids).logits[0].double(), -1)
        for t in range(len(p), len(full)):  # logits at t-1 predict token t
            nll -= float(lq[t - 1, full[t]])
            fkl += float((lp[t - 1].exp() * (lp[t - 1] - lq[t - 1])).sum())
            n += 1
    return nll / n, fkl / n, n


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_matches_the_unpadded_reference_at_any_batch_size(models, batch_size):
    tok, student, teacher = models
    got = teacher_forced_metrics(student, teacher, tok, RECORDS, batch_size=batch_size)
    nll, fkl, n = _reference(tok, student, teacher)
    assert got["tokens"] == n and got["records"] == 3
    assert got["nll"] == pytest.approx(nll, rel=1e-5)
    assert got["fkl"] == pytest.approx(fkl, rel=1e-4)
    assert got["fkl"] > 0 and got["nll"] > 0


def test_a_model_against_itself_has_zero_fkl_and_no_teacher_gives_none(models):
    tok, student, _ = models
    assert teacher_forced_metrics(student, student, tok, RECORDS)["fkl"] == pytest.approx(0.0, abs=1e-6)
    alone = teacher_forced_metrics(student, None, tok, RECORDS)
    assert alone["fkl"] is None and math.isfinite(alone["nll"])


def test_too_long_prompts_are_left_out_and_modes_restored(models):
    tok, student, teacher = models
    student.train()
    got = teacher_forced_metrics(student, teacher, tok, RECORDS, max_prompt_len=4)
    assert got["records"] < 3
    assert student.training and not teacher.training
