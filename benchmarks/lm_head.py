"""The LM head only where a log-prob is needed: `completion_logprobs` with the head over every position (as before)
vs over the completion tokens only (`target_mask`), and the bf16 logits' rounding.

    python benchmarks/lm_head.py                 # Qwen3-0.6B's shape, 2 layers, prompt 1024 + completion 512
    python benchmarks/lm_head.py --layers 4 --repeats 3

The model is Qwen3-0.6B-shaped with random weights (H=1024, 16 heads x 128, 8 KV heads, MLP 3072, V=151,936, tied
embeddings), fp32, `--layers` layers. One sequence: `--prompt` prompt tokens and `--completion` completion tokens;
the timed work is the training use, forward + backward of the completion tokens' summed log-probs.
  all-rows:    token_logprobs over every position, then the completion slice (what completion_logprobs did)
  needed-rows: completion_logprobs (the head on the completion rows only)
Each variant runs in a fresh process, interleaved, `--repeats` timed passes after one warm-up; memory is the peak
RSS minus the RSS after the model and inputs exist. `precision` (one process): the same model in bf16; the mean and
p99 |log p - exact| over the completion tokens, exact = fp64 from the same bf16 hidden states and head, for logits
rounded to bf16 before the softmax (`h @ W.T` in bf16) and for `chunked_logprobs` now.
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
sys.path.insert(0, str(ROOT))


@dataclass
class Args:
    layers: int = 2
    """transformer layers (Qwen3-0.6B has 28; the head's share of the work shrinks with more)"""
    prompt: int = 1024
    """prompt tokens"""
    completion: int = 512
    """completion tokens"""
    repeats: int = 2
    """timed passes per process (after one warm-up)"""
    runs: int = 2
    """fresh processes per variant, interleaved"""
    variant: str | None = None
    """internal: run one variant in this process and print JSON"""


def inputs(args: Args):
    import torch

    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(0, 151669, (1, args.prompt), generator=g)
    completion_ids = torch.randint(0, 151669, (1, args.completion), generator=g)
    return prompt_ids, torch.ones_like(prompt_ids), completion_ids, torch.ones_like(completion_ids)


def run_variant(args: Args) -> dict:
    import torch

    from common.logprobs import completion_logprobs, token_logprobs

    model = qwen3_0_6b_shaped(args.layers, dtype=torch.float32)
    prompt_ids, prompt_mask, completion_ids, completion_mask = inputs(args)

    def step():
        if args.variant == "all-rows":
            ids, mask = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
            logps = token_logprobs(model, ids, mask)[:, args.prompt - 1 :]
        else:
            logps = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, 1.0)
        (logps * completion_mask).sum().backward()
        model.zero_grad(set_to_none=True)

    base = rss_bytes()
    step()  # warm-up, and the memory measurement
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"variant": args.variant, "time_s": statistics.median(times), "peak_gb": peak / 2**30}


def precision(args: Args) -> dict:
    import torch

    from common.logprobs import chunked_logprobs

    model = qwen3_0_6b_shaped(args.layers, dtype=torch.bfloat16).eval()
    prompt_ids, _, completion_ids, _ = inputs(args)
    ids = torch.cat([prompt_ids, completion_ids], 1)
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state[0, args.prompt - 1 : -1]  # (L, H) bf16
        weight = model.lm_head.weight  # (V, H) bf16
        targets = completion_ids[0]
        exact = torch.log_softmax(hidden.double() @ weight.double().t(), -1).gather(-1, targets[:, None])[:, 0]
        rounded = torch.log_softmax((hidden @ weight.t()).float(), -1).gather(-1, targets[:, None])[:, 0]
        ours = chunked_logprobs(hidden, weight, targets)
    out = {}
    for name, value in (("rounded", rounded), ("ours", ours)):
        err = (value.double() - exact).abs()
        out[name] = {"mean": err.mean().item(), "p99": err.quantile(0.99).item()}
    return out


def main(args: Args) -> None:
    if args.variant == "precision":
        print(json.dumps(precision(args)))
        return
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    flags = ["--layers", args.layers, "--prompt", args.prompt, "--completion", args.completion]
    flags = [str(x) for x in flags] + ["--repeats", str(args.repeats)]
    results = {"all-rows": [], "needed-rows": []}

    def run(variant):
        cmd = [sys.executable, __file__, "--variant", variant, *flags]
        return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])

    for _ in range(args.runs):
        for variant, runs in results.items():
            runs.append(run(variant))
    prec = run("precision")
    print(
        f"Qwen3-0.6B shape, {args.layers} layers, fp32, CPU; prompt {args.prompt} + completion {args.completion}; "
        f"forward + backward, median of {args.runs} processes x {args.repeats} passes"
    )
    print("| head over | time (s) | peak memory (GB) |")
    print("|---|---|---|")
    summary = {}
    for variant, runs in results.items():
        summary[variant] = (
            statistics.median(r["time_s"] for r in runs),
            statistics.median(r["peak_gb"] for r in runs),
        )
        print(f"| {variant} | {summary[variant][0]:.2f} | {summary[variant][1]:.2f} |")
    (t0, m0), (t1, m1) = summary["all-rows"], summary["needed-rows"]
    print(f"| needed / all | {t1 / t0:.2f}x | {m1 / m0:.2f}x |")
    print("bf16 log p error vs fp64 on the completion tokens (nats): mean / p99")
    for name, e in prec.items():
        print(f"  {name}: {e['mean']:.4f} / {e['p99']:.4f}")


if __name__ == "__main__":
    main(tyro.cli(Args))
