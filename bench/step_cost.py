"""Cost of one optimiser step, per method, for the same teacher, student and batch; and SCRG's re-generation vs a
full generation of the same length.

    python bench/step_cost.py                  # tiny default models (conf/model/tiny.yaml), batch 8, CPU
    python bench/step_cost.py --rounds 2 --steps 4 --methods kd mgsr
    python bench/step_cost.py --engine vllm --methods kd mgsr      # + mgsr_vllm: rollouts on vLLM (its venv)

Each method is a real Lightning step (training_step, backward, optimiser step, and the sequence callback's
rollouts/revision for the methods that use student data), composed from the same Hydra configs as train.py.
Methods are measured round-robin in one process: every round runs `--steps` timed steps of each method in turn
(after one untimed warm-up step per fit), so a slow phase of a shared machine hits every method alike.
Step times are medians over rounds of the per-round mean (the mean over a round amortises methods whose steps
differ: SCRG every 4 steps, GKD's lambda, ImitKD's schedule). Peak memory: the most bytes torch had allocated
during one (separate, profiled) step, above what was live before it. Ratios are to KD (forward KL + SFT on gold).
Models are randomly initialised (the cost does not depend on training; a random student rarely emits EOS, so
rollouts run to the length cap: the worst case for generation).

At the testbed's own start instead (`--init testbed`): the fine-tuned teacher and the SFT start every method
of `compare.py` trains from (seed 0; built into `--cache-dir` if missing, ~3 min), timed on the training set's
first batches in order. A trained student stops at EOS, so this is the cost the quality cells paid:

    python bench/step_cost.py --init testbed --grid --cache-dir C      # C: the compare run's cache_dir

On a GPU, at a model preset's shapes (random init, the tiny offline tokenizer: its vocabulary, not 50257):

    python bench/step_cost.py --device cuda --model gpt2_xl_to_gpt2 --random-init --dtype bfloat16 --steps 4 \
        --rounds 1 --methods kd mgsr

(there the SCRG re-generation and DAC-KL-alone parts are skipped: they are the CPU measurements).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
import warnings

import lightning as L
import torch
from common import (
    REPO,
    add_reuse_memory_arg,
    add_threads_arg,
    machine,
    reuse_memory,
    set_threads,
    table,
    write_json,
)

from mgsr.build.data import build_datamodule
from mgsr.build.module import build_module
from mgsr.build.tokenizer import build_tokenizer
from mgsr.generation import SamplingConfig, continue_generation, generate
from mgsr.models import build_from_config, freeze
from mgsr.scrg import ScrgConfig, pick_corrections, score, token_divergence

# --model presets usable with --random-init: (teacher, student) GPT-2 shapes of conf/model/<name>.yaml's hub models
MODEL_SHAPES = {
    "gpt2_xl_to_gpt2": ({"n_layer": 48, "n_embd": 1600, "n_head": 25}, {"n_layer": 12, "n_embd": 768, "n_head": 12}),
    "gpt2_xl_to_gpt2_medium": ({"n_layer": 48, "n_embd": 1600, "n_head": 25},
                               {"n_layer": 24, "n_embd": 1024, "n_head": 16}),
}

# name -> (Hydra overrides, what one step does)
METHODS = {
    "sft": (["+experiment=baseline_sft"], "SFT on the gold response"),
    "kd": (["+experiment=baseline_kd"], "0.5 SFT + 0.5 forward KL on gold (teacher-forced)"),
    "mgsr_gold": (["scrg=off"], "MGSR losses (SFT + DAC-KL + span) on gold: no student data"),
    "mgsr_rounds0": (["scrg.rounds=0"], "MGSR losses on fresh student rollouts, no SCRG revision"),
    "mgsr": ([], "MGSR default: rollout + 1 SCRG round every step (every_n_steps=1)"),
    "mgsr_unragged": (["scrg.sampling.compact=false"], "MGSR default, finished rows kept in the decode batch"),
    "mgsr_every4": (["scrg.every_n_steps=4"], "MGSR, SCRG every 4 steps, replay between (amortised)"),
    "seqkd": (["+experiment=baseline_sft"], "SeqKD's step = SFT on cached teacher samples (one-off sampling)"),
    "gkd": (["+experiment=baseline_gkd"], "GKD: JSD(0.5); student data with prob. 0.5 (amortised)"),
    "imitkd": (["+experiment=baseline_imitkd"], "ImitKD: FKL; student-data prob. rises 0->1 (amortised)"),
    "distillm": (["+experiment=baseline_distillm", "scrg.schedule.init=1.0"],
                 "DistiLLM: skew FKL; phi=1: fresh/replay mix, fresh share 1-t/T (amortised)"),
    "abkd": (["+experiment=baseline_abkd"], "ABKD: alpha-beta divergence (0.2, 0.7) on gold (teacher-forced)"),
    "taid": (["+experiment=baseline_taid"], "TAID: KL to the adaptive teacher/student interpolation on gold"),
    "minillm": (["+experiment=baseline_minillm"], "MiniLLM: teacher-mixed rollouts reused 4x, PPO + single-step RKL + LM"),
}
# --grid: MGSR at rollouts made k batches ahead x fresh rollouts every n steps (replay between), amortised
GRID_SETTINGS = {f"mgsr_k{k}_n{n}": (k, n) for k in (1, 4, 8) for n in (1, 2, 4)}
GRID = {name: ([f"scrg.rollout_batches={k}", f"scrg.every_n_steps={n}"],
               f"MGSR, rollouts {k} batches ahead, fresh every {n} steps (amortised over {k * n})")
        for name, (k, n) in GRID_SETTINGS.items()}
METHODS |= GRID
# --engine vllm: the same settings with student rollouts and SCRG re-generation on vLLM (mgsr/rollout_vllm.py),
# timed beside their HF rows; the engine starts in the untimed warm-up step (one per process, shared)
VLLM = {f"{m}_vllm": ([*METHODS[m][0], "rollout.engine=vllm"], METHODS[m][1].split(":")[0] + ", rollouts on vLLM")
        for m in ("mgsr_rounds0", "mgsr", "mgsr_every4")}
METHODS |= VLLM


def steps_for(method: str, steps: int) -> int:
    """Timed steps of one round: a multiple of the method's generation period (k x n steps for the grid)."""
    if method not in GRID_SETTINGS:
        return steps
    k, n = GRID_SETTINGS[method]
    period = k * n
    return max(period, -(-steps // period) * period)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


class StepTimer(L.Callback):
    """Wall time of every step from the first on_train_batch_start hook to on_train_batch_end (after the
    optimiser step); profiles the allocations of step `profile_step` instead of timing it."""

    def __init__(self, profile_step: int | None = None):
        self.times, self.peak, self.profile_step = [], None, profile_step
        self._t0 = self._prof = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.profile_step and torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            self._prof = "cuda"
        elif trainer.global_step == self.profile_step:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.start()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - self._t0
        if self._prof == "cuda":
            self.peak, self._prof = torch.cuda.max_memory_allocated() - self._base, None
        elif self._prof is not None:
            self._prof.stop()
            events = sorted((e for e in self._prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                            key=lambda e: e.start_ns())
            cur = peak = 0
            for e in events:
                cur += e.nbytes()
                peak = max(peak, cur)
            self.peak, self._prof = peak, None
        elif trainer.global_step > 1:  # the first step of a fit builds optimiser state: not timed
            self.times.append(dt)


TRAINER = {"accelerator": "cpu"}  # main() sets gpu / bf16-mixed for --device cuda


def fit_steps(cfg, student, teacher, tokenizer, batches: list, steps: int, profile_step: int | None = None, dm=None):
    """Run `steps` optimiser steps of the method `cfg` on `batches` in turn (cycled); returns the StepTimer. `dm`
    lends its training prompts to rollouts made ahead."""
    module = build_module(cfg, student, teacher, tokenizer, dm)
    timer = StepTimer(profile_step)
    callbacks = [timer]  # the module's sequence source (built with it) makes the rollouts inside the step
    trainer = L.Trainer(**TRAINER, devices=1, max_steps=steps, max_epochs=-1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0, callbacks=callbacks)
    loader = torch.utils.data.DataLoader([batches[i % len(batches)] for i in range(steps)], batch_size=None,
                                         collate_fn=lambda b: b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=loader)
    return timer


def regeneration_cost(teacher, student, batch, sampling: SamplingConfig, reps: int, eos_id: int, pad_id: int) -> dict:
    """SCRG's re-generation after the corrected position (prefix KV cache re-used, as `revise_once` does), the
    same without the cache, the same without ragged decode (finished rows stay in the batch), and a full generation
    from the prompt with the same length cap."""
    student.eval()
    prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_attention_mask"]
    seqs = generate(student, prompt_ids, prompt_mask, sampling, eos_id=eos_id, pad_id=pad_id,
                    generator=torch.Generator().manual_seed(0))
    P = seqs["prompt_len"]
    resp, resp_mask = seqs["input_ids"][:, P:], seqs["response_mask"][:, P:]

    def splice():
        t_logits, s_logits, cache = score(teacher, student, seqs)
        y_t = t_logits.argmax(-1)
        picked = pick_corrections(token_divergence(t_logits, s_logits, "fkl"), resp_mask & (resp != y_t), ScrgConfig())
        active = picked.any(-1)
        cols = torch.arange(resp.shape[1])[None, :]
        first = torch.where(picked, cols, torch.full_like(cols, resp.shape[1])).min(-1).values
        spliced = dict(seqs, input_ids=torch.cat([seqs["input_ids"][:, :P], torch.where(picked, y_t, resp)], 1))
        keep = torch.where(active, first + 1, resp_mask.sum(-1))
        return spliced, keep, cache, torch.where(active, first, keep), active

    times = {"regen_cached": [], "regen_cached_unragged": [], "regen_no_cache": [], "full_generation": []}
    unragged = dataclasses.replace(sampling, compact=False)
    new_tokens = {k: [] for k in times}
    # decode work independent of the machine's load: rows summed over the student's forwards (prefill included)
    rows_fed = {k: 0 for k in times}
    seen = []
    hook = student.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[0]), with_kwargs=True)
    with torch.no_grad():
        for r in range(reps):
            for name in times:
                gen = torch.Generator().manual_seed(100 + r)
                seen.clear()
                if name == "full_generation":
                    t0 = time.perf_counter()
                    out = generate(student, prompt_ids, prompt_mask, sampling, eos_id=eos_id, pad_id=pad_id,
                                   generator=gen)
                    dt = time.perf_counter() - t0
                    new_tokens[name].append(float(out["response_mask"].sum()))
                    times[name].append(dt)
                    rows_fed[name] = sum(seen)
                    continue
                spliced, keep, cache, cache_valid, active = splice()  # a fresh cache each time (it is shifted)
                kw = {"cache": cache, "cache_valid": cache_valid} if name.startswith("regen_cached") else {}
                seen.clear()
                t0 = time.perf_counter()
                out = continue_generation(student, spliced, keep, unragged if name.endswith("unragged") else sampling,
                                          eos_id=eos_id, pad_id=pad_id,
                                          active=active, generator=gen, **kw)
                dt = time.perf_counter() - t0
                new_tokens[name].append(float((out["response_mask"].sum(-1) - keep).clamp_min(0).sum()))
                times[name].append(dt)
                rows_fed[name] = sum(seen)
    hook.remove()
    spliced, keep, *_ = splice()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"median_s": med, "new_tokens": {k: statistics.mean(v) for k, v in new_tokens.items()},
            "mean_keep_frac": float((keep.float() / resp_mask.sum(-1).clamp_min(1)).mean()),
            "regen_cached_x_full": med["regen_cached"] / med["full_generation"],
            "regen_no_cache_x_full": med["regen_no_cache"] / med["full_generation"],
            "regen_unragged_x_full": med["regen_cached_unragged"] / med["full_generation"],
            "rows_fed": rows_fed, "rows_fed_x_full": {k: v / rows_fed["full_generation"] for k, v in rows_fed.items()},
            "max_new_tokens": sampling.max_new_tokens, "batch": int(prompt_ids.shape[0])}


def regeneration_rows(args, teacher, student, batch, tokenizer) -> list[dict]:
    """One row per length cap: the batched re-generation and, one row at a time, the same (the per-row cost)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = []
    for length in args.regen_lengths:
        sampling = SamplingConfig(max_new_tokens=length)
        res = regeneration_cost(teacher, student, batch, sampling, args.regen_reps, eos, pad)
        singles = [regeneration_cost(teacher, student, {k: v[i:i + 1] if torch.is_tensor(v) else v
                                                        for k, v in batch.items()}, sampling, args.regen_reps, eos,
                                     pad) for i in range(args.batch_size)]
        totals = {k: sum(r["median_s"][k] for r in singles) for k in res["median_s"]}
        res["per_row_cached_x_full"] = totals["regen_cached"] / totals["full_generation"]
        res["per_row_no_cache_x_full"] = totals["regen_no_cache"] / totals["full_generation"]
        res["tokens_x_full"] = res["new_tokens"]["regen_cached"] / res["new_tokens"]["full_generation"]
        rows.append(res)
    return rows


def print_regeneration(regen: list[dict], batch_size: int) -> None:
    print("\nSCRG re-generation (prefix cache re-used) vs a full generation with the same length cap, batch "
          f"{batch_size} (ragged decode; unragged: finished rows kept in the batch) and one row at a time (per_row_*):")
    print(table([{"max_new_tokens": g["max_new_tokens"], "keep_frac": g["mean_keep_frac"],
                  "new_tokens_x_full": g["tokens_x_full"], "regen_cached_s": g["median_s"]["regen_cached"],
                  "full_s": g["median_s"]["full_generation"], "cached_x_full": g["regen_cached_x_full"],
                  "unragged_x_full": g["regen_unragged_x_full"], "no_cache_x_full": g["regen_no_cache_x_full"],
                  "per_row_cached_x_full": g["per_row_cached_x_full"],
                  "rows_fed_x_full": g["rows_fed_x_full"]["regen_cached"],
                  "unragged_rows_fed_x_full": g["rows_fed_x_full"]["regen_cached_unragged"]} for g in regen],
                ["max_new_tokens", "keep_frac", "new_tokens_x_full", "regen_cached_s", "full_s", "cached_x_full",
                 "unragged_x_full", "no_cache_x_full", "per_row_cached_x_full", "rows_fed_x_full",
                 "unragged_rows_fed_x_full"]))


def random_start(args):
    """Random-init teacher and student (tiny, or --model's shapes) and one batch of synthetic prompts, repeated."""
    base = compose([f"cache_dir={args.cache_dir}", "data.n_train=256", "data.n_val=8", "data.n_test=8",
                    *args.overrides])
    tokenizer = build_tokenizer(base)
    dm = build_datamodule(base, tokenizer, batch_size=args.batch_size)
    dm.setup("fit")
    batch = dm.collator([dm.datasets["train"][i] for i in range(args.batch_size)])
    t_arch, s_arch = dict(base.model.teacher.arch), dict(base.model.student.arch)
    if args.model != "tiny":
        t_arch.update(MODEL_SHAPES[args.model][0], n_positions=1024)
        s_arch.update(MODEL_SHAPES[args.model][1], n_positions=1024)
    teacher = freeze(build_from_config(t_arch, tokenizer, seed=1))
    if args.dtype == "bfloat16":
        teacher = teacher.to(torch.bfloat16)
    student0 = build_from_config(s_arch, tokenizer, seed=0)
    return tokenizer, dm, [batch], teacher, student0


def testbed_config(args):
    """train.py's embedded default at seed 0 with the bench's cache: nothing that keys the cached stages changes."""
    return compose([f"cache_dir={args.cache_dir}", "seed=0", *args.overrides])


def testbed_start(args, n_batches: int = 8):
    """The embedded default as train.py builds it at seed 0 (its data untouched, so the cached fine-tuned teacher
    and SFT start are the ones compare.py's cells start from) and its first `n_batches` training batches."""
    from mgsr.build.student import build_student
    from mgsr.build.teacher import ensure_teacher
    from mgsr.data.prompt import use_prompt_format

    base = testbed_config(args)
    tokenizer = use_prompt_format(build_tokenizer(base), base.data.get("prompt_format", "alpaca"))
    dm = build_datamodule(base, tokenizer, batch_size=args.batch_size)
    dm.setup("fit")
    train = dm.datasets["train"]
    batches = [dm.collator([train[i] for i in range(j * args.batch_size, (j + 1) * args.batch_size)])
               for j in range(n_batches)]
    teacher = ensure_teacher(base, tokenizer, dm)  # frozen, as train.py gets it
    student0 = build_student(base, tokenizer)
    return tokenizer, dm, batches, teacher, student0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=[m for m in METHODS if m not in GRID and m not in VLLM],
                   choices=list(METHODS))
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"],
                   help="vllm: also time each rollout method with rollouts on vLLM (needs requirements-vllm.txt)")
    p.add_argument("--grid", action="store_true", help="also every rollout_batches x every_n_steps setting")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="timed steps per method per round (multiple of 4)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--regen-reps", type=int, default=5)
    p.add_argument("--regen-lengths", type=int, nargs="+", default=[48, 128])
    p.add_argument("--regen-only", action="store_true", help="only the re-generation table (no steps, no losses)")
    p.add_argument("--cache-dir", default=str(REPO / ".cache" / "mgsr"), help="tokenizer cache")
    p.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides for every method")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "step_cost.json"))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="tiny", choices=["tiny", *MODEL_SHAPES],
                   help="shapes: tiny (conf/model/tiny.yaml) or a preset's, random init (needs --random-init)")
    p.add_argument("--random-init", action="store_true", help="random init at --model's shapes (no hub access)")
    p.add_argument("--init", default="random", choices=["random", "testbed"],
                   help="testbed: the embedded default's fine-tuned teacher and SFT start (trained models, real "
                        "prompts; rollouts stop at EOS) instead of random init")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16: bf16 teacher and bf16-mixed training (as trainer=gpu)")
    add_threads_arg(p)
    add_reuse_memory_arg(p)
    args = p.parse_args()
    malloc_env = reuse_memory(args)
    set_threads(args.threads)
    if args.model != "tiny" and not args.random_init:
        p.error("--model other than tiny needs --random-init (hub weights are not loaded here)")
    if args.init == "testbed" and (args.model != "tiny" or args.random_init):
        p.error("--init testbed uses the testbed's own models: drop --model / --random-init")
    if args.device == "cuda":
        TRAINER.update(accelerator="gpu")
    if args.dtype == "bfloat16":
        TRAINER.update(precision="bf16-mixed")
    if args.grid:
        args.methods = [*args.methods, *[m for m in GRID if m not in args.methods]]
    if args.engine == "vllm":
        from mgsr.rollout_vllm import vllm_missing

        if vllm_missing():
            p.error(vllm_missing())
        args.methods = [*args.methods, *[f"{m}_vllm" for m in args.methods if f"{m}_vllm" in VLLM]]
    if "kd" not in args.methods:
        args.methods = ["kd", *args.methods]
    L.seed_everything(0, verbose=False)
    start = testbed_start if args.init == "testbed" else random_start
    tokenizer, dm, batches, teacher, student0 = start(args)
    cfgs = {m: compose([f"cache_dir={args.cache_dir}", *METHODS[m][0], *args.overrides]) for m in args.methods}
    students = {m: copy.deepcopy(student0) for m in args.methods}

    if args.regen_only:
        regen = regeneration_rows(args, teacher, student0, batches[0], tokenizer)
        write_json(args.out, {"machine": machine(), "args": vars(args), "malloc_env": malloc_env, "regeneration": regen})
        print_regeneration(regen, args.batch_size)
        return
    per_round = {m: [] for m in args.methods}
    peaks = {}
    for r in range(args.rounds):
        for m in args.methods:
            timer = fit_steps(cfgs[m], students[m], teacher, tokenizer, batches, steps_for(m, args.steps) + 1, dm=dm)
            per_round[m].append(statistics.mean(timer.times))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{m} {per_round[m][-1]:.3f}s" for m in args.methods),
              flush=True)
    for m in args.methods:  # memory: one profiled step (step 2 of a short fit), not timed
        peaks[m] = fit_steps(cfgs[m], copy.deepcopy(student0), teacher, tokenizer, batches, 3, profile_step=2,
                             dm=dm).peak

    kd_s, kd_mb = statistics.median(per_round["kd"]), peaks["kd"] / 2**20
    rows = []
    for m in args.methods:
        s = statistics.median(per_round[m])
        mb = peaks[m] / 2**20 if peaks[m] is not None else None
        rows.append({"method": m, "step_s": s, "x_kd": s / kd_s, "peak_mb": mb,
                     "mem_x_kd": mb / kd_mb if mb is not None and kd_mb else None, "what": METHODS[m][1],
                     "per_round_s": per_round[m]})

    loss_rows = []
    regen = regeneration_rows(args, teacher, student0, batches[0], tokenizer) if args.device == "cpu" else []
    # the DAC-KL loss alone at V = 50k vs the forward KL (see bench/loss_scaling.py for the sweep)
    from common import interleaved_medians
    from loss_scaling import cases, make_logits

    if args.device == "cpu":
        t, s = make_logits(args.batch_size * 16, 50257, "lm", torch.device("cpu"))
        fns = cases(t, s, None, with_before=False)
        loss_t = interleaved_medians({k: fns[k] for k in ("kl", "dac_soft", "dac_hard", "dac_module")}, repeats=3)
        loss_rows = [{"loss": k, "median_s": v["median_s"], "x_kl": v["median_s"] / loss_t["kl"]["median_s"]}
                     for k, v in loss_t.items()]

    payload = {"machine": machine(), "args": vars(args), "malloc_env": malloc_env, "steps": rows, "regeneration": regen,
               "loss_50k": loss_rows}
    path = write_json(args.out, payload)
    print(f"\nwrote {path}")
    memory = "freed memory reused" if args.reuse_memory else "default allocator: see BENCHMARKS.md section 2, Update 2"
    print(f"\nDAC-KL loss alone, fwd+bwd, {args.batch_size * 16} tokens, vocab 50257 (x_kl: / forward KL; {memory}):")
    print(table(loss_rows, ["loss", "median_s", "x_kl"]))
    print_regeneration(regen, args.batch_size)
    m = payload["machine"]
    print(f"\none optimiser step, {args.model} shapes on {args.device} ({args.dtype}), batch {args.batch_size}, "
          f"{m['cpu']} ({m['torch_threads']} "
          f"threads); x_kd = / KD's step (median of {args.rounds} round means)")
    print(table(rows, ["method", "step_s", "x_kd", "peak_mb", "mem_x_kd", "what"]))


if __name__ == "__main__":
    main()
