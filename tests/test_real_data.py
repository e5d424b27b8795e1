"""Real data at the real protocol: Dolly (data=dolly) and the five evaluation sets from ../shared/data, the
tiny tokenizer trained on Dolly text, malformed rows counted, missing files as one clear error, and the
pipeline trained on Dolly and evaluated on named sets."""

import json
from pathlib import Path

import pytest
from conftest import SHARED, compose_train
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from mgsr.build.data import build_datamodule, eval_sets
from mgsr.build.tokenizer import build_tokenizer as pipeline_tokenizer
from mgsr.config import ConfigError
from mgsr.data.jsonl import load_jsonl_records
from mgsr.data.tokenizer import build_tokenizer
from mgsr.evaluation.entry import evaluate_from_config, load_eval_sets, settings_from
from mgsr.models import build_from_config
from mgsr.pipeline import run

REPO = Path(__file__).resolve().parents[1]
DATA = SHARED / "data"
needs_data = pytest.mark.skipif(not (DATA / "dolly").is_dir(), reason="shared data folder not present")
PAPER_SETS = ["dolly", "self_inst", "vicuna", "sinst", "uinst"]
COUNTS = {"dolly": 500, "self_inst": 242, "vicuna": 80, "sinst": 1694, "uinst": 1050}


def compose_eval(overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=overrides)


@pytest.fixture(autouse=True)
def _data_root(monkeypatch):
    monkeypatch.setenv("MGSR_DATA", str(DATA))  # the configs' root, whatever the working directory


@pytest.fixture(scope="module")
def tiny_dolly(tmp_path_factory) -> Path:
    """A Dolly folder in the real format and file names: the first rows of each real split, plus one
    malformed train row (it must be skipped and counted, not crash the run)."""
    out = tmp_path_factory.mktemp("dolly")
    for name, n in (("minillm_train.jsonl", 48), ("minillm_dev.jsonl", 8), ("minillm_test.jsonl", 8)):
        with open(DATA / "dolly" / name) as f:
            lines = [next(f) for _ in range(n)]
        if name == "minillm_train.jsonl":
            lines.insert(5, '{"prompt": "no output here"}\n')
        (out / name).write_text("".join(lines))
    return out


@needs_data
def test_five_eval_sets_load_with_their_record_counts_and_labels():
    cfg = compose_eval(["model_path=unused", "+eval=paper"])
    assert list(cfg.eval_sets) == PAPER_SETS and list(cfg.seeds) == [10, 20, 30, 40, 50]
    assert cfg.no_repeat_ngram_size == 6 and cfg.top_k == 0
    # MiniLLM's bound: 512 in total, prompts padded to 256 -> 256 new tokens for every prompt
    assert cfg.max_length == 512 and cfg.max_prompt_len == 256 and cfg.max_new_tokens is None
    assert settings_from(cfg).sampling().max_new_tokens == 256
    sets, labels, skipped = load_eval_sets(cfg)
    assert {k: len(v) for k, v in sets.items()} == COUNTS
    assert labels == {"dolly": "Dolly", "self_inst": "SelfInst", "vicuna": "Vicuna", "sinst": "S-NI",
                      "uinst": "U-NI subset"}
    assert skipped == dict.fromkeys(PAPER_SETS, {})
    assert cfg.sets.uinst.max_records == 10000  # MiniLLM evaluates the first <= 10,000 U-NI records
    assert max(len(r["references"]) for r in sets["sinst"]) > 1  # S-NI: several references, max over them
    assert all(r["prompt"].endswith("### Response:\n") for s in sets.values() for r in s)


@needs_data
def test_eval_set_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ConfigError, match=str(missing)):
        load_eval_sets(compose_eval(["model_path=x", "eval_sets=[vicuna]", f"sets.vicuna.path={missing}"]))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty.jsonl"):
        load_eval_sets(compose_eval(["model_path=x", "eval_sets=[vicuna]", f"sets.vicuna.path={empty}"]))
    with pytest.raises(ConfigError, match="unknown eval set 'nope'"):
        load_eval_sets(compose_eval(["model_path=x", "eval_sets=[nope]"]))


@needs_data
def test_dolly_config_gives_the_minillm_splits():
    cfg = compose_train(["data=dolly"])
    assert Path(cfg.data.path) == DATA / "dolly" and cfg.data.source == "jsonl"
    assert (cfg.data.max_prompt_len, cfg.data.max_len) == (256, 512)  # METHOD.md 6
    sizes = {s: len(load_jsonl_records(str(Path(cfg.data.path) / cfg.data[f"{s}_file"])).records)
             for s in ("train", "val", "test")}
    assert sizes == {"train": 11435, "val": 1000, "test": 500}
    assert list(cfg.data.eval_sets) == PAPER_SETS
    tok = build_tokenizer(["Below is an instruction. ### Response:\nOK"] * 4, vocab_size=300)
    dm = build_datamodule(cfg, tok, max_eval_records=40)  # run-level keys (eval_sets, ...) are not passed on
    dm.setup("validate")
    assert dm.stats["val"]["prompt_too_long"] > 0  # a 300-token BPE needs many tokens: dropped and counted
    assert len(dm.records["val"]) + dm.stats["val"]["prompt_too_long"] == 40


@needs_data
def test_tiny_tokenizer_is_trained_on_dolly_text_and_cached_by_source(tmp_path, tiny_dolly):
    base = [f"cache_dir={tmp_path}", "data=dolly", f"data.path={tiny_dolly}", "data.tokenizer_vocab_size=2000"]
    tok = pipeline_tokenizer(compose_train(base))
    assert len(tok) <= 2000 and len(list(tmp_path.glob("tokenizer-*"))) == 1
    synthetic = pipeline_tokenizer(compose_train([f"cache_dir={tmp_path}", "model.tokenizer.vocab_size=2000"]))
    assert len(list(tmp_path.glob("tokenizer-*"))) == 2  # keyed on the data source: never the other's
    text = "".join(r["prompt"] + r["references"][0]
                   for r in load_jsonl_records(str(tiny_dolly / "minillm_train.jsonl")).records)

    def n_tokens(t):
        return len(t(text, add_special_tokens=False)["input_ids"])

    assert n_tokens(tok) < 0.8 * n_tokens(synthetic)  # fitted to Dolly's text, not the synthetic task's
    again = pipeline_tokenizer(compose_train(base))  # cached: same vocabulary, nothing retrained
    assert again.get_vocab() == tok.get_vocab() and len(list(tmp_path.glob("tokenizer-*"))) == 2


@needs_data
def test_final_eval_sets_resolution(tmp_path, tiny_dolly):
    cfg = compose_train([f"cache_dir={tmp_path}", "data=dolly", f"data.path={tiny_dolly}"])
    tok = build_tokenizer(["x"], vocab_size=300)
    dm = build_datamodule(cfg, tok, max_prompt_len=4096)
    sets, labels, skipped = eval_sets(dm, cfg)
    assert list(sets) == PAPER_SETS and labels["uinst"] == "U-NI subset"
    with open_dict(cfg):
        cfg.eval.sets = ["vicuna", "test"]
    sets, labels, _ = eval_sets(dm, cfg)
    assert list(sets) == ["vicuna", "test"] and len(sets["test"]) == 8 and len(sets["vicuna"]) == 80
    with open_dict(cfg):
        cfg.sets.vicuna.path = str(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="missing.jsonl"):
        eval_sets(dm, cfg)


@needs_data
def test_evaluate_over_the_five_sets_and_a_malformed_one(tmp_path):
    """evaluate.py's path: a saved model, all five sets + one with malformed rows, two seeds, a small limit."""
    corpus = [r["prompt"] + r["references"][0] for name in ("dolly", "sinst")
              for r in load_eval_sets(compose_eval(["model_path=x", f"eval_sets=[{name}]"]))[0][name][:150]]
    tok = build_tokenizer(corpus, vocab_size=2000)
    model_dir = tmp_path / "model"
    build_from_config({"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 1024}, tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q?", "output": "A."}\nnot json\n{"prompt": "Q2?"}\n{"prompt": "Q3?", "output": 7}\n')
    cfg = compose_eval([f"model_path={model_dir}", "+eval=paper", "eval_sets=[dolly,self_inst,vicuna,sinst,uinst,bad]",
                        f"+sets.bad={{path: {bad}, label: Bad}}", "seeds=[10,20]", "limit=2", "max_new_tokens=4",
                        "max_length=null", "max_prompt_len=512", "device=cpu"])
    res = evaluate_from_config(cfg, tmp_path / "out", log=lambda *_: None)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["skipped_rows"]["bad"] == {"bad_output": 1, "invalid_json": 1, "missing_field": 1}
    assert all(saved["skipped_rows"][s] == {} for s in PAPER_SETS)
    header = res["table"].splitlines()[0]
    assert header == "| metric | Dolly | SelfInst | Vicuna | S-NI | U-NI subset | Bad | Average |"
    assert set(saved["per_seed"]["sinst"]) == {"10", "20"}
    row = next(line for line in res["table"].splitlines() if line.startswith("| rougeL"))
    assert row.count("±") == 7


@needs_data
@pytest.mark.slow  # teacher SFT + MGSR steps + evaluation on Dolly
def test_train_on_dolly_subset_and_evaluate_named_sets(tmp_path, tiny_dolly, cache_dir):
    """The pipeline on Dolly-format files with model=tiny: tokenizer from Dolly text, teacher SFT on it,
    MGSR steps, final evaluation on named real sets with their labels; the malformed row is counted."""
    cfg = compose_train([
        "data=dolly", f"data.path={tiny_dolly}", f"cache_dir={cache_dir}", "data.tokenizer_vocab_size=2000",
        "data.max_len=144", "data.max_prompt_len=128", "data.batch_size=4", "model.teacher_sft.max_steps=2", "model.student_init.max_steps=2",
        "model.teacher_sft.batch_size=4",
        "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "val_generate=2",
        "eval.sets=[dolly,uinst]", "eval.seeds=[10]", "eval.limit=2", "eval.max_new_tokens=4",
        "eval.exposure_bias=false", "scrg.sampling.max_new_tokens=4", "logger=csv", "trainer.enable_progress_bar=false",
    ])
    res = run(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["data_stats"]["train"]["missing_field"] == 1  # the malformed row, counted
    assert saved["data_stats"]["train"].get("prompt_too_long", 0) > 0  # over-long prompts dropped, counted
    assert list(saved["eval"]["summary"]) == ["dolly", "uinst", "Average"]
    assert res["table"].splitlines()[0] == "| metric | Dolly | U-NI subset | Average |"
    assert (tmp_path / "run" / "student" / "tokenizer.json").is_file()


@needs_data
def test_dolly_from_the_hub_when_there_is_no_local_copy(tmp_path, monkeypatch):
    """No files at data.path: MiniLLM/dolly's raw.jsonl (dev = first 1,000 rows, train = the rest) and
    valid.jsonl (test) are fetched into the cache in the local layout. The download is faked offline."""
    import huggingface_hub

    from mgsr.build.data import resolve_data_path

    dolly = DATA / "dolly"
    raw = tmp_path / "raw.jsonl"
    train_head = (dolly / "minillm_train.jsonl").read_text().splitlines(keepends=True)[:20]
    raw.write_text((dolly / "minillm_dev.jsonl").read_text() + "".join(train_head))
    calls = []

    def fake_download(repo_id, filename, repo_type=None, revision=None):
        calls.append((repo_id, filename, repo_type))
        return str(raw if filename == "raw.jsonl" else dolly / "minillm_test.jsonl")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    overrides = ["data=dolly", f"data.path={tmp_path / 'absent'}", f"cache_dir={tmp_path / 'cache'}"]
    cfg = compose_train(overrides)
    resolve_data_path(cfg)
    got = Path(cfg.data.path)
    assert calls == [("MiniLLM/dolly", "raw.jsonl", "dataset"), ("MiniLLM/dolly", "valid.jsonl", "dataset")]
    assert (got / "minillm_dev.jsonl").read_text() == (dolly / "minillm_dev.jsonl").read_text()
    assert (got / "minillm_train.jsonl").read_text() == "".join(train_head)
    assert len(load_jsonl_records(str(got / "minillm_test.jsonl")).records) == 500

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    cfg = compose_train([*overrides[:2], f"cache_dir={tmp_path / 'other'}"])
    with pytest.raises(ConfigError, match="absent not found and fetching MiniLLM/dolly") as err:
        resolve_data_path(cfg)
    assert "\n" not in str(err.value)
