"""What kernel fusion could buy the learnable head's DAC-KL (the soft top-k path's tail) on this device.

    python bench/dac_kl_fusion_probe.py                  # ~1 min (torch.compile needs a C++ compiler on CPU)
    python bench/dac_kl_fusion_probe.py --reuse-memory   # freed memory reused, as on a GPU

A probe, not a loss: `TopkSoftMassMerge` (mgsr/losses/dac_kl_fast.py) spends most of its time in V-wide passes
over the tail classes: the histogram of the tail's mass over log p, then nine row sums under the soft mask
(p m, q m, pd m, p m(1-m), q m(1-m), pd m(1-m), p, q, |pd|), and in backward the tail's gradient. Each is
written here as one expression that recomputes p, q and m from log p and log q instead of storing them, timed
eager and through `torch.compile` (one fused loop each), next to the forward KL's forward + backward on the same
inputs. The sum of the three fused phases plus what every path needs anyway (the student's log-softmax and the
teacher's top-k) bounds what a fused DAC-KL could cost here.
"""

from __future__ import annotations

import argparse

import torch
from common import (
    REPO,
    add_reuse_memory_arg,
    add_threads_arg,
    interleaved_medians,
    machine,
    reuse_memory,
    set_threads,
    table,
    write_json,
)
from loss_scaling import make_logits

from mgsr.losses import divergence_loss
from mgsr.losses.dac_kl import SOFT_BUCKET_WIDTH, SOFT_BUCKETS, SOFT_TOPK_CAP

KAPPA = 50.0


def _bucket(lp, lp_k):
    """Flat index of each class's bucket in the [n, buckets] histogram (as the loss computes it)."""
    x = ((lp_k - lp) * (1.0 / SOFT_BUCKET_WIDTH)).clamp(0, SOFT_BUCKETS - 1).to(torch.int64)
    return x + torch.arange(lp.shape[0], device=lp.device).unsqueeze(-1) * SOFT_BUCKETS


def histogram(lp, lp_k):
    p = torch.where(lp < lp_k, lp.exp(), 0.0)  # tail classes only (the head is the top-K: lp >= lp_K)
    flat = torch.zeros(lp.shape[0] * SOFT_BUCKETS, dtype=lp.dtype, device=lp.device)
    return flat.index_add(0, _bucket(lp, lp_k).view(-1), p.view(-1)).view(-1, SOFT_BUCKETS)


def _tail(lp, lq, lp_k, table):
    tail = lp < lp_k
    p, q = torch.where(tail, lp.exp(), 0.0), torch.where(tail, lq.exp(), 0.0)
    m = torch.sigmoid(table.view(-1)[_bucket(lp, lp_k)] + (0.5 * KAPPA) * p)
    return p, q, m


def tail_sums(lp, lq, lp_k, table):
    p, q, m = _tail(lp, lq, lp_k, table)
    pd, m1 = p * (lp - lq), m * (1 - m)
    return torch.stack([(p * m).sum(-1), (q * m).sum(-1), (pd * m).sum(-1), (p * m1).sum(-1), (q * m1).sum(-1),
                        (pd * m1).sum(-1), p.sum(-1), q.sum(-1), pd.abs().sum(-1)], -1)


def tail_grad(lp, lq, lp_k, table, a, b):
    """The tail's student gradient, q a + m (q b - p g) with per-row coefficients (values here arbitrary)."""
    p, q, m = _tail(lp, lq, lp_k, table)
    return q * a + m * (q * b - p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--repeats", type=int, default=7)
    add_reuse_memory_arg(ap)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "dac_kl_fusion_probe.json"))
    add_threads_arg(ap)
    args = ap.parse_args()
    malloc_env = reuse_memory(args)
    set_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t, s = make_logits(args.tokens, args.vocab, "lm", device)
    mask = torch.ones(1, args.tokens, dtype=torch.bool, device=device)
    lp, lq = torch.log_softmax(t[0], -1), torch.log_softmax(s[0], -1)
    lp_k = lp.topk(SOFT_TOPK_CAP, -1).values[:, -1:].contiguous()
    g = torch.Generator().manual_seed(0)
    table_ = (torch.randn(args.tokens, SOFT_BUCKETS, generator=g) * 0.1 - 3).to(device)
    a, b = (torch.rand(args.tokens, 1, generator=g).to(device) for _ in range(2))
    fused = {f.__name__: torch.compile(f, dynamic=False) for f in (histogram, tail_sums, tail_grad)}
    inputs = {"histogram": (lp, lp_k), "tail_sums": (lp, lq, lp_k, table_), "tail_grad": (lp, lq, lp_k, table_, a, b)}
    eager = {"histogram": histogram, "tail_sums": tail_sums, "tail_grad": tail_grad}
    errors = {}
    for name, f in fused.items():  # compile now, and check the fused loop computes the same thing
        ref, out = eager[name](*inputs[name]), f(*inputs[name])
        errors[name] = float(((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item())

    def fkl():
        sg = s.clone().requires_grad_()
        divergence_loss("fkl", t, sg, mask).backward()

    fns = {"forward KL (fwd + bwd)": fkl,
           "student log-softmax": lambda: torch.log_softmax(s[0], -1),
           f"teacher top-{SOFT_TOPK_CAP + 1}": lambda: lp.topk(SOFT_TOPK_CAP + 1, -1)}
    for name in eager:
        fns[f"{name}, eager"] = (lambda f, x: lambda: f(*x))(eager[name], inputs[name])
        fns[f"{name}, fused"] = (lambda f, x: lambda: f(*x))(fused[name], inputs[name])
    timing = interleaved_medians(fns, repeats=args.repeats)
    base = timing["forward KL (fwd + bwd)"]["median_s"]
    rows = [{"part": k, "median_s": v["median_s"], "x_kl": v["median_s"] / base,
             "fused_rel_error": errors.get(k.split(",")[0]) if k.endswith("fused") else None}
            for k, v in timing.items()]
    floor = sum(timing[k]["median_s"] for k in ("student log-softmax", f"teacher top-{SOFT_TOPK_CAP + 1}",
                                                   "histogram, fused", "tail_sums, fused", "tail_grad, fused"))
    rows.append({"part": "sum: log-softmax + top-k + the three fused phases", "median_s": floor, "x_kl": floor / base,
                 "fused_rel_error": None})
    payload = {"machine": machine(), "args": vars(args), "rows": rows,
               "malloc_env": malloc_env}
    path = write_json(args.out, payload)
    memory = "freed memory reused" if args.reuse_memory else "default allocator"
    print(f"\nwrote {path}\n\nDAC-KL soft tail, {args.tokens} tokens x {args.vocab} classes, {device} ({memory}); "
          "x_kl = / forward KL's forward + backward")
    print(table(rows, ["part", "median_s", "x_kl", "fused_rel_error"]))


if __name__ == "__main__":
    main()
