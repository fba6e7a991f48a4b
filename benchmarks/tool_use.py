"""How a model uses a tool before (or after) RL: its calculator-call rate and accuracy on the tool skill's held-out
prompts, greedy and sampled, split by whether the episode called the tool.

    python benchmarks/tool_use.py                                   # assets/tiny-tool, 200 held-out multiplications
    python benchmarks/tool_use.py --model runs/<grpo --env run>/final

Plays the episodes as `grpo.py --env calculator` does (`common.environments.run_episodes` with the same budgets as
docs/grpo.md's command: 3 turns of at most 96 tokens, 160 tokens an episode), once greedy and once at `--temperature`
(seeded), and scores the last assistant turn with the tiny world's exact match.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

from common.environments import load_env, make_envs, run_episodes
from common.generation import generate
from common.model import load_model, load_tokenizer
from common.rewards import is_correct
from common.tinyworld import TOOL_SKILL

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Args:
    model: str = str(ROOT / "assets/tiny-tool")
    """model to probe"""
    eval_prompts: str = str(ROOT / "assets/data/tool_eval.jsonl")
    """{prompt, answer, skill} records; only --skill's are played"""
    skill: str = TOOL_SKILL
    """the skill whose records are played"""
    limit: int = 200
    """records at most"""
    max_turns: int = 3
    """assistant turns per episode"""
    max_new_tokens: int = 96
    """tokens per turn"""
    max_episode_tokens: int = 160
    """tokens after the prompt per episode"""
    temperature: float = 1.0
    """the sampled pass's temperature"""
    seed: int = 0
    """the sampled pass's seed"""


def main(args: Args) -> None:
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype="float32", device="cpu").eval()
    records = [json.loads(line) for line in Path(args.eval_prompts).read_text().splitlines() if line.strip()]
    records = [r for r in records if r.get("skill") == args.skill][: args.limit]
    if not records:
        raise SystemExit(f"error: no {args.skill!r} records in {args.eval_prompts}")
    factory = load_env("calculator")
    print(f"{args.model}: {len(records)} {args.skill} episodes")
    print("| pass | accuracy | episodes with a call | accuracy with a call | accuracy without | turns | truncated |")
    print("|---|---|---|---|---|---|---|")
    for name, sampling in (
        ("greedy", {"greedy": True}),
        (f"T={args.temperature:g}", {"temperature": args.temperature, "seed_key": (args.seed, 0, 0)}),
    ):
        with torch.no_grad():
            out = run_episodes(
                functools.partial(generate, model),
                tokenizer,
                "calculator",
                make_envs("calculator", factory, records),
                records,
                max_turns=args.max_turns,
                max_new_tokens=args.max_new_tokens,
                max_episode_tokens=args.max_episode_tokens,
                batch_size=64,
                **sampling,
            )
        right = [is_correct(t, r["answer"]) for t, r in zip(out["texts"], records)]
        called = [c > 0 for c in out["tool_calls"].tolist()]
        n_called = sum(called)
        with_call = sum(r for r, c in zip(right, called) if c)
        without = sum(r for r, c in zip(right, called) if not c)
        print(
            f"| {name} | {sum(right) / len(right):.3f} | {n_called} ({n_called / len(records):.3f}) "
            f"| {with_call}/{n_called} | {without}/{len(records) - n_called} | {out['turns'].mean():.3f} "
            f"| {out['truncated'].float().mean():.3f} |"
        )


if __name__ == "__main__":
    main(tyro.cli(Args))
