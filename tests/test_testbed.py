"""The embedded testbed: cache keys on exactly what determines each stage, the student-init stage every method
starts from, and the design property the comparison relies on (the teacher beats the SFT student)."""

import json

import pytest
from conftest import compose_train

from mgsr.build.student import student_init_path
from mgsr.build.teacher import teacher_cache_path
from mgsr.build.tokenizer import build_tokenizer
from mgsr.pipeline import run


def _keys(tmp_path, *overrides):
    cfg = compose_train([f"cache_dir={tmp_path}", "model.teacher_sft.n_train=300", "data.n_train=100", *overrides])
    tok = build_tokenizer(cfg)
    return teacher_cache_path(cfg, tok).name, student_init_path(cfg, tok).name, tok


def test_cache_keys_follow_what_determines_each_stage(tmp_path):
    teacher, init, _ = _keys(tmp_path)
    # run settings that do not change the weights do not retrain anything
    for o in ("data.batch_size=4", "data.num_workers=1", "data.n_test=50", "trainer.max_steps=7", "loss=kd"):
        assert _keys(tmp_path, o)[:2] == (teacher, init), o
    # the student's split (size, noise) is not the teacher's corpus; the student init depends on it
    for o in ("data.n_train=120", "data.label_noise=0.1"):
        t, i, _ = _keys(tmp_path, o)
        assert t == teacher and i != init, o
    for o in ("model.teacher_sft.max_steps=3", "model.teacher_sft.label_noise=0.1", "model.teacher.arch.n_layer=3"):
        t, i, _ = _keys(tmp_path, o)
        assert t != teacher and i == init, o
    assert _keys(tmp_path, "seed=1")[:2] == (teacher, _keys(tmp_path, "model.student_init.seed=1")[1]) != \
        (teacher, init)  # the init's seed follows the run's by default: one start per training seed
    for o in ("data.seed=1", "model.tokenizer.vocab_size=1024"):  # the data or tokenizer: both stages
        t, i, _ = _keys(tmp_path, o)
        assert t != teacher and i != init, o


def test_tokenizer_key_uses_the_vocabulary_it_is_built_with(tmp_path):
    a = _keys(tmp_path, "model.tokenizer.vocab_size=700")[2]
    b = _keys(tmp_path, "model.tokenizer.vocab_size=900")[2]
    assert len(a) <= 700 < len(b) <= 900 and len(list(tmp_path.glob("tokenizer-*"))) == 2
    # data.tokenizer_vocab_size (Dolly's setting) wins, and the key holds the size actually built
    c = _keys(tmp_path, "model.tokenizer.vocab_size=700", "+data.tokenizer_vocab_size=900")[2]
    assert len(list(tmp_path.glob("tokenizer-*"))) == 2 and c.get_vocab() == b.get_vocab()


def test_every_method_starts_from_the_cached_student_init(tmp_path, tiny_overrides):
    """SFT and KD at one seed load the same init (trained once); from scratch is a switch."""
    import torch

    from mgsr.build.student import build_student

    cache = tmp_path / "cache"
    cfg = compose_train([*tiny_overrides, f"cache_dir={cache}", "model.student_init.max_steps=3"])
    tok = build_tokenizer(cfg)
    a = build_student(cfg, tok)
    assert len(list(cache.glob("student-sft-*"))) == 1
    kd = compose_train([*tiny_overrides, f"cache_dir={cache}", "model.student_init.max_steps=3", "+experiment=baseline_kd"])
    b = build_student(kd, tok)
    assert len(list(cache.glob("student-sft-*"))) == 1  # re-used, not re-trained
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    scratch = build_student(compose_train([*tiny_overrides, f"cache_dir={cache}", "model.student_init.enabled=false"]),
                            tok)
    assert not torch.equal(next(scratch.parameters()), next(a.parameters()))


@pytest.mark.slow
def test_teacher_beats_the_sft_student_on_the_reduced_task(tmp_path):
    """The design: a teacher fitted on a larger clean corpus, a student fitted with SFT on a small noisy split.
    Reduced budget; the student is trained well past convergence on its split (12 epochs)."""
    common = [f"cache_dir={tmp_path / 'cache'}", "logger=csv", "trainer.enable_progress_bar=false",
              "data.n_train=200", "data.n_val=8", "data.n_test=100", "model.teacher_sft.n_train=6000",
              "model.teacher_sft.max_steps=400", "model.student_init.max_steps=300", "eval.seeds=[10]",
              "eval.max_new_tokens=48", "eval.exposure_bias=false"]
    score = {}
    for which in ("teacher", "init"):
        cfg = compose_train([*common, f"+experiment=reference_{which}"])
        res = run(cfg, tmp_path / which)
        assert json.loads((tmp_path / which / "results.json").read_text())["eval_only"] in ("teacher", "student_init")
        score[which] = res["eval"]["summary"]["test"]["rougeL"][0]
    assert score["teacher"] > score["init"] + 5, score
