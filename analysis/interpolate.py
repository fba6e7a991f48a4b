"""Interpolation paths (WiSE-FT, Wortsman et al. 2022): evaluate the weights (1 - alpha) A + alpha B along a grid.

    python analysis/interpolate.py --base assets/tiny-base --finetuned runs/<sft run>/final
    python analysis/interpolate.py --base assets/tiny-base --finetuned runs/<lora run>/final    # an adapter

At each alpha: held-out target accuracy (`eval/accuracy`), general accuracy (`eval/general_accuracy`), and the KL to
A (`eval/kl_to_init`, k3 on the interpolated model's own samples of the first `--kl-prompts` held-out target prompts,
as every training script measures it, common/drift.py). `--finetuned` may be a full model directory or a PEFT adapter
directory written by lora.py (LoRA, PiSSA as its rank-2r conversion, or OFT): the adapter is merged into A first, so
the path scales the merged update, A + alpha (merged - A). Writes interpolate.md (one row per alpha) and
interpolate.png (needs matplotlib: pip install -e ".[plots]").
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.drift import kl_prompts, kl_to_init, resident
from common.model import load_model, load_tokenizer
from common.rewards import eval_reward_fn, evaluate
from common.tinyworld import TARGET_SKILL


@dataclass
class Args:
    base: str
    """A: the initial model (a local directory or hub id)"""
    finetuned: str
    """B: a fine-tuned model directory, or a lora.py adapter directory (its base must be A)"""
    alphas: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(11)])
    """the interpolation weights of B"""
    eval_prompts: str = "assets/data/eval.jsonl"
    """held-out {prompt, answer, skill} records (JSONL)"""
    target_skill: str = TARGET_SKILL
    """the skill reported as eval/accuracy; the others make eval/general_accuracy"""
    eval_reward_fn: str | None = None
    """the verifier (default: the tiny world's exact match)"""
    eval_max_new_tokens: int = 16
    """generation budget of the greedy evaluation and of the KL's samples"""
    eval_batch_size: int = 128
    """prompts per generate call"""
    kl_prompts: int = 64
    """the KL's held-out target prompts"""
    kl_samples: int = 4
    """the KL's completions per prompt"""
    seed: int = 1
    """the KL's sampling seed (the same at every alpha)"""
    output: str = "analysis/results"
    """where interpolate.md and interpolate.png go (a name prefix with --name)"""
    name: str = "interpolate"
    """file name stem of the outputs"""


def finetuned_weights(args: Args, base: torch.nn.Module) -> dict[str, torch.Tensor]:
    """B's weights by A's parameter names: a full model's, or A with the adapter merged in."""
    path = Path(args.finetuned)
    config_file = path / "adapter_config.json"
    if config_file.is_file():
        import copy

        import lora

        config = json.loads(config_file.read_text())
        targets = ",".join(config["target_modules"])
        if config["peft_type"] == "OFT":
            largs = lora.Args(adapter="oft", oft_block_size=config["oft_block_size"], target_modules=targets)
        elif config["peft_type"] == "LORA":
            largs = lora.Args(
                lora_r=config["r"], lora_alpha=config["lora_alpha"], use_rslora=config.get("use_rslora", False),
                target_modules=targets,
            )  # fmt: skip
        else:
            raise SystemExit(f"error: --finetuned {path}: adapter type {config['peft_type']!r} is not LORA or OFT")
        model = copy.deepcopy(base)
        wrapped = lora.add_lora(model, lora.target_names(model, targets), largs)
        lora.load_adapter(path, wrapped)
        model = lora.merge_lora(model, wrapped)
    else:
        if not (path / "config.json").is_file():
            raise SystemExit(f"error: --finetuned {path}: neither a model directory nor an adapter directory")
        model = load_model(str(path), dtype="float32", device="cpu")
    weights = dict(model.named_parameters())
    ours = dict(base.named_parameters())
    mismatch = [n for n in ours if n not in weights or weights[n].shape != ours[n].shape]
    if mismatch or len(weights) != len(ours):
        raise SystemExit(
            f"error: --finetuned {path} does not have --base {args.base}'s parameters (first difference: "
            f"{(mismatch or sorted(set(weights) - set(ours)))[0]})"
        )
    return {n: w.detach() for n, w in weights.items()}


def main(args: Args) -> None:
    t0 = time.time()
    if not Path(args.eval_prompts).is_file():
        raise SystemExit(f"error: --eval-prompts {args.eval_prompts}: no such file")
    records = [json.loads(line) for line in Path(args.eval_prompts).read_text().splitlines() if line.strip()]
    tokenizer = load_tokenizer(args.base)
    base = load_model(args.base, dtype="float32", device="cpu").eval()
    target = finetuned_weights(args, base)
    start = {n: p.detach().clone() for n, p in base.named_parameters()}
    initial = load_model(args.base, dtype="float32", device="cpu").eval()  # A, for the KL
    model = base  # its weights are overwritten at each alpha
    reward = eval_reward_fn(args.eval_reward_fn)
    prompts = kl_prompts(records, args.target_skill, args.kl_prompts)
    rows = []
    for alpha in args.alphas:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_((1 - alpha) * start[n] + alpha * target[n])
        metrics = evaluate(
            model, tokenizer, records, reward_fn=reward, target_skill=args.target_skill,
            batch_size=args.eval_batch_size, max_new_tokens=args.eval_max_new_tokens,
        )  # fmt: skip
        drift = kl_to_init(
            model, tokenizer, prompts, resident(initial), samples=args.kl_samples,
            max_new_tokens=args.eval_max_new_tokens, seed=args.seed, batch_size=args.eval_batch_size,
        )  # fmt: skip
        metrics.update(drift)
        rows.append({"alpha": alpha, **metrics})
        print(
            f"alpha {alpha:.2f}: accuracy {metrics['eval/accuracy']:.3f}  general {metrics['eval/general_accuracy']:.3f}"
            f"  kl_to_init {metrics.get('eval/kl_to_init', float('nan')):.4f}",
            flush=True,
        )
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"`--base {args.base} --finetuned {args.finetuned}`",
        "",
        "| alpha | `eval/accuracy` | `eval/general_accuracy` | `eval/kl_to_init` (k3) | k1 |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['alpha']:.1f} | {r['eval/accuracy']:.3f} | {r['eval/general_accuracy']:.3f} "
        f"| {r.get('eval/kl_to_init', float('nan')):.4f} | {r.get('eval/kl_to_init_k1', float('nan')):.4f} |"
        for r in rows
    ]
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    plotted = plot(rows, out / f"{args.name}.png", args.finetuned)
    print(
        f"wrote {out / (args.name + '.md')}"
        + (f" and {out / (args.name + '.png')}" if plotted else " (no plot: pip install -e '.[plots]')")
        + f" in {time.time() - t0:.0f} s"
    )


def plot(rows: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    alphas = [r["alpha"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(alphas, [r["eval/accuracy"] for r in rows], "-o", ms=3, label="target accuracy")
    ax.plot(alphas, [r["eval/general_accuracy"] for r in rows], "-s", ms=3, label="general accuracy")
    ax.set(xlabel="alpha: (1 - alpha) A + alpha B", ylabel="accuracy", ylim=(0, 1.02))
    kl = ax.twinx()
    kl.plot(alphas, [r.get("eval/kl_to_init", float("nan")) for r in rows], "--", color="gray", label="KL to A")
    kl.set_ylabel("eval/kl_to_init (nats/token)", color="gray")
    lines = ax.get_legend_handles_labels()
    more = kl.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="center right")
    ax.set_title(Path(title).parent.name or title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__.split("\n\n")[0]))
