"""Generation and training throughput of grpo.py for a fixed configuration, so later changes can be compared.

    python benchmarks/grpo_step.py                       # tiny-base, 16 prompts x 8 completions, 20 steps, CPU
    python benchmarks/grpo_step.py --model Qwen/Qwen3-0.6B --dataset gsm8k.jsonl --max-new-tokens 256

Runs the real `grpo.py` command line in a subprocess (no evaluation, no KL probe) and reports the median over the
steps after the first (warm-up) of perf/gen_tokens_per_s (sampled completion tokens / generation time),
perf/train_tokens_per_s (prompt + completion tokens through forward and backward / training time) and perf/step_s.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Args:
    model: str = "assets/tiny-base"
    """policy to benchmark"""
    dataset: str = "assets/data/prompts.jsonl"
    """prompts"""
    steps: int = 20
    """GRPO steps to run (the first is a warm-up)"""
    prompts_per_step: int = 16
    """prompts per step"""
    group_size: int = 8
    """completions per prompt"""
    max_new_tokens: int = 8
    """completion budget"""
    micro_batch_size: int = 64
    """completions per forward/backward"""


def main(args: Args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            str(ROOT / "grpo.py"),
            "--model",
            args.model,
            "--dataset",
            args.dataset,
            "--max-steps",
            str(args.steps),
            "--prompts-per-step",
            str(args.prompts_per_step),
            "--group-size",
            str(args.group_size),
            "--max-new-tokens",
            str(args.max_new_tokens),
            "--micro-batch-size",
            str(args.micro_batch_size),
            "--eval-prompts",
            "",
            "--eval-every",
            "0",
            "--kl-every",
            "0",
            "--output-dir",
            tmp,
            "--run-name",
            "bench",
        ]
        subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
        rows = [json.loads(line) for line in (Path(tmp) / "bench" / "metrics.jsonl").open()]
    steps = [r for r in rows if "perf/step_s" in r][1:]
    print(
        f"grpo.py on {args.model}: {args.prompts_per_step} prompts x {args.group_size} completions, "
        f"max_new_tokens {args.max_new_tokens}, {len(steps)} steps after warm-up (medians)"
    )
    print("| gen tokens/s | train tokens/s | step (s) |")
    print("|---|---|---|")
    med = {
        k: statistics.median(r[k] for r in steps)
        for k in ("perf/gen_tokens_per_s", "perf/train_tokens_per_s", "perf/step_s")
    }
    print(f"| {med['perf/gen_tokens_per_s']:.0f} | {med['perf/train_tokens_per_s']:.0f} | {med['perf/step_s']:.3f} |")


if __name__ == "__main__":
    main(tyro.cli(Args))
