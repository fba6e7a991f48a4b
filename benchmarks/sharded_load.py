"""Peak host memory and time of loading a model under torchrun: each process reading only its FSDP2 shards
(`load_model(..., sharded_load=True)`, what the scripts do) against loading the whole checkpoint in every process and
sharding it afterwards (the path before; `--whole`).

    python benchmarks/sharded_load.py                 # Qwen3-0.6B-shaped, 28 layers, saved in bf16 (1.19 GB)

The checkpoint is a random model of Qwen3-0.6B's shape (benchmarks/qwen3_shape.py) written once to `--model-dir` in
bf16, as the hub's is. Each configuration runs in fresh `torchrun --nproc_per_node=2` processes, sharded and whole
interleaved, `--repeats` times; reported: the peak RSS of each process while loading and placing, above what it held
before (max over the two processes, median over repeats), as a multiple of the checkpoint's size, the wall time of
load_model + dist.wrap, and of that the fused-head check (`check_fused_head`: two forwards of 16 tokens; a sharded
load runs them through FSDP, all-gathering every block twice, a whole load on the plain model before sharding).
Placements:
  train-mixed    --dtype bfloat16, trained: fp32 master weights sharded (what `--dtype auto` does on a GPU)
  frozen-sharded --dtype bfloat16, frozen, `--shard-frozen` (a reference or teacher sharded)
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
from qwen3_shape import qwen3_0_6b_shaped

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "benchmarks" / "sharded_load_worker.py"
PLACEMENTS = {
    "train-mixed": ["--place", "train", "--dtype", "bfloat16"],
    "frozen-sharded": ["--place", "frozen-sharded", "--dtype", "bfloat16"],
}


@dataclass
class Args:
    model_dir: str = "/tmp/cleanpost-qwen3-0.6b-shaped"
    """where the random checkpoint is written (reused when it exists)"""
    layers: int = 28
    """transformer layers (Qwen3-0.6B has 28)"""
    repeats: int = 2
    """runs of each (placement, path)"""


def run(model_dir: Path, flags: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER)]
        subprocess.run([*cmd, str(model_dir), out, *flags, "--stats-only"], check=True, capture_output=True)
        return [torch.load(Path(out) / f"rank{r}.pt") for r in range(2)]


def main(args: Args) -> None:
    model_dir = Path(args.model_dir)
    if not (model_dir / "model.safetensors").exists():
        qwen3_0_6b_shaped(args.layers, dtype=torch.bfloat16).save_pretrained(model_dir)
    size = (model_dir / "model.safetensors").stat().st_size
    print(f"checkpoint: {model_dir} ({size / 2**30:.2f} GiB, bf16), 2 processes (gloo, CPU)\n")
    print(
        "| placement | path | peak RSS per process while loading | x checkpoint | load + wrap | of which head check |"
    )
    print("|---|---|---|---|---|---|")
    for name, flags in PLACEMENTS.items():
        results = {"sharded": [], "whole": []}
        for _ in range(args.repeats):
            for path, runs in results.items():  # interleaved
                ranks = run(model_dir, flags + (["--whole"] if path == "whole" else []))
                peak = max(r["rss_peak"] - r["rss_before"] for r in ranks)
                runs.append((peak, max(r["seconds"] for r in ranks), max(r["check_seconds"] for r in ranks)))
        for path, runs in results.items():
            peak, seconds, check = (statistics.median(column) for column in zip(*runs))
            print(
                f"| {name} | {path} | {peak / 2**30:.2f} GiB | {peak / size:.2f}x | {seconds:.1f} s | {check:.1f} s |"
            )


if __name__ == "__main__":
    main(tyro.cli(Args))
