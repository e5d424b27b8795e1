"""bench/cost_model.py (the roofline step-cost model) and bench/gpu_check.sh's no-CUDA exit."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import cost_model as cm  # noqa: E402

H100 = cm.DEVICES["h100"]
BIG = ("gpt2_xl_to_gpt2", "openllama2_7b_to_3b")


def test_flops_of_a_hand_made_config():
    m = cm.Arch("toy", n_layer=2, d_model=8, n_head=2, n_kv_head=1, d_ff=32, vocab=10)
    # d_kv = 1 * 8/2 = 4; per layer 2*64 + 2*8*4 + 2*8*32 = 128 + 64 + 512 = 704; x2 + head 80 = 1488
    assert m.d_kv == 4 and m.matmul_params == 1488
    w = cm.Workload(weight_bytes=2, act_bytes=2)
    flops, nbytes = cm.forward(m, w, rows=3, q=4)
    # 2 N B q + 4 L d B (q(q+1)/2) = 2*1488*3*4 + 4*2*8*3*10
    assert flops == 2 * 1488 * 12 + 4 * 2 * 8 * 3 * 10
    # W + B q V a + 2 L B q d_kv a
    assert nbytes == 1488 * 2 + 3 * 4 * 10 * 2 + 2 * 2 * 3 * 4 * 4 * 2
    dev = cm.Device("unit", peak_flops=1e9, bandwidth=1e9, mfu=1.0, bw_eff=1.0, layer_overhead_s=0.0,
                    decode_step_overhead_s=0.0)
    d = cm.decode(m, w, rows=3, c0=5, steps=2, dev=dev)  # contexts 6 and 7 after each step's token
    assert d["flops"] == 2 * (2 * 1488 * 3) + 4 * 2 * 8 * 3 * (6 + 7)
    assert d["bytes"] == 2 * (1488 * 2 + 3 * 10 * 2) + 2 * 2 * 3 * (6 + 7) * 4 * 2
    gpt2 = cm.PAIRS["gpt2_xl_to_gpt2"][1]
    assert abs(gpt2.matmul_params - 124e6) / 124e6 < 0.05  # GPT-2 small: ~124M (tied head counted once)


@pytest.mark.parametrize("pair", BIG)
def test_decode_memory_bound_prefill_compute_bound_on_h100(pair):
    phases = {n: p for n, p in cm.step("mgsr", pair, cm.Workload(), H100)}
    assert phases["rollout: decode"]["bound"] == "memory"
    assert phases["rollout: decode"]["memory_ms"] > 10 * phases["rollout: decode"]["compute_ms"]
    assert phases["rollout: prefill"]["bound"] == "compute"
    assert phases["SCRG 1: teacher score"]["bound"] == "compute"


@pytest.mark.parametrize("pair", BIG)
def test_ratio_falls_with_every_n_and_rollout_batches(pair):
    base = cm.Workload()
    r = {(n, k): cm.predict(pair, replace(base, every_n=n, rollout_batches=k), H100)["x_kd"]["mgsr"]
         for n in (1, 2, 4) for k in (1, 4, 8)}
    for k in (1, 4, 8):
        assert r[(1, k)] > r[(2, k)] > r[(4, k)] > 1.0
    for n in (1, 2, 4):
        assert r[(n, 1)] > r[(n, 4)] > r[(n, 8)]
    assert cm.predict(pair, replace(base, regen_frac=0.6), H100)["x_kd"]["mgsr"] < r[(1, 1)]


def test_kd_time_scales_with_tokens():
    t = {n: cm.predict("openllama2_7b_to_3b", cm.Workload(prompt_len=n, new_tokens=n), H100)["step_ms"]["kd"]
         for n in (128, 256, 512)}
    assert 1.8 < t[256] / t[128] < 2.5 and 1.8 < t[512] / t[256] < 2.5  # ~linear (+ attention's quadratic)
    b = {n: cm.predict("openllama2_7b_to_3b", cm.Workload(batch=n), H100)["step_ms"]["kd"] for n in (4, 8)}
    assert 1.8 < b[8] / b[4] < 2.1


def test_cli_writes_json(tmp_path):
    out = tmp_path / "cost.json"
    r = subprocess.run([sys.executable, "bench/cost_model.py", "--pair", "gpt2_xl_to_gpt2", "--gpu", "h200",
                        "--every-n", "2", "--rollout-batches", "4", "--sweep", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "MGSR/KD =" in r.stdout
    data = json.loads(out.read_text())
    pred = data["prediction"]
    assert pred["pair"] == "gpt2_xl_to_gpt2" and pred["workload"]["every_n"] == 2
    assert pred["workload"]["rollout_batches"] == 4 and pred["device"]["name"] == "H200"
    assert pred["x_kd"]["kd"] == 1.0 and pred["x_kd"]["mgsr"] > 1.0
    assert {"gkd", "distillm", "minillm"} <= set(pred["x_kd"])
    assert len(data["sweep"]) == 6


def test_tiny_check_against_the_cpu_measurement():
    dev = cm.Device("fixed cpu", peak_flops=50e9, bandwidth=40e9, mfu=1.0, bw_eff=1.0, layer_overhead_s=0.0,
                    decode_step_overhead_s=0.0)
    tc = cm.tiny_check(REPO / "bench" / "results" / "step_cost.json", dev)
    rows = {r["method"]: r for r in tc["rows"]}
    assert abs(rows["kd"]["predicted_s"] - rows["kd"]["measured_s"]) < 1e-9  # calibrated on KD
    assert tc["decode_step_overhead_ms"] > 1.0  # per-step overhead dominates decode at this size
    assert rows["mgsr"]["predicted_x_kd"] > rows["mgsr_every4"]["predicted_x_kd"]
    assert 0.7 < rows["mgsr"]["predicted_x_kd"] / rows["mgsr"]["measured_x_kd"] < 1.4


def test_gpu_check_exits_2_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    r = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env={"OMP_NUM_THREADS": "1", "PATH": f"{REPO / '.venv' / 'bin'}:/usr/local/bin:/usr/bin:/bin",
                            "OUT": str(tmp_path), "PYTHON": sys.executable})
    assert r.returncode == 2
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert lines == ["gpu_check: no CUDA device (torch.cuda.is_available() is false): nothing to check here"]
    assert not (tmp_path / "gpu_check.json").exists()
