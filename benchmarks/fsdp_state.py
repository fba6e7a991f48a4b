"""Training state held by each process under FSDP2 (common.dist.wrap), for 1, 2 and 4 processes.

    python benchmarks/fsdp_state.py                                  # a 66M-parameter Llama, 1 / 2 / 4 processes
    python benchmarks/fsdp_state.py --hidden-size 256 --num-layers 4 --procs 1 2

For each process count it starts `torchrun --nproc_per_node=N` on this file (gloo on CPU), builds the same randomly
initialized Llama in every process, shards it with `common.dist.wrap(model, train=True)`, runs one forward/backward
through `common.logprobs.token_logprobs` and one AdamW step, then counts the bytes of the tensors the process holds
afterwards: its parameter shards, gradient shards and optimizer state (exp_avg, exp_avg_sq). These are the
persistent training state; activations and the per-block all-gather buffers of a forward come on top (on a GPU
they are what `torch.cuda.max_memory_allocated` adds). The numbers are exact byte counts, not timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@dataclass
class Args:
    hidden_size: int = 512
    """model width"""
    num_layers: int = 8
    """transformer blocks"""
    vocab_size: int = 32000
    """vocabulary (an untied head, as in Llama-2)"""
    procs: list[int] = field(default_factory=lambda: [1, 2, 4])
    """process counts to measure"""


def local_bytes(t) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def worker(args: Args) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from common import dist
    from common.logprobs import token_logprobs

    dist.init()
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden_size,
        intermediate_size=4 * args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=args.vocab_size,
        tie_word_embeddings=False,
    )
    model = dist.wrap(LlamaForCausalLM(config), train=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, args.vocab_size, (2, 64))
    (-token_logprobs(model, ids, torch.ones_like(ids)).mean()).backward()
    optimizer.step()
    params = sum(local_bytes(p) for p in model.parameters())
    grads = sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
    state = sum(local_bytes(v) for s in optimizer.state.values() for v in s.values() if hasattr(v, "numel"))
    total_params = sum(p.numel() for p in model.parameters())
    row = {"rank": dist.rank(), "params": params, "grads": grads, "optimizer": state, "num_parameters": total_params}
    rows = dist.all_gather(torch.tensor([[params, grads, state]], dtype=torch.float64))
    if dist.is_main():
        row["max_over_ranks"] = rows.max(0).values.tolist()
        print("RESULT " + json.dumps(row), flush=True)


def main(args: Args) -> None:
    print("| processes | parameters | param shard MB | grad shard MB | AdamW state MB | total MB / process |")
    print("|---|---|---|---|---|---|")
    base = None
    for n in args.procs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__]
        cmd += ["--hidden-size", str(args.hidden_size), "--num-layers", str(args.num_layers)]
        cmd += ["--vocab-size", str(args.vocab_size)]
        env = {**os.environ, "CLEANPOST_FSDP_WORKER": "1"}
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, check=True).stdout
        row = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
        p, g, s = (x / 2**20 for x in row["max_over_ranks"])
        total = p + g + s
        base = base or total
        print(
            f"| {n} | {row['num_parameters'] / 1e6:.1f}M | {p:.1f} | {g:.1f} | {s:.1f} | "
            f"{total:.1f} ({total / base:.2f}x of 1 process) |"
        )


if __name__ == "__main__":
    cli = tyro.cli(Args)
    worker(cli) if os.environ.get("CLEANPOST_FSDP_WORKER") else main(cli)
