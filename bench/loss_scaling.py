"""Loss cost vs vocabulary size and sequence length: DAC-KL (soft mask = learnable head's path, hard mask = fixed
head's path, and the module with f_sub), the span loss and the plain forward KL, forward + backward, on CPU or GPU.

    python bench/loss_scaling.py                      # vocab sweep 8k..152k, length sweep at 50k, + "before"
    python bench/loss_scaling.py --quick              # small grid, a minute or two
    python bench/loss_scaling.py --before-rev none    # skip the pre-optimisation DAC-KL
    python bench/loss_scaling.py --reuse-memory       # freed memory reused, as on a GPU: no page-fault share

Inputs: LM-like teacher logits (a Zipf-shaped spread plus noise, so a few hundred classes hold most of the mass,
as in a trained model's next-token distributions) and a student = teacher + noise; `--teacher flat` draws
N(0, 3^2) logits instead (the worst case for the hard mask's top-k path). Every token is a response token.
"before" is DAC-KL as of git revision `--before-rev` (the plain-autograd implementation), loaded from git.
Ratios are to the forward KL of the same inputs, measured round-robin in one process.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import (
    REPO,
    add_reuse_memory_arg,
    add_threads_arg,
    interleaved_medians,
    machine,
    op_shares,
    peak_bytes,
    reuse_memory,
    set_threads,
    table,
    write_json,
)

from mgsr.losses import dac_kl_loss, divergence_loss, span_correlation_loss
from mgsr.losses.dac_kl import TOPK_CAP
from mgsr.objectives import DacKl

BEFORE_REV = "4709318"  # last revision with the plain-autograd DAC-KL


def load_before(rev: str):
    """dac_kl_loss of git revision `rev`, or None. Its whole mgsr/losses package is loaded, renamed to
    mgsr_before.losses, so a revision whose dac_kl.py imports sibling modules gets its own, not today's."""
    if rev in ("", "none"):
        return None
    root = Path(tempfile.mkdtemp()) / "mgsr_before"
    try:
        names = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:mgsr/losses"], cwd=REPO,
                               capture_output=True, text=True, check=True, timeout=30).stdout.split()
        (root / "losses").mkdir(parents=True)
        (root / "__init__.py").write_text("")
        for name in (n for n in names if n.endswith(".py")):
            src = subprocess.run(["git", "show", f"{rev}:mgsr/losses/{name}"], cwd=REPO, capture_output=True,
                                 text=True, check=True, timeout=30).stdout
            (root / "losses" / name).write_text(src.replace("mgsr.losses", "mgsr_before.losses"))
    except (OSError, subprocess.SubprocessError):
        print(f"(no git revision {rev}: skipping the 'before' rows)")
        return None
    sys.path.insert(0, str(root.parent))
    for name in [m for m in sys.modules if m == "mgsr_before" or m.startswith("mgsr_before.")]:
        del sys.modules[name]
    return importlib.import_module("mgsr_before.losses.dac_kl").dac_kl_loss


def make_logits(n: int, vocab: int, kind: str, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "flat":
        t = torch.randn(1, n, vocab, generator=g) * 3
    else:
        # p ~ rank^-1.5 times lognormal noise: top-256 classes hold ~97% of the mass at 50k classes
        rank = torch.rand(n, vocab, generator=g).argsort(dim=-1).float() + 1.0
        t = (-1.5 * rank.log() + torch.randn(n, vocab, generator=g)).unsqueeze(0)
    s = t + torch.randn(t.shape, generator=g)
    return t.to(device), s.to(device)


def cases(t, s, before, with_before: bool) -> dict:
    n = t.shape[1]
    mask = torch.ones(1, n, dtype=torch.bool, device=t.device)
    pairs = torch.ones(1, n - 1, dtype=torch.bool, device=t.device)
    lo = torch.full((1, n), 0.15, device=t.device)
    up = torch.full((1, n), 0.85, device=t.device)
    head = DacKl(head="learnable").to(t.device)

    def step(loss_fn):
        def run():
            sg = s.clone().requires_grad_()
            loss_fn(sg).backward()
        return run

    def soft(fn):
        return lambda sg: fn(t, sg, mask, lo.clone().requires_grad_(), up.clone().requires_grad_()).loss

    def hard(fn):
        return lambda sg: fn(t, sg, mask, 0.2, 0.8, hard=True).loss

    out = {
        "kl": step(lambda sg: divergence_loss("fkl", t, sg, mask)),
        "dac_soft": step(soft(dac_kl_loss)),
        "dac_hard": step(hard(dac_kl_loss)),
        "dac_module": step(lambda sg: head(t, sg, mask)[0]),
        "span": step(lambda sg: span_correlation_loss(t, sg, pairs).loss),
    }
    if before is not None and with_before:
        out["dac_soft_before"] = step(soft(before))
        out["dac_hard_before"] = step(hard(before))
    return out


def measure(vocab: int, n: int, kind: str, before, args, device) -> list[dict]:
    t, s = make_logits(n, vocab, kind, device)
    top_mass = float(torch.softmax(t.float(), -1).topk(min(TOPK_CAP, vocab), dim=-1).values.sum(-1).mean())
    fns = cases(t, s, before, with_before=vocab <= args.before_max_vocab)
    timing = interleaved_medians(fns, repeats=args.repeats)
    rows = []
    for name, fn in fns.items():
        rows.append({"loss": name, "vocab": vocab, "tokens": n, "teacher": kind, "median_s": timing[name]["median_s"],
                     "x_kl": timing[name]["median_s"] / timing["kl"]["median_s"],
                     "peak_mb": peak_bytes(fn) / 2**20 if args.memory else None, "top256_mass": top_mass})
    return rows


GROUPS = {"sort": ("aten::sort",), "gather/scatter/index": ("aten::gather", "aten::scatter_", "aten::scatter",
                                                             "aten::index_select", "aten::index_put_",
                                                             "aten::index_add_", "aten::index")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, nargs="+", default=[8192, 32768, 50257, 151936])
    p.add_argument("--tokens", type=int, default=128, help="response tokens (B*T) in the vocabulary sweep")
    p.add_argument("--seq", type=int, nargs="+", default=[32, 128, 512], help="tokens in the length sweep")
    p.add_argument("--seq-vocab", type=int, default=50257)
    p.add_argument("--teacher", choices=["lm", "flat", "both"], default="both",
                   help="lm-like (default sweeps) and/or flat teacher logits; 'both' adds a flat row at --seq-vocab")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--before-rev", default=BEFORE_REV)
    p.add_argument("--before-max-vocab", type=int, default=151936)
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--quick", action="store_true", help="vocab 8k/50k, 64 tokens, 2 repeats")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "loss_scaling.json"))
    add_reuse_memory_arg(p)
    add_threads_arg(p)
    args = p.parse_args()
    malloc_env = reuse_memory(args)
    set_threads(args.threads)
    if args.quick:
        args.vocab, args.tokens, args.seq, args.repeats = [8192, 50257], 64, [64], 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    before = load_before(args.before_rev)
    kinds = ["lm", "flat"] if args.teacher == "both" else [args.teacher]

    rows = []
    for vocab in args.vocab:
        rows += measure(vocab, args.tokens, kinds[0], before, args, device)
        print(f"vocab {vocab}: done", flush=True)
    for n in args.seq:
        if n != args.tokens or args.seq_vocab not in args.vocab:
            rows += measure(args.seq_vocab, n, kinds[0], before, args, device)
        print(f"tokens {n}: done", flush=True)
    if "flat" in kinds and kinds[0] != "flat":
        rows += measure(args.seq_vocab, args.tokens, "flat", before, args, device)

    # where the time goes in the default (soft) DAC-KL at --seq-vocab
    t, s = make_logits(args.tokens, args.seq_vocab, "lm", device)
    fns = cases(t, s, before, with_before=True)
    shares = {name: op_shares(fns[name], GROUPS) for name in ("dac_soft", "dac_hard", "kl")}
    if "dac_soft_before" in fns:
        shares["dac_soft_before"] = op_shares(fns["dac_soft_before"], GROUPS)

    payload = {"machine": machine(), "args": vars(args), "rows": rows, "op_shares": shares,
               "malloc_env": malloc_env}
    path = write_json(args.out, payload)
    share_rows = [{"loss": k, **{g: f"{v:.0%}" for g, v in sh.items()}} for k, sh in shares.items()]
    print(f"\nwrote {path}\n")
    print(f"where the time goes (fwd+bwd, {args.tokens} tokens, vocab {args.seq_vocab}, lm teacher):")
    print(table(share_rows, ["loss", *GROUPS, "other"]))
    memory = "freed memory reused (--reuse-memory)" if args.reuse_memory else "default allocator"
    print(f"\nloss cost, forward + backward, {payload['machine']['cpu']} ({device}, {memory}); "
          "x_kl = time / forward KL's")
    print(table(rows, ["loss", "vocab", "tokens", "teacher", "median_s", "x_kl", "peak_mb", "top256_mass"]))


if __name__ == "__main__":
    main()
