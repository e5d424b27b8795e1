"""Each ablation switch, set through its named experiment, changes behaviour measurably.

Configs are composed exactly as `python train.py +experiment=NAME [group=option]` would; the objects are
built with the pipeline's own builders, on tiny random models (no training).
"""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from transformers import GPT2Config, GPT2LMHeadModel

import mgsr.objectives
import mgsr.scrg
from mgsr.build.module import build_module, scrg_config, uses_student_sequences
from mgsr.build.tokenizer import build_tokenizer
from mgsr.data.collate import pad_rows
from mgsr.generation import SamplingConfig, generate
from mgsr.objectives import DacKl, Divergence
from mgsr.scrg import RevisionStats, pick_corrections, revise_once, rollout_and_revise

CONF = Path(__file__).resolve().parents[1] / "conf"
V = 40


def cfg_of(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def _gpt(seed, vocab=V):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                      bos_token_id=1, eos_token_id=1)).eval()


def _logits(seed, shape=(2, 6, V), scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


MASK = torch.ones(2, 6, dtype=torch.bool)


# -- DAC-KL: fixed clip, both readings, literal, components, divergences ----------------------------------------
def test_fixed_clip_has_no_parameters_and_uses_the_configured_pair():
    learn = instantiate(cfg_of("+experiment=mgsr").loss.distill)
    fixed = instantiate(cfg_of("+experiment=ablation_fixed_clip", "loss/distill=dac_kl_q30_70").loss.distill)
    assert sum(p.numel() for p in learn.parameters()) > 0
    assert list(fixed.parameters()) == []
    _, logs = fixed(_logits(0), _logits(1), MASK)
    assert logs["lower_mean"] == pytest.approx(0.3) and logs["upper_mean"] == pytest.approx(0.7)
    assert logs["lower_std"] == pytest.approx(0.0, abs=1e-6)


def test_clip_pairs_give_different_bands():
    t, s = _logits(0), _logits(1)
    kept = {}
    for option in ("q30_70", "q05_95"):
        _, logs = instantiate(cfg_of("+experiment=ablation_fixed_clip", f"loss/distill=dac_kl_{option}").loss.distill)(t, s, MASK)
        kept[option] = logs["kept"]
    assert kept["q05_95"] > kept["q30_70"]  # the wider mass band keeps more classes


def test_the_two_fixed_readings_differ():
    mass = instantiate(cfg_of("+experiment=ablation_fixed_clip", "loss/distill=dac_kl_q10_90").loss.distill)
    logprob = instantiate(cfg_of("+experiment=ablation_fixed_clip_logprob", "loss/distill=dac_kl_q10_90").loss.distill)
    assert (mass.kw["band"], logprob.kw["band"]) == ("mass", "logprob")
    t, s = _logits(0), _logits(1)
    (l_m, logs_m), (l_l, logs_l) = mass(t, s, MASK), logprob(t, s, MASK)
    # percentile of the sorted log-prob values keeps ~80% of the V classes; the mass band far fewer
    assert logs_l["kept"] > logs_m["kept"] + 5
    assert not torch.isclose(l_m, l_l)


def test_dac_literal_drops_the_coverage_term_and_the_remainder():
    full = instantiate(cfg_of("+experiment=ablation_dac_literal", "loss/distill=dac_kl").loss.distill)
    literal = instantiate(cfg_of("+experiment=ablation_dac_literal").loss.distill)
    assert literal.kw["beta"] == 0.0 and literal.kw["remainder"] == "drop"
    t, s = _logits(0), _logits(1)
    loss_f, logs_f = full(t, s, MASK)
    loss_l, logs_l = literal(t, s, MASK)
    assert float(loss_l.detach()) == pytest.approx(logs_l["kl"], abs=1e-6)  # no coverage term
    loss_f = loss_f.detach()
    assert float(loss_f) == pytest.approx(logs_f["kl"] + (1 - logs_f["coverage"]), rel=1e-5)
    assert float(loss_f) > logs_f["kl"]


def test_dac_components_switch_band_and_target():
    t, s = _logits(0), _logits(1)
    _, full = instantiate(cfg_of("+experiment=ablation_dac_components", "loss/distill=dac_kl").loss.distill)(t, s, MASK)
    _, no_band = instantiate(cfg_of("+experiment=ablation_dac_components").loss.distill)(t, s, MASK)
    d_nt = instantiate(cfg_of("+experiment=ablation_dac_components", "loss/distill=dac_kl_no_target").loss.distill)
    assert no_band["kept"] == pytest.approx(1.0)  # only the target class k*
    top1 = torch.softmax(t, -1).max(-1).values.mean().item()
    assert no_band["coverage"] == pytest.approx(top1, rel=1e-5)
    assert full["kept"] > 1.0
    assert d_nt.kw["target_class"] is False
    _, no_target = d_nt(t, s, MASK)
    assert no_target["kl"] != pytest.approx(full["kl"])


def test_no_dac_uses_plain_forward_kl():
    d = instantiate(cfg_of("+experiment=ablation_no_dac").loss.distill)
    assert isinstance(d, Divergence) and d.name == "fkl"
    t, s = _logits(0), _logits(1)
    p, lq = torch.softmax(t, -1), torch.log_softmax(s, -1)
    ref = (p * (torch.log(p) - lq)).sum(-1).mean()
    assert float(d(t, s, MASK)[0]) == pytest.approx(float(ref), rel=1e-5)
    assert isinstance(instantiate(cfg_of("+experiment=ablation_no_dac", "loss/distill=dac_kl").loss.distill), DacKl)


def test_divergence_ablation_swaps_each_divergence_in():
    t, s = _logits(0), _logits(1)
    values = {}
    for name in ("fkl", "rkl", "skl", "jsd", "tvd", "sfkl", "srkl"):
        d = instantiate(cfg_of("+experiment=ablation_divergence", f"loss/distill={name}").loss.distill)
        assert isinstance(d, Divergence) and d.name == name
        values[name] = float(d(t, s, MASK)[0])
    assert len({round(v, 6) for v in values.values()}) == len(values)  # all different losses
    cfg = cfg_of("+experiment=ablation_divergence", "loss/distill=skl")
    assert cfg.loss.distill.lam == 0.9 and "head" not in cfg.loss.distill  # replaced, not merged into DAC-KL


# -- objective weights and stages --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    cfg = cfg_of("data.n_train=64", f"cache_dir={tmp_path_factory.mktemp('tok')}")
    return build_tokenizer(cfg)


def _module(cfg, tokenizer):
    vocab = len(tokenizer)
    return build_module(cfg, _gpt(0, vocab), _gpt(1, vocab), tokenizer)


def _gold_batch(tokenizer):
    rows = []
    for prompt, resp in [("Name a red fruit.", "The red apple is a sweet fruit."),
                         ("Say hello.", "Hello there, my good friend.")]:
        p = torch.tensor(tokenizer(prompt)["input_ids"])
        r = torch.tensor(tokenizer(resp)["input_ids"] + [tokenizer.eos_token_id])
        rows.append((p, r))
    return pad_rows(rows, pad_id=tokenizer.pad_token_id)


def _count_span_calls(module, tokenizer, monkeypatch):
    calls = []
    real = mgsr.objectives.span_correlation_loss
    monkeypatch.setattr(mgsr.objectives, "span_correlation_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    module._distill_terms(_gold_batch(tokenizer))
    return len(calls)


def test_no_span_never_calls_the_span_loss(tokenizer, monkeypatch):
    nltk = str(Path(__file__).resolve().parents[2] / "shared/data/nltk_data")
    full = _module(cfg_of("+experiment=mgsr", f"loss.span.nltk_data={nltk}"), tokenizer)
    assert full.span is not None and _count_span_calls(full, tokenizer, monkeypatch) == 1
    no_span = _module(cfg_of("+experiment=ablation_no_span"), tokenizer)
    assert no_span.span is None and _count_span_calls(no_span, tokenizer, monkeypatch) == 0


@pytest.mark.parametrize("option, has_dac, has_span", [("dac1_span0", True, False), ("dac0_span1", False, True),
                                                        ("dac0.5_span1", True, True)])
def test_loss_weight_pairs_switch_terms(tokenizer, option, has_dac, has_span):
    cfg = cfg_of("+experiment=ablation_loss_weights", f"weights={option}")
    m = _module(cfg, tokenizer)
    assert (m.distill is not None, m.span is not None) == (has_dac, has_span)
    assert (m.distill_weight, m.span_weight, m.sft_weight) == (cfg.loss.distill_weight, cfg.loss.span_weight, 1.0)


def test_loss_weight_scales_the_distill_term(tokenizer):
    batch = _gold_batch(tokenizer)
    half = _module(cfg_of("+experiment=ablation_loss_weights", "weights=dac0.5_span0.5"), tokenizer)
    one = _module(cfg_of("+experiment=ablation_loss_weights", "weights=dac1_span0"), tokenizer)
    one.distill.load_state_dict(half.distill.state_dict())  # same f_sub, so only the weight differs
    l_half, parts = half._distill_terms(batch)
    l_half = l_half.detach()
    l_one = one._distill_terms(batch)[0].detach()
    assert float(l_half) == pytest.approx(0.5 * parts["dac/loss"] + 0.5 * parts["span/loss"], rel=1e-5)
    assert float(l_one) == pytest.approx(parts["dac/loss"], rel=1e-5)


def test_incremental_stages():
    rows = {s: cfg_of("+experiment=incremental", f"stage={s}") for s in ("sft", "kd", "scrg", "dac", "span")}
    assert not uses_student_sequences(rows["sft"]) and rows["sft"].loss.distill_weight == 0
    assert rows["kd"].scrg.rounds == 0 and rows["scrg"].scrg.rounds == 1
    for s in ("kd", "scrg"):
        assert rows[s].loss.distill.name == "fkl" and rows[s].loss.span_weight == 0
    assert rows["dac"].loss.distill.head == "learnable" and rows["dac"].loss.span_weight == 0
    assert rows["span"].loss.span_weight == 1 and rows["span"].loss.distill._target_.endswith("DacKl")


def test_span_relation_switch():
    from mgsr.losses.span import span_correlation_loss

    span = instantiate(cfg_of("+experiment=ablation_span_relation").loss.span)
    assert span.relation == "cosine"
    t, s = _logits(0), _logits(1)
    pairs = torch.ones(2, 5, dtype=torch.bool)
    cos = span_correlation_loss(t, s, pairs, relation=span.relation).loss
    had = span_correlation_loss(t, s, pairs, relation="hadamard").loss
    assert not torch.isclose(cos, had)


# -- SCRG: multi-token, adaptive, rounds, every_n_steps -----------------------------------------------------------
def test_multi_token_corrects_every_candidate_above_the_threshold_and_none_below():
    cfg = scrg_config(cfg_of("+experiment=ablation_multi_token", "scrg.max_corrections=64"))
    assert (cfg.mode, cfg.threshold_mode, cfg.threshold) == ("multi", "fixed", 0.8)
    g = torch.Generator().manual_seed(0)
    div = torch.rand(8, 30, generator=g) * 2.0
    candidates = torch.rand(8, 30, generator=g) < 0.7
    picked = pick_corrections(div, candidates, cfg)
    assert torch.equal(picked, candidates & (div > 0.8))
    single = scrg_config(cfg_of("+experiment=ablation_multi_token", "scrg.mode=single"))
    assert pick_corrections(div, candidates, single).sum(-1).tolist() == [1] * 8


def test_multi_token_cap_keeps_the_largest():
    cfg = scrg_config(cfg_of("+experiment=ablation_multi_token", "scrg.max_corrections=2"))
    div = torch.tensor([[0.9, 3.0, 0.1, 2.0, 1.0]])
    picked = pick_corrections(div, torch.ones_like(div, dtype=torch.bool), cfg)
    assert picked.tolist() == [[False, True, False, True, False]]


@pytest.mark.parametrize("q", [0.8, 0.85, 0.9])
def test_adaptive_threshold_is_the_per_sequence_quantile(q):
    cfg = scrg_config(cfg_of("+experiment=ablation_multi_token_adaptive", f"scrg.quantile={q}",
                             "scrg.max_corrections=64"))
    assert cfg.threshold_mode == "adaptive" and cfg.quantile == q
    g = torch.Generator().manual_seed(1)
    div = torch.rand(4, 40, generator=g)
    candidates = torch.rand(4, 40, generator=g) < 0.8
    picked = pick_corrections(div, candidates, cfg)
    for b in range(4):
        thr = torch.quantile(div[b][candidates[b]], q)
        assert torch.equal(picked[b], candidates[b] & (div[b] > thr))


def test_multi_token_revision_logs_corrections_per_sequence():
    teacher, student = _gpt(1), _gpt(0)
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    seqs = generate(student, ids, torch.ones_like(ids), SamplingConfig(max_new_tokens=10), eos_id=99, pad_id=0,
                    generator=torch.Generator().manual_seed(0))
    counts = {}
    for mode in ("single", "multi"):
        cfg = scrg_config(cfg_of("+experiment=ablation_multi_token", f"scrg.mode={mode}", "scrg.threshold=0.0"))
        stats = RevisionStats()
        revise_once(teacher, student, seqs, cfg, SamplingConfig(max_new_tokens=10), eos_id=99, pad_id=0,
                    generator=torch.Generator().manual_seed(0), stats=stats)
        counts[mode] = stats.summary()["corrected_per_seq"]
    assert counts["single"] == 1.0 and counts["multi"] > 1.0


@pytest.mark.parametrize("experiment, rounds", [("ablation_no_scrg", 0), ("mgsr", 1), ("scrg_rounds", 3)])
def test_scrg_rounds_revise_that_often(monkeypatch, experiment, rounds):
    calls = []
    monkeypatch.setattr(mgsr.scrg, "revise_once", lambda t, s, seqs, *a, **k: calls.append(1) or seqs)
    cfg = scrg_config(cfg_of(f"+experiment={experiment}"))
    ids = torch.tensor([[5, 6, 7]])
    rollout_and_revise(_gpt(1), _gpt(0), ids, torch.ones_like(ids), cfg, SamplingConfig(max_new_tokens=4),
                       eos_id=99, pad_id=0, generator=torch.Generator().manual_seed(0))
    assert len(calls) == rounds


def test_every_n_steps_revises_fresh_only_on_trigger_steps():
    from hydra.utils import instantiate

    from mgsr.sequences import build_sequence_source

    cfg = cfg_of("+experiment=scrg_every_n", "scrg.every_n_steps=2")
    src = build_sequence_source(cfg.scrg, seed=0, instantiate=instantiate)
    batch = pad_rows([(torch.tensor([5, 6]), torch.tensor([7, 8, 1]))] * 2, pad_id=0)
    fresh = []
    for step in range(4):
        _, seqs = src.next(batch, step=step, total=4, rollout=lambda b: fresh.append(1) or b, pad_id=0)
        assert seqs is not None
    assert len(fresh) == 2 and src.counts["replay"] == 2  # steps 0 and 2 fresh, 1 and 3 from the replay buffer
