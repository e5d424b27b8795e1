"""A roofline cost model of one training step: MGSR (and GKD / DistiLLM / MiniLLM) as a multiple of KD, for a
named teacher/student pair on a named GPU, from FLOPs and bytes moved per phase. Nothing is run on the models.

    python bench/cost_model.py                                   # gpt2_xl_to_gpt2 on an H100, batch 8, 256 + 256
    python bench/cost_model.py --pair openllama2_7b_to_3b --gpu h200 --every-n 4 --rollout-batches 8
    python bench/cost_model.py --sweep                           # MGSR/KD over every_n 1/2/4 x k 1/4/8, both pairs
    python bench/cost_model.py --tiny-check                      # tiny pair on this CPU vs bench/results/step_cost.json

Equations (per model; N = matmul parameters = L (4 d^2 (GQA: 2 d^2 + 2 d d_kv) + m d d_ff) + d V, m = 2 for
GPT-2/OPT, 3 for gated LLaMA MLPs; W = N x weight bytes; B rows; P prompt tokens; T response tokens):

- forward of q new tokens per row after c cached ones: FLOPs = 2 N B q + 4 L d B sum_{i=1..q} (c + i)
  (projections + causal QK^T and AV); bytes = W + B q V a (logits) + 2 L B (c + q) d_kv a (KV cache), a =
  activation bytes. Prefill / scoring / loss forwards are compute-bound at these sizes.
- one decode step at context c: FLOPs = 2 N B + 4 L d B c; bytes = W + 2 L B c d_kv a + B V a: every step reads
  all the weights once for the whole batch (the batch amortises the weight read) plus the KV cache: memory-bound
  unless B is in the hundreds.
- backward = `backward_factor` (2) x the student's forward FLOPs and bytes; AdamW reads/writes 28 bytes per
  trainable parameter; the loss reads `loss_passes` x B T V x 4 bytes (KD's forward KL: 6, DAC-KL + span: 12).
- phase time = max(FLOPs / (peak x mfu), bytes / (bandwidth x bw_eff)) + overhead, where overhead =
  calls x (L x layer_overhead_s) + decode steps x decode_step_overhead_s.
  The overhead term is the per-call cost a roofline omits (kernel launches, Python per decode step, sampling).
  At GPU scale it is small next to big models' weight reads and large next to small ones': with the GPU
  defaults (20 us per layer per call, 100 us per decode step), a decode step of the 3B student at batch 8 on
  an H100 is 2.9 ms of memory traffic + 0.6 ms of overhead (~18%), negligible against the 7B/3B forwards;
  the 124M GPT-2 student's is 0.14 ms of memory + 0.34 ms of overhead (latency-bound: launches, not bytes,
  set its generation cost; eager Python decode loops are slower still: measure with bench/gpu_check.sh and
  pass --decode-step-overhead-us). At the tiny CPU size overhead dominates everything: `--tiny-check`
  calibrates it from the CPU measurement (~8 ms per decode step of the 2 x 128 student, whose FLOPs take
  ~0.3 ms, and ~94 ms of framework time per optimiser step, from KD's step).

Steps (per optimiser step; n = `every_n` = scrg.every_n_steps, k = `rollout_batches`, f = `regen_frac`):

- KD = teacher forward + student forward + backward on P + T_gold tokens + KL loss + AdamW.
- MGSR = [student rollout (prefill P, T decode steps at batch k B) + SCRG round (teacher and student forward on
  P + T, re-generation: f x the rollout's decode)] / (n k) + loss: teacher forward + student forward + backward
  on the revised P + T tokens + DAC-KL/span loss + AdamW. A trigger every n steps generates k batches in one
  decode call (a bigger decode batch: the weight reads are shared by k B rows), which serve k triggers.
  f: measured in BENCHMARKS.md 1 (SCRG re-generation, batch of 8: 0.88-0.91 of a full generation, since a batch
  decodes until its last row is done); <= 0.6 is the target with ragged decode / bucketing rows by j (note: where
  decode is weight-read-bound, dropping finished rows saves little; fewer decode *steps* is what saves).
- GKD = the rollout every step (lambda = `gkd_student_prob`, 1: on-policy), no SCRG, + KD-like loss on it.
- DistiLLM = the rollout on a share `distillm_fresh` (0.5: the mean of 1 - t/T over a run) of steps, replay
  otherwise, + the skew-KL loss.
- MiniLLM (rough): mixed teacher/student sampling (both decode every token) every step + the loss forwards.
- MGSR with `rollout.engine=vllm` (`mgsr_vllm`): the same FLOPs and bytes; rollout and re-generation decode with
  vLLM's per-step and per-layer overheads (30 us, 2 us: CUDA graphs, no Python per token), plus a weight sync per
  rollout (the student's bf16 weights read and written once) and a re-prefill of the kept response (vLLM's prefix
  cache reuses whole prompt blocks only).

Defaults: mfu 0.5 (compute efficiency of dense bf16 matmuls), bw_eff 0.8 (of peak HBM bandwidth), weights and
activations in bf16 (2 bytes: the student's fp32 master weights are cast once per step, not per decode step).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from common import REPO, machine, table, write_json


@dataclass(frozen=True)
class Arch:
    """A decoder-only transformer's shape (the HF config fields that set its cost)."""

    name: str
    n_layer: int
    d_model: int
    n_head: int
    n_kv_head: int
    d_ff: int
    vocab: int
    gated_mlp: bool = False  # LLaMA's SwiGLU: 3 d x d_ff matrices, else 2

    @property
    def d_kv(self) -> int:
        return self.n_kv_head * (self.d_model // self.n_head)

    @property
    def matmul_params(self) -> int:
        """Parameters in matmuls per token (projections, MLP, LM head); embeddings lookups excluded."""
        d = self.d_model
        attn = 2 * d * d + 2 * d * self.d_kv
        mlp = (3 if self.gated_mlp else 2) * d * self.d_ff
        return self.n_layer * (attn + mlp) + d * self.vocab


def gpt2(name, n_layer, d, n_head, vocab=50257):
    return Arch(name, n_layer, d, n_head, n_head, 4 * d, vocab)


def llama(name, n_layer, d, n_head, d_ff, vocab=32000, n_kv_head=None):
    return Arch(name, n_layer, d, n_head, n_kv_head or n_head, d_ff, vocab, gated_mlp=True)


# teacher, student, share of the student's parameters that AdamW trains (LoRA r16 on q,v for the LLaMA pairs)
PAIRS = {
    "gpt2_xl_to_gpt2": (gpt2("gpt2-xl", 48, 1600, 25), gpt2("gpt2", 12, 768, 12), 1.0),
    "gpt2_xl_to_gpt2_medium": (gpt2("gpt2-xl", 48, 1600, 25), gpt2("gpt2-medium", 24, 1024, 16), 1.0),
    "gpt2_xl_to_gpt2_large": (gpt2("gpt2-xl", 48, 1600, 25), gpt2("gpt2-large", 36, 1280, 20), 1.0),
    "openllama2_7b_to_3b": (llama("open_llama_7b_v2", 32, 4096, 32, 11008),
                            llama("open_llama_3b_v2", 26, 3200, 32, 8640), 26 * 2 * 16 * (3200 + 3200) / 3.43e9),
    "llama_13b_to_7b": (llama("llama-13b", 40, 5120, 40, 13824), llama("llama-7b", 32, 4096, 32, 11008),
                        32 * 2 * 16 * 2 * 4096 / 6.74e9),
    # the default CPU testbed: conf/model/tiny.yaml (vocab: the offline BPE's 1768 tokens, cap 2048)
    "tiny": (gpt2("tiny-teacher", 4, 192, 4, vocab=1768), gpt2("tiny-student", 2, 128, 4, vocab=1768), 1.0),
}


@dataclass(frozen=True)
class Device:
    name: str
    peak_flops: float          # dense bf16 FLOP/s (CPU: measured fp32 matmul)
    bandwidth: float           # bytes/s
    mfu: float = 0.5
    bw_eff: float = 0.8
    layer_overhead_s: float = 20e-6        # per layer per forward call (launches)
    decode_step_overhead_s: float = 100e-6  # per decode step (sampling, Python loop)
    step_overhead_s: float = 0.0            # per optimiser step, every method alike (framework; CPU: calibrated)


DEVICES = {
    "a100": Device("A100-80GB SXM", 312e12, 2.039e12),
    "h100": Device("H100 SXM", 989e12, 3.35e12),
    "h200": Device("H200", 989e12, 4.8e12),
}


def calibrate_cpu(size: int = 768, copy_mb: int = 128, reps: int = 5) -> Device:
    """This machine's fp32 matmul FLOP/s (one torch thread) and memory-copy bandwidth (read + write), best of
    `reps`; efficiencies 1 (the measured figures are already what is reached), no per-call term (calibrated
    separately, see tiny_check)."""
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(size, size), torch.randn(size, size)
    x = torch.empty(copy_mb * 2**20 // 4)
    y = torch.empty_like(x)
    best_mm = best_cp = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best_mm = min(best_mm, time.perf_counter() - t0)
        t0 = time.perf_counter()
        y.copy_(x)
        best_cp = min(best_cp, time.perf_counter() - t0)
    return Device("cpu (measured, 1 thread)", 2 * size**3 / best_mm, 2 * x.numel() * 4 / best_cp, mfu=1.0,
                  bw_eff=1.0, layer_overhead_s=0.0, decode_step_overhead_s=0.0)


@dataclass(frozen=True)
class Workload:
    batch: int = 8
    prompt_len: int = 256
    new_tokens: int = 256          # rollout cap (a random / weak student runs to it)
    gold_len: int | None = None    # KD's response length (None: = new_tokens)
    every_n: int = 1
    rollout_batches: int = 1
    regen_frac: float = 0.9
    scrg_rounds: int = 1
    weight_bytes: int = 2
    act_bytes: int = 2
    backward_factor: float = 2.0
    loss_passes_kd: float = 6.0
    loss_passes_mgsr: float = 12.0
    gkd_student_prob: float = 1.0
    distillm_fresh: float = 0.5
    # rollout.engine=vllm: per decode step (the whole batch) and per layer call; CUDA graphs + a C++ sampler
    vllm_decode_step_overhead_s: float = 30e-6
    vllm_layer_overhead_s: float = 2e-6


def forward(m: Arch, w: Workload, rows: int, q: int, c: int = 0) -> tuple[float, float]:
    """FLOPs and bytes of one forward of `q` new tokens per row after `c` cached ones."""
    attn_pairs = q * c + q * (q + 1) / 2
    flops = 2 * m.matmul_params * rows * q + 4 * m.n_layer * m.d_model * rows * attn_pairs
    nbytes = m.matmul_params * w.weight_bytes + rows * q * m.vocab * w.act_bytes \
        + 2 * m.n_layer * rows * (c + q) * m.d_kv * w.act_bytes
    return flops, nbytes


def decode(m: Arch, w: Workload, rows: int, c0: int, steps: int, dev: Device) -> dict:
    """`steps` single-token decode steps at batch `rows`, context c0 + t: per-step roofline, summed."""
    flops = nbytes = t_compute = t_memory = 0.0
    for t in range(steps):
        c = c0 + t
        f = 2 * m.matmul_params * rows + 4 * m.n_layer * m.d_model * rows * (c + 1)
        b = m.matmul_params * w.weight_bytes + 2 * m.n_layer * rows * (c + 1) * m.d_kv * w.act_bytes \
            + rows * m.vocab * w.act_bytes
        flops, nbytes = flops + f, nbytes + b
        tc, tm = f / (dev.peak_flops * dev.mfu), b / (dev.bandwidth * dev.bw_eff)
        t_compute, t_memory = t_compute + tc, t_memory + tm
    # per step max(compute, memory): decode is uniformly one or the other at these shapes, so max of the sums
    overhead = steps * (m.n_layer * dev.layer_overhead_s + dev.decode_step_overhead_s)
    return _phase(flops, nbytes, t_compute, t_memory, overhead)


def _phase(flops, nbytes, t_compute, t_memory, overhead) -> dict:
    t = max(t_compute, t_memory) + overhead
    bound = "compute" if t_compute >= t_memory else "memory"  # the roofline's bound; overhead_ms is apart
    return {"flops": flops, "bytes": nbytes, "compute_ms": t_compute * 1e3, "memory_ms": t_memory * 1e3,
            "overhead_ms": overhead * 1e3, "ms": t * 1e3, "bound": bound}


def dense(dev: Device, flops: float, nbytes: float, calls: float, n_layer: int) -> dict:
    return _phase(flops, nbytes, flops / (dev.peak_flops * dev.mfu), nbytes / (dev.bandwidth * dev.bw_eff),
                  calls * n_layer * dev.layer_overhead_s)


def scale(ph: dict, s: float) -> dict:
    return {k: (v * s if isinstance(v, float) else v) for k, v in ph.items()}


def loss_phases(teacher: Arch, student: Arch, trainable: float, w: Workload, dev: Device, seq: int, resp: int,
                passes: float, tag: str) -> list[tuple[str, dict]]:
    """Teacher forward, student forward + backward on `seq` tokens, the loss over `resp` tokens, AdamW."""
    tf, tb = forward(teacher, w, w.batch, seq)
    sf, sb = forward(student, w, w.batch, seq)
    n_trainable = trainable * (student.matmul_params + 0.0)
    return [
        (f"{tag}: teacher forward", dense(dev, tf, tb, 1, teacher.n_layer)),
        (f"{tag}: student forward", dense(dev, sf, sb, 1, student.n_layer)),
        (f"{tag}: student backward", dense(dev, w.backward_factor * sf, w.backward_factor * sb, w.backward_factor,
                                           student.n_layer)),
        (f"{tag}: loss", dense(dev, 10.0 * w.batch * resp * student.vocab, passes * w.batch * resp * student.vocab * 4,
                               0, 0)),
        (f"{tag}: AdamW", dense(dev, 10.0 * n_trainable, 28.0 * n_trainable, 0, 0)),
    ]


def rollout_phases(student: Arch, w: Workload, dev: Device, rows: int, per_step: float,
                   teacher_decodes: Arch | None = None) -> list[tuple[str, dict]]:
    P, T = w.prompt_len, w.new_tokens
    pf, pb = forward(student, w, rows, P)
    out = [("rollout: prefill", scale(dense(dev, pf, pb, 1, student.n_layer), per_step)),
           ("rollout: decode", scale(decode(student, w, rows, P, T, dev), per_step))]
    if teacher_decodes is not None:  # MiniLLM's mixed sampling: the teacher decodes every token too
        tf, tb = forward(teacher_decodes, w, rows, P)
        out += [("rollout: teacher prefill", scale(dense(dev, tf, tb, 1, teacher_decodes.n_layer), per_step)),
                ("rollout: teacher decode", scale(decode(teacher_decodes, w, rows, P, T, dev), per_step))]
    return out


def step(method: str, pair: str, w: Workload, dev: Device) -> list[tuple[str, dict]]:
    """The phases of one optimiser step of `method`, each already amortised per step."""
    teacher, student, trainable = PAIRS[pair]
    P, T = w.prompt_len, w.new_tokens
    gold = w.gold_len if w.gold_len is not None else T
    if method == "kd":
        return loss_phases(teacher, student, trainable, w, dev, P + gold, gold, w.loss_passes_kd, "KD")
    if method in ("mgsr", "mgsr_vllm"):
        rows, per = w.batch * w.rollout_batches, 1.0 / (w.every_n * w.rollout_batches)
        gen_dev = dev if method == "mgsr" else replace(dev, decode_step_overhead_s=w.vllm_decode_step_overhead_s,
                                                       layer_overhead_s=w.vllm_layer_overhead_s)
        phases = rollout_phases(student, w, gen_dev, rows, per)
        if method == "mgsr_vllm":  # the student's weights into the engine once per rollout: read + write, bf16
            W = student.matmul_params * w.weight_bytes
            phases.append(("vLLM weight sync", scale(dense(dev, 0.0, 2.0 * W, 0, 0), per)))
        for r in range(w.scrg_rounds):
            tf, tb = forward(teacher, w, rows, P + T)
            sf, sb = forward(student, w, rows, P + T)
            n_regen = round(w.regen_frac * T)
            phases += [
                (f"SCRG {r + 1}: teacher score", scale(dense(dev, tf, tb, 1, teacher.n_layer), per)),
                (f"SCRG {r + 1}: student score", scale(dense(dev, sf, sb, 1, student.n_layer), per)),
                (f"SCRG {r + 1}: re-generate", scale(decode(student, w, rows, P + T - n_regen, n_regen, gen_dev), per)),
            ]
            if method == "mgsr_vllm":  # the kept response is a new prompt: prefix caching covers the prompt only
                kf, kb = forward(student, w, rows, T - n_regen, P)
                phases.append((f"SCRG {r + 1}: vLLM re-prefill", scale(dense(gen_dev, kf, kb, 1, student.n_layer), per)))
        return phases + loss_phases(teacher, student, trainable, w, dev, P + T, T, w.loss_passes_mgsr, "loss")
    if method in ("gkd", "distillm", "minillm"):
        share = {"gkd": w.gkd_student_prob, "distillm": w.distillm_fresh, "minillm": 1.0}[method]
        phases = rollout_phases(student, w, dev, w.batch, share, teacher if method == "minillm" else None)
        return phases + loss_phases(teacher, student, trainable, w, dev, P + T, T, w.loss_passes_kd, "loss")
    raise ValueError(f"unknown method {method!r}")


def total_ms(phases) -> float:
    return sum(p["ms"] for _, p in phases)


def with_step_overhead(phases, dev: Device):
    if not dev.step_overhead_s:
        return phases
    return [*phases, ("per-step overhead", _phase(0.0, 0.0, 0.0, 0.0, dev.step_overhead_s))]


# third-party step-time multiples of KD quoted in issue 13 (one workload, their own code)
PEERS = {"distillm": 2.05, "gkd": 3.2, "minillm": 6.9}


def predict(pair: str, w: Workload, dev: Device) -> dict:
    steps = {m: with_step_overhead(step(m, pair, w, dev), dev)
             for m in ("kd", "mgsr", "mgsr_vllm", "gkd", "distillm", "minillm")}
    kd = total_ms(steps["kd"])
    return {"pair": pair, "device": asdict(dev), "workload": asdict(w),
            "phases": {m: [{"phase": n, **p} for n, p in ph] for m, ph in steps.items()},
            "step_ms": {m: total_ms(ph) for m, ph in steps.items()},
            "x_kd": {m: total_ms(ph) / kd for m, ph in steps.items()}}


def sweep(dev: Device, base: Workload, pairs=("gpt2_xl_to_gpt2", "openllama2_7b_to_3b"),
          every=(1, 2, 4), ks=(1, 4, 8)) -> list[dict]:
    rows = []
    for pair in pairs:
        for n in every:
            row = {"pair": pair, "every_n": n}
            for k in ks:
                row[f"k={k}"] = predict(pair, replace(base, every_n=n, rollout_batches=k), dev)["x_kd"]["mgsr"]
            rows.append(row)
    return rows


def tiny_check(step_cost_json: Path, dev: Device | None = None) -> dict:
    """The tiny pair on this CPU against bench/results/step_cost.json (batch 8, prompts padded to 34 tokens,
    gold responses to 18, 32-token rollouts, f = 0.9): the per-decode-step overhead is calibrated from one
    measured difference (mgsr_rounds0 - mgsr_gold = one rollout of 32 decode steps), the rest is predicted."""
    dev = dev or calibrate_cpu()
    meas = {r["method"]: r["step_s"] for r in json.loads(step_cost_json.read_text())["steps"]}
    w = Workload(batch=8, prompt_len=34, new_tokens=32, gold_len=18, weight_bytes=4, act_bytes=4)
    roll = total_ms(rollout_phases(PAIRS["tiny"][1], w, dev, w.batch, 1.0)) / 1e3
    overhead = max(0.0, (meas["mgsr_rounds0"] - meas["mgsr_gold"] - roll) / w.new_tokens)
    kd_roof = total_ms(step("kd", "tiny", w, dev)) / 1e3
    dev = replace(dev, decode_step_overhead_s=overhead, step_overhead_s=max(0.0, meas["kd"] - kd_roof))
    pred = predict("tiny", w, dev)
    kd_pred = pred["step_ms"]["kd"] / 1e3
    # measured step_cost rows and the workloads they correspond to (GKD: lambda 0.5 there; DistiLLM ~0.5)
    cases = [("mgsr", "mgsr", w), ("mgsr_every4", "mgsr", replace(w, every_n=4)),
             ("gkd", "gkd", replace(w, gkd_student_prob=0.5)), ("distillm", "distillm", w)]
    rows = [{"method": "kd", "measured_s": meas["kd"], "predicted_s": kd_pred, "measured_x_kd": 1.0,
             "predicted_x_kd": 1.0}]
    for name, method, wl in cases:
        p = predict("tiny", wl, dev)
        rows.append({"method": name, "measured_s": meas[name], "predicted_s": p["step_ms"][method] / 1e3,
                     "measured_x_kd": meas[name] / meas["kd"], "predicted_x_kd": p["x_kd"][method]})
    return {"device": asdict(dev), "decode_step_overhead_ms": overhead * 1e3, "rollout_roofline_s": roll,
            "step_overhead_ms": dev.step_overhead_s * 1e3, "kd_roofline_s": kd_roof,
            "calibrated_on": "decode step: mgsr_rounds0 - mgsr_gold; per step: kd", "rows": rows, "prediction": pred}


def phase_rows(pred: dict, method: str) -> list[dict]:
    return [{"phase": p["phase"], "GFLOP": p["flops"] / 1e9, "GB": p["bytes"] / 1e9, "compute_ms": p["compute_ms"],
             "memory_ms": p["memory_ms"], "overhead_ms": p["overhead_ms"], "ms": p["ms"], "bound": p["bound"]} for p in pred["phases"][method]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", default="gpt2_xl_to_gpt2", choices=list(PAIRS))
    p.add_argument("--gpu", default="h100", choices=[*DEVICES, "cpu"], help="cpu: measured here (calibrate_cpu)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--gold-len", type=int, default=None, help="KD's response length (default: --new-tokens)")
    p.add_argument("--every-n", type=int, default=1, help="scrg.every_n_steps")
    p.add_argument("--rollout-batches", type=int, default=1, help="batches generated in one decode call")
    p.add_argument("--regen-frac", type=float, default=0.9, help="SCRG re-generation / full generation (0.6: target)")
    p.add_argument("--mfu", type=float, default=None, help="compute efficiency (default 0.5 on GPUs)")
    p.add_argument("--bw-eff", type=float, default=None, help="bandwidth efficiency (default 0.8 on GPUs)")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device's peak")
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="override the device's bandwidth")
    p.add_argument("--decode-step-overhead-us", type=float, default=None)
    p.add_argument("--layer-overhead-us", type=float, default=None)
    p.add_argument("--sweep", action="store_true", help="also MGSR/KD over every_n 1/2/4 x rollout_batches 1/4/8")
    p.add_argument("--tiny-check", action="store_true", help="also the tiny pair on this CPU vs step_cost.json")
    p.add_argument("--step-cost-json", default=str(REPO / "bench" / "results" / "step_cost.json"))
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "cost_model.json"))
    args = p.parse_args()

    dev = calibrate_cpu() if args.gpu == "cpu" else DEVICES[args.gpu]
    for field, val, mult in (("mfu", args.mfu, 1), ("bw_eff", args.bw_eff, 1), ("peak_flops", args.peak_tflops, 1e12),
                             ("bandwidth", args.bandwidth_gbs, 1e9),
                             ("decode_step_overhead_s", args.decode_step_overhead_us, 1e-6),
                             ("layer_overhead_s", args.layer_overhead_us, 1e-6)):
        if val is not None:
            dev = replace(dev, **{field: val * mult})
    w = Workload(batch=args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens, gold_len=args.gold_len,
                 every_n=args.every_n, rollout_batches=args.rollout_batches, regen_frac=args.regen_frac)
    pred = predict(args.pair, w, dev)
    payload = {"machine": machine(), "args": vars(args), "prediction": pred}
    if args.sweep:
        payload["sweep"] = sweep(dev, w)
    if args.tiny_check:
        payload["tiny_check"] = tiny_check(Path(args.step_cost_json))
    path = write_json(args.out, payload)

    print(f"wrote {path}\n")
    if args.tiny_check:
        tc = payload["tiny_check"]
        d = tc["device"]
        print(f"tiny pair on this CPU ({d['peak_flops'] / 1e9:.1f} GFLOP/s, {d['bandwidth'] / 1e9:.1f} GB/s measured; "
              f"decode-step overhead {tc['decode_step_overhead_ms']:.2f} ms, per-step {tc['step_overhead_ms']:.1f} ms, "
              f"calibrated on {tc['calibrated_on']}) "
              f"vs {args.step_cost_json}:")
        print(table(tc["rows"], ["method", "measured_s", "predicted_s", "measured_x_kd", "predicted_x_kd"]) + "\n")
    if args.sweep:
        print(f"MGSR/KD on {dev.name} (batch {w.batch}, {w.prompt_len} + {w.new_tokens} tokens, f = {w.regen_frac}), "
              "every_n x rollout_batches k:")
        print(table(payload["sweep"], ["pair", "every_n", "k=1", "k=4", "k=8"]) + "\n")
    t, s, _ = PAIRS[args.pair]
    print(f"{args.pair} ({t.name} -> {s.name}) on {dev.name}: peak {dev.peak_flops / 1e12:.3g} TFLOP/s x mfu {dev.mfu}, "
          f"{dev.bandwidth / 1e12:.3g} TB/s x {dev.bw_eff}; batch {w.batch}, prompt {w.prompt_len}, "
          f"{w.new_tokens} new tokens, every_n {w.every_n}, rollout_batches {w.rollout_batches}, f {w.regen_frac}")
    for m in ("kd", "mgsr"):
        print(f"\n{m.upper()} step (phases amortised per step):")
        print(table(phase_rows(pred, m), ["phase", "GFLOP", "GB", "compute_ms", "memory_ms", "overhead_ms", "ms",
                                           "bound"]))
    rows = [{"method": m, "step_ms": pred["step_ms"][m], "x_kd": pred["x_kd"][m], "peer_quoted_x_kd": PEERS.get(m)}
            for m in ("kd", "mgsr", "mgsr_vllm", "gkd", "distillm", "minillm")]
    print("\nstep time as a multiple of KD (peer_quoted: third-party figures from issue 13, their own workload):")
    print(table(rows, ["method", "step_ms", "x_kd", "peer_quoted_x_kd"]))
    print(f"\nMGSR/KD = {pred['x_kd']['mgsr']:.2f}")


if __name__ == "__main__":
    main()
