"""The paper's baselines in the shared harness: every conf/experiment/baseline_*.yaml runs end to end, student
generation happens exactly when a baseline says so, SeqKD's teacher samples are cached once, DistiLLM's
adaptive schedule and its checkpointed state, vocabulary padding rows, tokenizer mismatch, and gradient
accumulation normalisation."""

import json
import math
import types
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO, compose_train
from transformers import GPT2Config, GPT2LMHeadModel

import mgsr.scrg
import mgsr.seqkd
from mgsr.build.data import build_datamodule
from mgsr.build.teacher import check_teacher_tokenizer
from mgsr.build.tokenizer import build_tokenizer
from mgsr.config import ConfigError
from mgsr.data.collate import Collator
from mgsr.losses.divergences import DIVERGENCES, forward_kl
from mgsr.models import build_from_config
from mgsr.module import DistillModule
from mgsr.objectives import Divergence
from mgsr.pipeline import run
from mgsr.sequences import AdaptiveOffPolicy, LinearStudentProb, SequenceSource

EXPERIMENTS = sorted(p.stem.removeprefix("baseline_") for p in (REPO / "conf" / "experiment").glob("baseline_*.yaml"))
STEPS = 3  # one validation, at the end: the schedules' coin flips below are not disturbed by it
STUDENT_GENERATES = {"gkd", "imitkd", "distillm"}


def _coin_flips(n: int, seed: int = 0) -> list[float]:
    """The per-step uniforms the sequence callbacks draw (their generator is seeded with seed + 7)."""
    g = torch.Generator().manual_seed(seed + 7)
    return [float(torch.rand((), generator=g)) for _ in range(n)]


def _expected_student_steps(name: str) -> int:
    u = _coin_flips(STEPS)
    if name == "gkd":  # lambda = 0.5, fresh samples every time
        return sum(x < 0.5 for x in u)
    if name == "imitkd":  # P(student) = t / T
        return sum(x < t / STEPS for t, x in enumerate(u))
    if name == "distillm":  # phi = 0.5 (set below), buffer never full: fresh whenever u < phi
        return sum(x < 0.5 for x in u)
    return 0


@pytest.fixture
def count_generation(monkeypatch):
    """Counts the sampler calls of training rollouts (mgsr.scrg) and of SeqKD's teacher (mgsr.seqkd)."""
    calls = {"student": 0, "teacher": 0}

    def wrap(fn, key):
        def counted(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return counted

    monkeypatch.setattr(mgsr.scrg, "generate", wrap(mgsr.scrg.generate, "student"))
    monkeypatch.setattr(mgsr.seqkd, "generate", wrap(mgsr.seqkd.generate, "teacher"))
    return calls


# -- every baseline from its experiment name --------------------------------------------------------------------
def test_all_paper_baselines_have_an_experiment():
    assert {"sft", "kd", "seqkd", "gkd", "imitkd", "distillm"} <= set(EXPERIMENTS)
    for name in EXPERIMENTS:
        text = (REPO / "conf" / "experiment" / f"baseline_{name}.yaml").read_text()
        assert text.startswith("# @package _global_")
        assert f"python train.py +experiment=baseline_{name}" in text  # the run command in the header
        assert compose_train([f"+experiment=baseline_{name}"]).name == name


@pytest.mark.slow  # a pipeline run per baseline
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_baseline_runs_end_to_end(name, tmp_path, tiny_overrides, count_generation):
    extra = ["scrg.schedule.init=0.5"] if name == "distillm" else []  # phi starts at 0: give it something to do
    cfg = compose_train([*tiny_overrides, f"+experiment=baseline_{name}", f"trainer.max_steps={STEPS}", *extra])
    res = run(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["name"] == name
    assert 0.0 <= saved["eval"]["summary"]["test"]["rougeL"][0] <= 100.0
    header = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()[0]

    # student generation happens exactly on the steps the baseline's schedule picks, and never for the others
    assert count_generation["student"] == _expected_student_steps(name)
    if name in STUDENT_GENERATES:
        assert count_generation["student"] > 0
        assert "kd/fkl" in header  # the true forward KL, whatever the divergence optimised
    if name == "seqkd":
        n_train, bs = int(cfg.data.n_train), int(cfg.seqkd.batch_size)
        assert count_generation["teacher"] == math.ceil(n_train / bs)
        assert Path(res["seqkd"]["cache"]).is_file() and res["seqkd"]["n"] == n_train
    else:
        assert count_generation["teacher"] == 0
    if name == "kd":
        assert "kd/fkl" in header and "train/sft" in header
    if name == "taid":  # t and its momentum are module buffers: in the checkpoint, t raised by the schedule
        ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        state = ckpt["state_dict"]
        assert float(state["distill.t"]) > float(cfg.loss.distill.t_start) and "distill.momentum" in state
        assert "taid/t" in header
    if name == "abkd":
        assert "kd/ab" in header and "kd/fkl" in header
    if name == "distillm":  # phi, the reference loss and the replay buffer are in the checkpoint
        ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        state = ckpt["sequence_source"]
        assert state["schedule"]["phi"] == 0.5 and state["schedule"]["reference"] is not None
        assert len(state["buffer"]["items"]) == cfg.data.batch_size * state["counts"]["fresh"] > 0
        fresh = SequenceSource(AdaptiveOffPolicy(), buffer_capacity=1000)
        fresh.load_state_dict(state)
        assert fresh.schedule.phi == 0.5 and len(fresh.buffer) == len(state["buffer"]["items"])
        assert "sched/student_prob" in header


def test_seqkd_cache_is_created_once_and_reused(tmp_path, tiny_overrides, count_generation):
    # its own cache dir: the stand-in teacher below must not leave samples where a real run would find them
    cfg = compose_train([*tiny_overrides, "+experiment=baseline_seqkd", "data.n_train=24", "seqkd.batch_size=8",
                         f"cache_dir={tmp_path}"])
    tok = build_tokenizer(cfg)
    teacher_builds = []

    def get_teacher():  # any teacher will do for caching; a tiny random one keeps the test fast
        teacher_builds.append(1)
        return build_from_config({"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 512}, tok, seed=0).eval()

    first, second = build_datamodule(cfg, tok), build_datamodule(cfg, tok)
    first.setup("fit")
    gold = [list(f["response_ids"]) for f in first.datasets["train"].features]
    a = mgsr.seqkd.apply_seqkd(cfg, tok, first, get_teacher)
    assert a["generated"] and count_generation["teacher"] == 3 and teacher_builds == [1]
    b = mgsr.seqkd.apply_seqkd(cfg, tok, second, get_teacher)
    assert not b["generated"] and b["cache"] == a["cache"]
    assert count_generation["teacher"] == 3 and teacher_builds == [1]  # neither sampled nor even loaded again
    feats = [f["response_ids"] for f in second.datasets["train"].features]
    assert feats == [f["response_ids"] for f in first.datasets["train"].features]
    assert feats != gold  # the teacher's samples replaced the gold responses
    assert not list(Path(a["cache"]).parent.glob("seqkd-*.tmp*"))  # written atomically
    # another sampling setting is another cache entry
    other = compose_train([*tiny_overrides, "+experiment=baseline_seqkd", "data.n_train=24", "seqkd.batch_size=8",
                           f"cache_dir={tmp_path}", "seqkd.sampling.temperature=0.7"])
    assert mgsr.seqkd.cache_path(other, tok) != Path(a["cache"])


# -- DistiLLM / ImitKD schedules --------------------------------------------------------------------------------
def test_distillm_probability_rises_only_when_validation_loss_rises():
    s = AdaptiveOffPolicy(init=0.0, step=0.1, eps=0.1)
    assert not s.observe(3.0)  # the reference (before training)
    assert not s.observe(2.5) and s.phi == 0.0  # falling loss: no student data
    assert s.observe(3.15) and s.phi == pytest.approx(0.1)  # >= reference + eps: rises, new reference
    assert not s.observe(3.2) and s.phi == pytest.approx(0.1)  # within eps of the new reference
    assert s.observe(3.3) and s.phi == pytest.approx(0.2)
    for v in range(20):
        s.observe(10.0 + v)
    assert s.phi == 1.0  # capped


def test_distillm_decisions_follow_phi_and_buffer():
    s = AdaptiveOffPolicy(init=0.4)
    kw = {"total": 100, "capacity": 10}
    assert s.decide(lambda: 0.5, step=0, buffer_len=0, **kw) == "gold"  # u >= phi
    assert s.decide(lambda: 0.3, step=50, buffer_len=3, **kw) == "fresh"  # buffer not full yet
    assert s.decide(lambda: 0.3, step=50, buffer_len=10, **kw) == "replay"  # full, u >= phi * (1 - t/T) = 0.2
    assert s.decide(lambda: 0.1, step=50, buffer_len=10, **kw) == "fresh"  # u < 0.2
    assert s.decide(lambda: 0.1, step=100, buffer_len=10, **kw) == "replay"  # end of training: all replay
    lin = LinearStudentProb(0.0, 1.0)
    assert lin.prob(0, 10) == 0.0 and lin.prob(5, 10) == 0.5 and lin.prob(20, 10) == 1.0
    assert lin.decide(lambda: 0.4, step=5, total=10, buffer_len=0, capacity=8, trigger=True) == "fresh"
    assert lin.decide(lambda: 0.6, step=5, total=10, buffer_len=0, capacity=8, trigger=True) == "gold"


def test_source_feeds_validation_loss_to_the_schedule_and_restores_state(tmp_path):
    src = SequenceSource(AdaptiveOffPolicy(), buffer_capacity=4, seed=3)
    for loss in (2.0, 1.0, 2.5):
        src.observe({"val/sft": torch.tensor(loss)})
    assert src.schedule.phi == pytest.approx(0.1) and src.schedule.reference == 2.5
    src.observe({"val/rougeL": torch.tensor(9.0)})  # not the monitored value: ignored
    assert src.schedule.phi == pytest.approx(0.1) and len(src.schedule.history) == 3

    ids = torch.tensor([[0, 5, 6, 7, 1], [4, 5, 8, 1, 0]])
    src.buffer.add({"input_ids": ids, "attention_mask": (ids != 0).long(),
                    "response_mask": torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 0]]).bool(), "prompt_len": 2})
    src.choose(step=0, total=10)
    torch.save(src.state_dict(), tmp_path / "src.pt")
    restored = SequenceSource(AdaptiveOffPolicy(), buffer_capacity=4, seed=99)
    restored.load_state_dict(torch.load(tmp_path / "src.pt", weights_only=True))
    assert restored.schedule.state_dict() == src.schedule.state_dict() and restored.counts == src.counts
    assert torch.equal(restored._gen.get_state(), src._gen.get_state())
    a, b = src.buffer.sample(3, pad_id=0), restored.buffer.sample(3, pad_id=0)
    assert torch.equal(a["input_ids"], b["input_ids"])  # the same replay draws after resume
    assert [src.choose(s, 10) for s in range(5)] == [restored.choose(s, 10) for s in range(5)]


def test_module_skips_the_sanity_check_and_feeds_real_validations(monkeypatch):
    from mgsr.module import DistillModule

    src = SequenceSource(AdaptiveOffPolicy())
    fake = types.SimpleNamespace(sequences=src, trainer=types.SimpleNamespace(sanity_checking=True,
                                                                              callback_metrics={"val/sft": 3.0}))
    DistillModule.on_validation_end(fake)
    assert src.schedule.reference is None  # the sanity check is not a validation
    fake.trainer.sanity_checking = False
    DistillModule.on_validation_end(fake)
    assert src.schedule.reference == 3.0


# -- loss groups: every divergence has one, logging the true forward KL -----------------------------------------
def test_divergence_loss_groups_log_true_kl():
    from hydra.utils import instantiate

    torch.manual_seed(0)
    t, s = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    true_fkl = float((forward_kl(t, s) * mask).sum() / mask.sum())
    for name in DIVERGENCES:
        cfg = compose_train(["loss=distill_only", f"loss/distill={name}"])
        assert cfg.loss.sft_weight == 0.0 and cfg.loss.distill_weight == 1.0 and cfg.loss.span is None
        loss, logs = instantiate(cfg.loss.distill)(t, s, mask)
        assert torch.isfinite(loss) and logs["fkl"] == pytest.approx(true_fkl, rel=1e-5)
    kd = compose_train(["loss=kd"]).loss
    assert (kd.sft_weight, kd.distill_weight, kd.distill.name) == (0.5, 0.5, "fkl")


# -- vocabulary: padding rows are fine, a different tokenizer is one clear error --------------------------------
class _Tok:
    """Just what DistillModule reads from a tokenizer: 60 real tokens, EOS = PAD = 0."""

    pad_token_id = eos_token_id = 0

    def __len__(self):
        return 60


def _gpt2(vocab: int, seed: int, layers: int = 1, positions: int = 64):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=32, n_layer=layers, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def _features(lengths: list[tuple[int, int]], seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_ids": torch.randint(1, 60, (p,), generator=g).tolist(),
             "response_ids": torch.randint(1, 60, (r,), generator=g).tolist() + [0], "prompt": "", "references": []}
            for p, r in lengths]


def _fit_one_step(module, features, batch_size: int, accumulate: int) -> dict[str, torch.Tensor]:
    grads = {}

    class Grab(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.update({n: p.grad.clone() for n, p in pl_module.student.named_parameters() if p.grad is not None})

    loader = torch.utils.data.DataLoader(features, batch_size=batch_size, shuffle=False, collate_fn=Collator(0))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, accumulate_grad_batches=accumulate, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[Grab()])
    trainer.fit(module, train_dataloaders=loader)
    return grads


def test_kd_step_with_padded_vocabulary_rows():
    """Teacher has 64 output rows, student 72, tokenizer 60 tokens: logits are cut to the shared 60."""
    teacher, student = _gpt2(64, 0, layers=2), _gpt2(72, 1)
    module = DistillModule(student, _Tok(), teacher=teacher, sft_weight=0.0, distill=Divergence("fkl"),
                           distill_weight=1.0, span_weight=0.0, val_generate=0)
    assert module.vocab == 60
    batch = Collator(0)(_features([(3, 4), (5, 2)]))
    loss, _ = module._distill_terms(batch)
    P = batch["prompt_len"]
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)).logits[:, P - 1:-1, :60]
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)).logits[:, P - 1:-1, :60]
    mask = batch["response_mask"][:, P:]
    assert loss.item() == pytest.approx(float((forward_kl(t, s) * mask).sum() / mask.sum()), rel=1e-5)
    loss.backward()
    assert student.lm_head.weight.grad[60:].abs().max() == 0  # padding rows get no signal from the teacher
    assert student.lm_head.weight.grad[:60].abs().max() > 0
    student.zero_grad()
    grads = _fit_one_step(module, _features([(3, 4), (5, 2), (4, 4), (2, 6)]), batch_size=4, accumulate=1)
    assert all(torch.isfinite(g).all() for g in grads.values())  # a real Lightning step runs

    with pytest.raises(ValueError, match="output rows"):  # fewer rows than tokens: not padding, a wrong model
        DistillModule(_gpt2(72, 2), _Tok(), teacher=_gpt2(50, 3), distill=Divergence("fkl"), span_weight=0.0)


def test_tokenizer_mismatch_is_one_clear_error(tmp_path, tiny_overrides):
    from mgsr.data.tokenizer import build_tokenizer as train_bpe

    other = train_bpe(["completely different corpus " * 3, "zzz yyy xxx www"] * 20, vocab_size=300)
    teacher_dir = tmp_path / "teacher"
    _gpt2(len(other), 0).save_pretrained(teacher_dir)
    other.save_pretrained(teacher_dir)
    cfg = compose_train([*tiny_overrides, "+experiment=baseline_kd", f"model.teacher.name_or_path={teacher_dir}"])
    with pytest.raises(ConfigError) as err:
        run(cfg, tmp_path / "run")
    msg = str(err.value)
    assert "tokenizers differ" in msg and "\n" not in msg
    # the run's own tokenizer passes (padding rows are handled by truncation, not here)
    check_teacher_tokenizer(str(teacher_dir), other)


def test_kd_run_with_padded_teacher_from_a_directory(tmp_path, tiny_overrides):
    """A teacher loaded by path whose output matrix is padded past the tokenizer (like 50257 -> 50304)."""
    cfg = compose_train([*tiny_overrides, "+experiment=baseline_kd", "trainer.max_steps=2", "eval.enabled=false"])
    tok = build_tokenizer(cfg)
    teacher_dir = tmp_path / "teacher"
    padded = 64 * math.ceil((len(tok) + 1) / 64)
    _gpt2(padded, 0, positions=512).save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    cfg = compose_train([*tiny_overrides, "+experiment=baseline_kd", "trainer.max_steps=2", "eval.enabled=false",
                         f"model.teacher.name_or_path={teacher_dir}"])
    res = run(cfg, tmp_path / "run")
    assert res["train_cost"]["s_per_step"] > 0
    metrics = (tmp_path / "run" / "csv" / "metrics.csv").read_text()
    assert "kd/fkl" in metrics.splitlines()[0]


# -- gradient accumulation ------------------------------------------------------------------------------------
def test_accumulating_two_micro_batches_equals_one_batch_of_eight():
    """Losses are token means per micro-batch and Lightning divides by the accumulation count, so with equal
    response-token counts per micro-batch, 2 x 4 accumulated equals one batch of 8 (prompt and padding ignored)."""
    lengths = [(3, 4), (5, 2), (2, 5), (4, 3), (6, 2), (2, 3), (3, 4), (4, 5)]  # 18 response tokens + EOS each half
    feats = _features(lengths)
    assert sum(r + 1 for _, r in lengths[:4]) == sum(r + 1 for _, r in lengths[4:])

    def module():
        return DistillModule(_gpt2(60, 1), _Tok(), teacher=_gpt2(60, 0, layers=2), sft_weight=0.5,
                             distill=Divergence("fkl"), distill_weight=0.5, span_weight=0.0, val_generate=0)

    big = _fit_one_step(module(), feats, batch_size=8, accumulate=1)
    acc = _fit_one_step(module(), feats, batch_size=4, accumulate=2)
    assert big.keys() == acc.keys() and big
    for name in big:
        torch.testing.assert_close(acc[name], big[name], rtol=1e-4, atol=1e-6, msg=name)
