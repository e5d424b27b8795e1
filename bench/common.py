"""Shared by the benchmarks: interleaved timing, peak memory of a call, machine description, table + JSON output.

Benchmarks are scripts, not tests: `python bench/<name>.py --help`. Each prints a table last and writes JSON.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/x.py` from the repo root
    sys.path.insert(0, str(REPO))


def add_threads_arg(parser) -> None:
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a small shared CPU box, more threads mostly "
                             "measure waiting for the other core; the same for every candidate)")


def set_threads(n: int) -> None:
    torch.set_num_threads(max(1, n))


# --reuse-memory: large buffers from the heap (not a fresh mmap each) and freed memory never returned to the OS, as a
# caching allocator does on a GPU; glibc reads these at process start only, hence the re-exec
REUSE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**36)}


def add_reuse_memory_arg(parser) -> None:
    parser.add_argument("--reuse-memory", action="store_true",
                        help="re-run under glibc malloc settings that keep freed memory for reuse (no mmap per large "
                             "buffer, no trim), as a caching allocator does on a GPU: ratios then count arithmetic "
                             "and memory traffic only, not the page faults of fresh V-wide buffers")


def reuse_memory(args) -> dict:
    """Re-exec this script under REUSE_MEMORY_ENV when --reuse-memory asks for it; the malloc settings in effect."""
    if args.reuse_memory and any(os.environ.get(k) != v for k, v in REUSE_MEMORY_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **REUSE_MEMORY_ENV})
    return {k: os.environ.get(k) for k in REUSE_MEMORY_ENV}


def machine() -> dict:
    """What the figures were measured on."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load_avg_1min": load,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                        text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Median / min / max wall seconds of each callable, measured round-robin (A B C A B C ...), so a slow
    phase of a shared machine hits every candidate alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            times[name].append(time.perf_counter() - t0)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "n": len(v)} for k, v in times.items()}


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of the bytes torch allocated during `fn` (above what was live before it), from the profiler's
    allocation events: CPU tensors on CPU, CUDA's max_memory_allocated on a GPU."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        if e.device_type() == torch.autograd.DeviceType.CPU:
            cur += e.nbytes()
            peak = max(peak, cur)
    return peak


def op_shares(fn: Callable[[], object], groups: dict[str, tuple[str, ...]]) -> dict[str, float]:
    """Share of self CPU time in named groups of aten ops during one call of `fn` (the rest is 'other')."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    rows = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    total = sum(t for _, t in rows) or 1.0
    out = {g: sum(t for k, t in rows if k in ops) / total for g, ops in groups.items()}
    out["other"] = max(0.0, 1.0 - sum(out.values()))
    return out


def table(rows: list[dict], columns: list[str], floatfmt: str = "{:.3g}") -> str:
    """A markdown table of `rows` (dicts) with the given columns."""
    def cell(v):
        if isinstance(v, float):
            return floatfmt.format(v)
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path
