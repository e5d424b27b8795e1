"""`data.max_eval_records` is the one knob that bounds every evaluation of a run: the dev split (validation
loss, val/rougeL, exposure bias), the test split, and every set of the final evaluation."""

import pytest
from conftest import SHARED, compose_train

from mgsr.build.data import build_datamodule, eval_sets
from mgsr.build.evaluate import eval_limit, eval_settings
from mgsr.data.tokenizer import build_tokenizer
from mgsr.evaluation.run import evaluate_sets
from mgsr.models import build_from_config

needs_data = pytest.mark.skipif(not (SHARED / "data" / "dolly").is_dir(), reason="shared data folder not present")


@pytest.mark.parametrize(("limit", "records", "expected"), [(None, None, None), (None, 3, 3), (10, 3, 3), (2, 3, 2),
                                                            (5, None, 5)])
def test_the_final_limit_is_the_smaller_of_eval_limit_and_max_eval_records(limit, records, expected):
    cfg = compose_train([f"eval.limit={'null' if limit is None else limit}",
                         f"data.max_eval_records={'null' if records is None else records}"])
    assert eval_limit(cfg) == expected == eval_settings(cfg).limit


@needs_data
def test_max_eval_records_alone_bounds_dev_test_and_every_final_set(monkeypatch, tmp_path):
    monkeypatch.setenv("MGSR_DATA", str(SHARED / "data"))
    cfg = compose_train(["data=dolly", "data.max_eval_records=3", "data.max_train_records=4",
                         "eval.sets=[vicuna,test,self_inst]", "eval.seeds=[10]", "eval.max_new_tokens=2",
                         "data.max_prompt_len=1024", "data.max_len=1100"])
    tok = build_tokenizer(["a few words of text"] * 4, vocab_size=300)
    dm = build_datamodule(cfg, tok)
    dm.setup("fit")
    assert len(dm.records["val"]) == 3  # validation and exposure bias read these
    sets, _, _ = eval_sets(dm, cfg)
    assert len(sets["vicuna"]) == 80 and len(sets["test"]) == 3  # loaded whole; the limit applies at evaluation
    model = build_from_config({"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 2048}, tok)
    lines = []
    evaluate_sets(model, tok, sets, eval_settings(cfg), log=lines.append)
    assert len(lines) == 3 and all("(3 prompts" in line for line in lines), lines
