"""Loading is safe by default: no remote code unless the config turns it on, and every checkpoint read with
torch.load(weights_only=True) (the module's checkpoints are built to load that way)."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY, compose_train
from omegaconf import OmegaConf

import mgsr.models as models
from mgsr.data.tokenizer import build_tokenizer
from mgsr.models import build_from_config

ARCH = {"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 64}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(["a tiny corpus for a tiny tokenizer, nothing more."] * 4, vocab_size=300)


class _Recorder:
    def __init__(self, result):
        self.calls, self.result = [], result

    def __call__(self, name, **kwargs):
        self.calls.append((name, kwargs))
        return self.result


def test_load_model_and_tokenizer_default_to_no_remote_code(monkeypatch, tokenizer):
    model_rec = _Recorder(build_from_config(ARCH, tokenizer))
    tok_rec = _Recorder(tokenizer)
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", model_rec)
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", tok_rec)
    models.load_model("org/some-model")
    models.load_tokenizer("org/some-model")
    assert model_rec.calls[0][1]["trust_remote_code"] is False
    assert tok_rec.calls[0][1]["trust_remote_code"] is False


@pytest.mark.parametrize("flag", [None, True])
def test_pipeline_passes_the_config_flag_only(monkeypatch, tokenizer, tmp_path, flag):
    import mgsr.build.student as student_build

    calls = []

    def fake_load_model(name, **kwargs):
        calls.append(kwargs)
        return build_from_config(ARCH, tokenizer)

    monkeypatch.setattr(student_build, "load_model", fake_load_model)
    overrides = [*TINY, f"cache_dir={tmp_path}", "model.student.name_or_path=org/some-model"]
    if flag is not None:
        overrides.append(f"model.trust_remote_code={str(flag).lower()}")
    cfg = compose_train(overrides)
    student_build.build_student(cfg, tokenizer)
    assert calls[0]["trust_remote_code"] is bool(flag)


def test_remote_code_is_off_in_every_shipped_config():
    for path in [*(REPO / "conf" / "model").glob("*.yaml"), REPO / "conf" / "evaluate.yaml"]:
        cfg = OmegaConf.load(path)
        assert cfg.get("trust_remote_code", False) is False, path


def _torch_load_calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
            yield node


def test_every_torch_load_is_weights_only():
    files = [*REPO.glob("mgsr/**/*.py"), *REPO.glob("bench/*.py"), REPO / "train.py", REPO / "evaluate.py"]
    seen = 0
    for path in files:
        for call in _torch_load_calls(path):
            seen += 1
            kw = {k.arg: k.value for k in call.keywords}
            ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
            assert ok, f"{path.relative_to(REPO)}:{call.lineno}: torch.load without weights_only=True"
    assert seen >= 2  # the pipeline's best-checkpoint load and evaluate.py's .ckpt load at least


def test_module_checkpoint_loads_with_weights_only(tokenizer):
    from mgsr.module import DistillModule
    from mgsr.objectives import DacKl

    teacher, student = build_from_config(ARCH, tokenizer, seed=1), build_from_config(ARCH, tokenizer, seed=2)
    module = DistillModule(student, tokenizer, teacher=teacher, distill=DacKl(), span_weight=0.0)
    module.scrg_history["position"].append(0.5)
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])  # teacher weights are not stored
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    fresh = DistillModule(build_from_config(ARCH, tokenizer, seed=3), tokenizer, teacher=teacher,
                          distill=DacKl(), span_weight=0.0)
    fresh.on_load_checkpoint(loaded)  # puts the teacher back so a strict load works
    fresh.load_state_dict(loaded["state_dict"])
    for k, v in student.state_dict().items():
        assert torch.equal(fresh.student.state_dict()[k], v), k
    assert fresh.scrg_history["position"] == [0.5]
