"""Peak memory and time of token log-probs through an LM head, forward + backward: naive vs chunked.

    python benchmarks/logprobs.py                      # Qwen2.5-0.5B's head: H=896, V=151936, N=2048, fp32, CPU
    python benchmarks/logprobs.py --n 512 --repeats 2  # a quicker look

naive:   logits = hidden @ W.T (N, V); log_softmax; gather; backward through all of it
chunked: common.logprobs.chunked_logprobs (custom autograd, recomputes each chunk in backward)

Each variant runs in a fresh subprocess. Memory is the peak resident set size (ru_maxrss) minus the resident size
after the inputs (W, hidden) were allocated: what the computation itself adds, weight gradient included.
Time is the median of --repeats forward+backward passes after one warm-up pass, both variants in this one run.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro
from qwen3_shape import rss_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@dataclass
class Args:
    n: int = 2048
    """tokens (rows)"""
    hidden: int = 896
    """hidden size H"""
    vocab: int = 151936
    """vocabulary size V"""
    repeats: int = 3
    """timed passes per variant (after one warm-up)"""
    chunk_size: int | None = None
    """rows per chunk (default: common.logprobs' automatic choice)"""
    variant: str | None = None
    """internal: run one variant in this process and print JSON"""


def run_variant(args: Args) -> dict:
    import torch

    from common.logprobs import chunked_logprobs

    torch.manual_seed(0)
    weight = (torch.randn(args.vocab, args.hidden) * 0.02).requires_grad_()
    hidden = torch.randn(args.n, args.hidden).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.n,))

    def step():
        if args.variant == "naive":
            logits = hidden @ weight.t()  # (N, V)
            logps = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
        else:
            logps = chunked_logprobs(hidden, weight, targets, chunk_size=args.chunk_size)
        logps.sum().backward()
        weight.grad, hidden.grad = None, None

    base = rss_bytes()
    t0 = time.perf_counter()
    step()  # the first pass is the memory measurement and the warm-up
    first = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"variant": args.variant, "peak_mb": peak / 2**20, "time_s": statistics.median(times) if times else first}


def main(args: Args) -> None:
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {}
    for variant in ("naive", "chunked"):
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            variant,
            "--n",
            str(args.n),
            "--hidden",
            str(args.hidden),
            "--vocab",
            str(args.vocab),
            "--repeats",
            str(args.repeats),
        ]
        if args.chunk_size:
            cmd += ["--chunk-size", str(args.chunk_size)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    weight_mb = args.vocab * args.hidden * 4 / 2**20
    naive, chunked = results["naive"], results["chunked"]
    print(f"N={args.n} H={args.hidden} V={args.vocab} fp32 CPU; weight gradient alone = {weight_mb:.0f} MB")
    print("| variant | peak memory (MB) | time fwd+bwd (s) |")
    print("|---|---|---|")
    for r in (naive, chunked):
        print(f"| {r['variant']} | {r['peak_mb']:.0f} | {r['time_s']:.3f} |")
    print(
        f"| chunked / naive | {chunked['peak_mb'] / naive['peak_mb']:.2f}x | "
        f"{chunked['time_s'] / naive['time_s']:.2f}x |"
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
