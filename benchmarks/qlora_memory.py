"""Training-state memory and step time of full fine-tuning, LoRA and QLoRA (nf4, int8) at a real model's shape, for
the lora.py in `--repo` (default: this checkout), so before/after is two runs of this script.

    python benchmarks/qlora_memory.py
    git worktree add /tmp/before HEAD~1 && python benchmarks/qlora_memory.py --repo /tmp/before --variants qlora-nf4

A Qwen3-0.6B-shaped model with random weights (H=1024, 28 layers, 16 heads x 128, 8 KV heads, MLP 3072,
V=151,936, tied), its base in bf16 (the GPU compute dtype; `--dtype bfloat16` on this CPU), LoRA r=16 on every
linear layer (lora.py's `all-linear`), AdamW; one micro-batch of `--batch` x `--length` tokens. Each variant runs in
a fresh process: one warm-up step, then `--steps` timed steps (forward, backward, optimizer step). Reported:
  state:  bytes of every tensor the training holds between steps (weights and quantized buffers, gradients,
          optimizer state; each storage counted once)
  saved:  bytes autograd keeps from the forward for the backward beyond the state (torch.autograd.graph.
          saved_tensors_hooks, each storage once; a saved parameter is state, not counted again)
  peak:   the process's peak RSS minus its RSS before the model was built
Full fine-tuning is measured with fp32 master weights and AdamW state, computing in bf16 under autocast (what
common.dist.wrap's mixed precision does on a GPU).
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
from qwen3_shape import qwen3_0_6b_shaped, rss_bytes

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Args:
    repo: str = str(ROOT)
    """checkout whose lora.py is measured"""
    variants: tuple[str, ...] = ("full", "lora", "qlora-nf4", "qlora-int8")
    """what to measure"""
    layers: int = 28
    """transformer layers (Qwen3-0.6B: 28)"""
    batch: int = 2
    """sequences per step"""
    length: int = 256
    """tokens per sequence"""
    steps: int = 2
    """timed steps (after one warm-up)"""
    variant: str | None = None
    """internal: run one variant in this process and print JSON"""


def storages(tensors) -> dict:
    """{(storage address, device): bytes} of `tensors`, each storage once."""
    return {(t.untyped_storage().data_ptr(), t.device): t.untyped_storage().nbytes() for t in tensors if t is not None}


def unique_bytes(tensors) -> int:
    return sum(storages(tensors).values())


def run(args: Args) -> dict:
    import torch

    sys.path.insert(0, args.repo)
    import lora
    from common.logprobs import token_logprobs

    base_rss = rss_bytes()
    full = args.variant == "full"
    model = qwen3_0_6b_shaped(args.layers, dtype=torch.float32 if full else torch.bfloat16)
    if full:
        params = list(model.parameters())
    else:
        quantize = args.variant.removeprefix("qlora-") if args.variant.startswith("qlora") else "none"
        wrapped = lora.add_lora(
            model,
            lora.target_names(model, "all-linear"),
            lora.Args(quantize=quantize, lora_r=16, lora_alpha=32),
        )
        params = [p for m in wrapped.values() for p in (m.lora_A, m.lora_B)]
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 151669, (args.batch, args.length), generator=g)
    mask = torch.ones_like(ids)
    saved = []

    def step(record=False):
        hooks = torch.autograd.graph.saved_tensors_hooks(
            (lambda t: saved.append(t) or t) if record else (lambda t: t), lambda t: t
        )
        with hooks, torch.autocast("cpu", dtype=torch.bfloat16, enabled=full):
            loss = -token_logprobs(model, ids, mask).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # the gradient buffers stay: part of the state

    step(record=True)
    saved_storages = storages(saved)  # {storage key: bytes}, before the step's tensors are freed
    saved.clear()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    state = [*model.parameters(), *model.buffers(), *(p.grad for p in params)]
    state += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    return {
        "variant": args.variant,
        "state_gb": unique_bytes(state) / 2**30,
        # what backward keeps beyond the state (a frozen weight autograd saves is a parameter, counted once)
        "saved_gb": sum(b for k, b in saved_storages.items() if k not in storages(state)) / 2**30,
        "peak_gb": peak / 2**30,
        "step_s": statistics.median(times),
    }


def main(args: Args) -> None:
    if args.variant:
        print(json.dumps(run(args)))
        return
    flags = ["--repo", args.repo, "--layers", str(args.layers), "--batch", str(args.batch)]
    flags += ["--length", str(args.length), "--steps", str(args.steps)]
    print(
        f"{args.repo}: Qwen3-0.6B shape, {args.layers} layers, bf16 base, LoRA r=16 all-linear, "
        f"{args.batch} x {args.length} tokens, CPU"
    )
    print("| variant | state (GB) | saved for backward (GB) | state + saved (GB) | peak RSS (GB) | step (s) |")
    print("|---|---|---|---|---|---|")
    for variant in args.variants:
        cmd = [sys.executable, __file__, *flags, "--variant", variant]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        r = json.loads(done.stdout.splitlines()[-1])
        print(
            f"| {variant} | {r['state_gb']:.3f} | {r['saved_gb']:.3f} | {r['state_gb'] + r['saved_gb']:.3f} | "
            f"{r['peak_gb']:.2f} | {r['step_s']:.1f} |"
        )


if __name__ == "__main__":
    main(tyro.cli(Args))
