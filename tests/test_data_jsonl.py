"""The prompt template and MiniLLM-format JSONL loading: skip-and-count of malformed rows, clear errors,
the real Dolly / S-NI files, and the JSONL source of the datamodule."""

import json
import logging
import os

import pytest

from mgsr.data.datamodule import DistillDataModule
from mgsr.data.jsonl import load_jsonl_records
from mgsr.data.prompt import build_prompt
from mgsr.data.synthetic import make_synthetic_splits, synthetic_corpus
from mgsr.data.tokenizer import build_tokenizer

DATA = "/work/shared/data"
DOLLY_TEST = f"{DATA}/dolly/minillm_test.jsonl"
SNI = f"{DATA}/sni/minillm_sinst_11_.jsonl"
needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason="shared data folder not present")


@needs_data
def test_build_prompt_reproduces_dolly_prompts():
    with open(DOLLY_TEST) as f:
        rows = [json.loads(next(f)) for _ in range(20)]
    assert any(r["input"] for r in rows) and any(not r["input"] for r in rows)  # both template variants
    for r in rows:
        assert build_prompt(r["instruction"], r["input"]) == r["prompt"]


def test_build_prompt_variants():
    assert build_prompt("Do X.") == build_prompt("Do X.", "")
    assert "### Input:\nctx\n\n### Response:\n" in build_prompt("Do X.", "ctx")
    assert "### Input" not in build_prompt("Do X.")
    assert build_prompt("Do X.").endswith("### Instruction:\nDo X.\n\n### Response:\n")


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_malformed_rows_are_skipped_and_counted(tmp_path, caplog):
    good = {"prompt": "P1", "output": "O1"}
    lines = [
        json.dumps(good),
        '{"prompt": "P2", "output": ',  # truncated JSON
        "not json at all",
        json.dumps({"prompt": "P3"}),  # missing output
        json.dumps({"prompt": "P4", "output": ""}),  # empty output
        json.dumps({"prompt": "P5", "output": ["", "  "]}),  # only empty references
        json.dumps({"prompt": 17, "output": "O6"}),  # non-string prompt
        json.dumps({"prompt": "P7", "output": [1, 2]}),  # non-string references
        json.dumps(["a", "list"]),  # not an object
        "",  # blank lines are ignored, not counted
        json.dumps({"instruction": "Name a fruit.", "input": "", "output": ["apple", "pear"]}),
    ]
    with caplog.at_level(logging.WARNING, logger="mgsr.data.jsonl"):
        res = load_jsonl_records(_write(tmp_path / "d.jsonl", lines))
    assert res.skipped == {"bad_output": 1, "bad_prompt": 1, "empty_output": 2, "invalid_json": 2,
                           "missing_field": 1, "not_an_object": 1}
    assert [r["prompt"] for r in res.records] == ["P1", build_prompt("Name a fruit.")]
    assert res.records[0]["references"] == ["O1"] and res.records[1]["references"] == ["apple", "pear"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "invalid_json" in warnings[0].getMessage()  # one summary, not one per row


def test_valid_file_logs_no_warning_and_respects_max_records(tmp_path, caplog):
    path = _write(tmp_path / "ok.jsonl", [json.dumps({"prompt": f"P{i}", "output": "O"}) for i in range(5)])
    with caplog.at_level(logging.WARNING, logger="mgsr.data.jsonl"):
        res = load_jsonl_records(path, max_records=3)
    assert [r["prompt"] for r in res.records] == ["P0", "P1", "P2"] and res.skipped == {}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_missing_file_error_names_the_setting(tmp_path):
    path = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="data file not found: .*nope.jsonl .*set data.path"):
        load_jsonl_records(path)


def test_empty_or_all_invalid_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no usable records in .*empty.jsonl"):
        load_jsonl_records(_write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(ValueError, match=r"no usable records in .*bad.jsonl: .*'invalid_json': 2"):
        load_jsonl_records(_write(tmp_path / "bad.jsonl", ["{", "}"]))


@needs_data
def test_dolly_test_set_loads_completely():
    res = load_jsonl_records(DOLLY_TEST)
    assert len(res.records) == 500 and res.skipped == {}
    assert all(len(r["references"]) == 1 for r in res.records)


@needs_data
def test_sni_loads_with_list_outputs():
    res = load_jsonl_records(SNI)
    assert len(res.records) == 1694 and res.skipped == {}
    assert all(isinstance(r["output"], list) for r in res.records)
    assert all(r["references"] == r["output"] for r in res.records)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(synthetic_corpus(make_synthetic_splits(0, 200, 10, 10)["train"]), vocab_size=500)


def test_datamodule_jsonl_source_counts_drops(tmp_path, tok):
    short = {"instruction": "Name a fruit.", "input": "", "output": "An apple."}
    long_ = {"instruction": "Name a fruit. " * 40, "input": "", "output": "A pear."}
    _write(tmp_path / "train.jsonl", [json.dumps(short)] * 3 + [json.dumps(long_), "{broken"])
    _write(tmp_path / "val.jsonl", [json.dumps(short)])
    dm = DistillDataModule(tok, source="jsonl", path=str(tmp_path), train_file="train.jsonl",
                           val_file="val.jsonl", max_prompt_len=100, batch_size=2)
    dm.setup("fit")
    assert dm.stats["train"] == {"invalid_json": 1, "prompt_too_long": 1}
    assert dm.stats["val"] == {}
    assert len(dm.records["train"]) == len(dm.datasets["train"]) == 3
    assert "test" not in dm.datasets  # only the splits the stage needs are read
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 2 and batch["references"][0] == ["An apple."]
    with pytest.raises(FileNotFoundError, match="minillm_test.jsonl"):
        dm.setup("test")  # default Dolly file name, absent from tmp_path


@needs_data
def test_datamodule_reads_dolly_eval_split(tok):
    dm = DistillDataModule(tok, source="jsonl", path=f"{DATA}/dolly", max_eval_records=40, max_prompt_len=256)
    dm.setup("test")
    kept, dropped = len(dm.records["test"]), sum(dm.stats["test"].values())
    assert kept + dropped == 40 and set(dm.stats["test"]) <= {"prompt_too_long"}
    first = next(iter(dm.test_dataloader()))
    assert first["prompts"][0] == dm.records["test"][0]["prompt"]
