"""Peak memory of one opd.py step at a real vocabulary: the teacher statistics and the student update of each
objective, for the code in `--repo` (default: this checkout), so a before/after pair is two runs of this script.

    python benchmarks/opd_memory.py                                   # this checkout
    git worktree add /tmp/before HEAD~1 && python benchmarks/opd_memory.py --repo /tmp/before

Student and teacher are Qwen3-0.6B-shaped with random weights (H=1024, V=151,936, tied), `--layers` layers, fp32;
one micro-batch of `--batch` completions of `--completion` tokens after `--prompt` prompt tokens. Each objective runs
in a fresh process and measures its peak RSS minus the RSS once both models and the inputs exist:
  sampled: the rollout-time no-grad pass (student log-probs + `teacher_token_stats`: teacher log-prob, top-1/top-5)
           and the student's forward + backward of the sampled-token loss
  full:    the same no-grad pass and `dense_divergence` forward + backward (`--objective full`)
  forward-topk, jsd: the same with the other dense objectives (in a checkout that has them; `--objectives`)
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro
from qwen3_shape import qwen3_0_6b_shaped, rss_bytes

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Args:
    repo: str = str(ROOT)
    """checkout whose opd.py and common/ are measured"""
    layers: int = 2
    """transformer layers of each model"""
    batch: int = 8
    """completions in the micro-batch"""
    prompt: int = 64
    """prompt tokens"""
    completion: int = 512
    """completion tokens"""
    objectives: tuple[str, ...] = ("sampled", "full", "forward-topk", "jsd")
    """the objectives to measure, each in a fresh process"""
    objective: str | None = None
    """internal: run one objective in this process and print JSON"""


def run(args: Args) -> dict:
    import torch

    sys.path.insert(0, args.repo)
    import opd
    from common.logprobs import completion_logprobs

    student = qwen3_0_6b_shaped(args.layers, seed=0)
    teacher = qwen3_0_6b_shaped(args.layers, seed=1).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    part = [
        torch.randint(0, 151669, (args.batch, args.prompt), generator=g),
        torch.ones(args.batch, args.prompt, dtype=torch.long),
        torch.randint(0, 151669, (args.batch, args.completion), generator=g),
        torch.ones(args.batch, args.completion, dtype=torch.long),
    ]
    mask = part[3].float()
    vocab = 151669
    base = rss_bytes()
    t0 = time.perf_counter()
    with torch.no_grad():
        old_logps = completion_logprobs(student, *part, 1.0, vocab=vocab)
        teacher_logps, top1, _ = opd.teacher_token_stats(teacher, *part, 1.0, vocab)
    if args.objective == "sampled":
        logps = completion_logprobs(student, *part, 1.0, vocab=vocab)
        tok_loss = opd.sampled_token_loss(logps, old_logps, teacher_logps, 0.2)
    else:
        if hasattr(opd, "dense_divergence"):
            tok_loss = opd.dense_divergence(student, teacher, part, 1.0, 256, vocab, args.objective)
        else:  # a checkout from before the forward-topk and jsd objectives
            tok_loss = opd.full_reverse_kl(student, teacher, part, 1.0, 256, vocab)
    ((tok_loss * mask).sum() / mask.sum()).backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"objective": args.objective, "peak_gb": peak / 2**30, "time_s": seconds, "top1": top1.float().mean().item()}


def main(args: Args) -> None:
    if args.objective:
        print(json.dumps(run(args)))
        return
    flags = ["--repo", args.repo, "--layers", args.layers, "--batch", args.batch]
    flags = [str(x) for x in flags + ["--prompt", args.prompt, "--completion", args.completion]]
    print(
        f"{args.repo}: opd step, Qwen3-0.6B shape, {args.layers} layers, fp32, CPU; {args.batch} x "
        f"({args.prompt} + {args.completion}) tokens"
    )
    print("| objective | peak memory (GB) | time (s) |")
    print("|---|---|---|")
    for objective in args.objectives:
        cmd = [sys.executable, __file__, *flags, "--objective", objective]
        out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(f"| {objective} | {out['peak_gb']:.2f} | {out['time_s']:.1f} |")


if __name__ == "__main__":
    main(tyro.cli(Args))
