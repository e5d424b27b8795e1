"""`data.prompt_format=chat`: prompts rendered by the tokenizer's chat template (instruction and input in one
user turn, then the assistant's generation prompt), and the template's end-of-turn token as the EOS that ends
every training target and stops generation. Offline: a small BPE given SmolLM2's ChatML template."""

import json

import pytest
from conftest import REPO, SHARED, compose_train
from omegaconf import open_dict

from mgsr.build.data import eval_sets
from mgsr.config import ConfigError
from mgsr.data.collate import encode_records
from mgsr.data.datamodule import DistillDataModule
from mgsr.data.prompt import build_prompt, end_of_turn_token, format_records, use_prompt_format
from mgsr.data.tokenizer import build_tokenizer
from mgsr.generation import SamplingConfig
from mgsr.models import build_from_config
from mgsr.module import DistillModule
from mgsr.pipeline import run

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture
def chat_tok():
    tok = build_tokenizer(["Name a colour. Red is a colour.", "Sum the numbers: 2 3. The sum is 5."] * 20,
                          vocab_size=400)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


RECORDS = [{"instruction": "Sum the numbers", "input": "2 3", "prompt": build_prompt("Sum the numbers", "2 3"),
            "references": ["The sum is 5."]},
           {"instruction": "Name a colour.", "input": "", "prompt": build_prompt("Name a colour."),
            "references": ["Red."]}]


def test_chat_prompt_is_one_user_turn_then_the_generation_prompt(chat_tok):
    out = format_records(RECORDS, chat_tok, "chat")
    assert out[0]["prompt"] == ("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
                                "<|im_start|>user\nSum the numbers\n\n2 3<|im_end|>\n<|im_start|>assistant\n")
    assert out[1]["prompt"].endswith("<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n")
    assert RECORDS[0]["prompt"].startswith("Below is an instruction")  # the input records are not modified
    assert format_records(RECORDS, chat_tok, "alpaca") is RECORDS
    only_prompt = format_records([{"prompt": "Q?", "references": ["A"]}], chat_tok, "chat")[0]["prompt"]
    assert "<|im_start|>user\nQ?<|im_end|>" in only_prompt


def test_end_of_turn_becomes_the_eos_of_training_targets_and_generation(chat_tok):
    assert chat_tok.eos_token == "<|endoftext|>"
    assert end_of_turn_token(chat_tok) == "<|im_end|>"
    use_prompt_format(chat_tok, "chat")
    eot = chat_tok.convert_tokens_to_ids("<|im_end|>")
    assert chat_tok.eos_token_id == eot
    feats = encode_records(chat_tok, format_records(RECORDS, chat_tok, "chat"), max_prompt_len=200, max_len=300)
    for f, r in zip(feats, RECORDS):
        assert f["response_ids"][-1] == eot  # the training target ends the assistant turn
        assert chat_tok.decode(f["response_ids"][:-1]) == r["references"][0]
    student = build_from_config({"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 256}, chat_tok)
    module = DistillModule(student, chat_tok, sft_weight=1.0, distill_weight=0.0, span_weight=0.0,
                           val_sampling=SamplingConfig(max_new_tokens=4))
    assert module.eos_id == eot  # SCRG rollouts, validation sampling and evaluation stop on it


def test_datamodule_serves_chat_prompts(chat_tok, tmp_path):
    for split in ("train", "dev", "test"):
        rows = [{"instruction": r["instruction"], "input": r["input"], "output": r["references"][0]} for r in RECORDS]
        (tmp_path / f"minillm_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    use_prompt_format(chat_tok, "chat")
    dm = DistillDataModule(chat_tok, source="jsonl", path=str(tmp_path), prompt_format="chat", batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert all(p.startswith("<|im_start|>system") and p.endswith("<|im_start|>assistant\n") for p in batch["prompts"])
    P = batch["prompt_len"]
    last = [row[m].tolist()[-1] for row, m in zip(batch["input_ids"][:, P:], batch["response_mask"][:, P:])]
    assert last == [chat_tok.eos_token_id] * 2


@pytest.mark.skipif(not (SHARED / "data" / "vicuna").is_dir(), reason="shared data folder not present")
def test_final_evaluation_sets_get_the_chat_format_too(chat_tok, tmp_path, monkeypatch):
    monkeypatch.setenv("MGSR_DATA", str(SHARED / "data"))
    use_prompt_format(chat_tok, "chat")
    cfg = compose_train(["data=dolly", "eval.sets=[vicuna]"])
    dm = DistillDataModule(chat_tok, source="synthetic", n_train=4, n_val=2, n_test=2, prompt_format="chat")
    sets, _, _ = eval_sets(dm, cfg)
    assert all(r["prompt"].startswith("<|im_start|>system") for r in sets["vicuna"])


def test_chat_format_with_a_tokenizer_without_template_is_one_config_error(tmp_path, tiny_overrides):
    cfg = compose_train([*tiny_overrides, "data.prompt_format=chat"])
    with pytest.raises(ConfigError, match="has no chat template; use prompt_format=alpaca"):
        run(cfg, tmp_path / "run")
    with open_dict(cfg):
        cfg.data.prompt_format = "markdown"
    from mgsr.build.validate import validate

    with pytest.raises(ConfigError, match="data.prompt_format='markdown': choose one of alpaca, chat"):
        validate(cfg)
    assert not list((tmp_path / "run").glob("checkpoints/*"))


def test_evaluate_py_applies_the_chat_format(chat_tok, tmp_path):
    from hydra import compose, initialize_config_dir

    from mgsr.evaluation.entry import evaluate_from_config

    model_dir = tmp_path / "model"
    build_from_config({"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 256}, chat_tok).save_pretrained(model_dir)
    chat_tok.save_pretrained(model_dir)
    data = tmp_path / "set.jsonl"
    data.write_text(json.dumps({"instruction": "Name a colour.", "input": "", "output": "Red."}) + "\n")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"model_path={model_dir}", "eval_sets=[mine]", f"+sets.mine={{path: {data}}}",
                                             "seeds=[10]", "max_new_tokens=2", "device=cpu", "prompt_format=chat"])
    res = evaluate_from_config(cfg, tmp_path / "out", log=lambda *_: None)
    assert res["samples"]["mine"][0]["prompt"].endswith("<|im_start|>user\nName a colour.<|im_end|>\n"
                                                          "<|im_start|>assistant\n")
