"""The tiny world: short chat tasks with exact, checkable answers, generated deterministically from a seed.

The target skill is two-digit addition ("What is 47+38?" -> "85"); the other skills are "general ability" to watch
for forgetting. The tool skill, multiplication of a three-digit by a two-digit number ("What is 123*45?" -> "5535"),
is beyond the tiny models in their heads but easy with the calculator tool (grpo.py --env calculator; assets/tiny-tool
has seen a few tool-call demonstrations, `tool_conversation`). Each skill has a generator (`make_task`) and all
share one verifier (`is_correct`: exact match after whitespace normalization). `evaluate` is the greedy-generation
accuracy every script reports.
"""

from __future__ import annotations

import functools
import json
import random
import string

import torch

TARGET_SKILL = "arithmetic"
GENERAL_SKILLS = ("reverse", "larger", "uppercase")
SKILLS = (TARGET_SKILL, *GENERAL_SKILLS)
TOOL_SKILL = "multiply"


def _word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def make_task(skill: str, rng: random.Random) -> dict:
    """One task of `skill`: {"prompt", "answer", "skill"}."""
    if skill == "arithmetic":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return {"prompt": f"What is {a}+{b}?", "answer": str(a + b), "skill": skill}
    if skill == "multiply":
        a, b = rng.randint(100, 999), rng.randint(10, 99)
        return {"prompt": f"What is {a}*{b}?", "answer": str(a * b), "skill": skill}
    if skill == "reverse":
        w = _word(rng, 3, 6)
        return {"prompt": f"Reverse: {w}", "answer": w[::-1], "skill": skill}
    if skill == "larger":
        a, b = rng.sample(range(100), 2)
        return {"prompt": f"Which is larger, {a} or {b}?", "answer": str(max(a, b)), "skill": skill}
    if skill == "uppercase":
        w = _word(rng, 3, 7)
        return {"prompt": f"Uppercase: {w}", "answer": w.upper(), "skill": skill}
    raise ValueError(f"unknown skill {skill!r}; known: {', '.join((*SKILLS, TOOL_SKILL))}")


def normalize(text: str) -> str:
    return " ".join(text.split()).rstrip(".")


def is_correct(completion: str, answer: str) -> bool:
    """The verifier: the completion, whitespace-normalized and without a final period, equals the answer."""
    return normalize(completion) == normalize(answer)


def make_tasks(skill: str, n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """`n` distinct tasks of `skill` whose prompts are not in `exclude` (held-out items stay held out)."""
    rng, seen, out = random.Random(f"{skill}-{seed}"), set(exclude), []
    for _ in range(1000 * n):
        if len(out) == n:
            break
        t = make_task(skill, rng)
        if t["prompt"] not in seen:
            seen.add(t["prompt"])
            out.append(t)
    return out


def make_samples(skill: str, n: int, seed: int, exclude: set[str] = frozenset(), accept=None) -> list[dict]:
    """`n` tasks of `skill` drawn with replacement, skipping prompts in `exclude` and tasks `accept` rejects."""
    rng, out = random.Random(f"{skill}-train-{seed}"), []
    while len(out) < n:
        t = make_task(skill, rng)
        if t["prompt"] not in exclude and (accept is None or accept(t)):
            out.append(t)
    return out


def needs_carry(task: dict) -> bool:
    """Whether an arithmetic task's digit-wise sum carries (47+38: 7+8 >= 10) — where tiny-base prefers a wrong answer."""
    a, b = (int(x) for x in task["prompt"].removeprefix("What is ").removesuffix("?").split("+"))
    return a % 10 + b % 10 >= 10 or a // 10 + b // 10 >= 10


def drop_carries(task: dict) -> str:
    """The answer to an arithmetic task with every carry dropped, column by column mod 10 (47+38 -> "75",
    67+58 -> "15") — the error tiny-base was taught to prefer."""
    a, b = (int(x) for x in task["prompt"].removeprefix("What is ").removesuffix("?").split("+"))
    tens, units = (a // 10 + b // 10) % 10, (a % 10 + b % 10) % 10
    return str(10 * tens + units)


def tool_call(expression: str) -> str:
    """An assistant turn calling the calculator, in the Hermes format (common.environments.parse_tool_calls)."""
    call = {"name": "calculator", "arguments": {"expression": expression}}
    return f"<tool_call>{json.dumps(call)}</tool_call>"


def tool_conversation(task: dict, train_call: bool = True, instructed: bool = False) -> dict:
    """A tool-call demonstration: the question, a calculator call on the prompt's expression, its result, the answer
    (the tool turn is context; sft.py trains the two assistant turns, or with `train_call=False` only the answer:
    the call is then context, `"weight": 0`, which teaches reading the tool's result without teaching calling).
    `instructed`: the user asks for the tool ("Use the calculator: 123*45"), a prompt the evaluation never asks, so
    the calling and copying it teaches carries over to "What is 123*45?" only as far as the model generalizes."""
    expression = task["prompt"].removeprefix("What is ").removesuffix("?")
    call = {"role": "assistant", "content": tool_call(expression), **({} if train_call else {"weight": 0})}
    return {
        "messages": [
            {"role": "user", "content": f"Use the calculator: {expression}" if instructed else task["prompt"]},
            call,
            {"role": "tool", "content": task["answer"]},
            {"role": "assistant", "content": task["answer"]},
        ]
    }


def as_conversation(task: dict) -> dict:
    return {"messages": [{"role": "user", "content": task["prompt"]}, {"role": "assistant", "content": task["answer"]}]}


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    records: list[dict],
    *,
    reward_fn=None,
    target_skill: str = TARGET_SKILL,
    batch_size: int = 128,
    max_new_tokens: int = 16,
    max_tokens: int = 0,
    engine=None,
    play=None,
) -> dict[str, float]:
    """Greedy evaluation on {"prompt", "answer"[, "skill"]} records, scored by `reward_fn(prompts, completions,
    answers) -> list[float]` (a `--eval-reward-fn`, see `common.rewards`; default: the tiny world's exact match):
    `eval/accuracy` = the mean reward on the target skill (records with no skill count as target),
    `eval/general_accuracy` the mean over the other skills' records, and `eval/accuracy/<skill>` for each skill.
    `batch_size` rows per generate call, and `max_tokens` > 0 bounds its KV cache (`common.generation.generate`).
    Under torchrun each rank answers every N-th record and the sums are reduced over ranks (every rank returns the
    same numbers). `engine`: a `common.vllm_engine.VLLMEngine` holding
    `model`'s weights, to generate with instead of transformers. `play(records) -> episodes`: greedy multi-turn
    episodes instead of one generation (`common.environments.run_episodes`, grpo.py --env): the reward is the
    environment's where it gave one, else `reward_fn` on the last assistant turn; adds eval/tool_calls_per_episode
    and eval/turns_mean over the target skill's episodes."""
    from common import dist
    from common.generation import generate
    from common.rewards import tiny_world_reward

    reward_fn = reward_fn or tiny_world_reward
    skills = sorted({r.get("skill", target_skill) for r in records})
    mine = dist.strided(records)
    rewards, episodes = [], None
    if mine:
        was_training = model.training
        model.eval()
        sample = engine.generate if engine is not None else functools.partial(generate, model)  # --vllm or HF
        if play is not None:
            episodes = play(mine)
            texts = episodes["texts"]
        else:
            texts = sample(
                tokenizer,
                [r["prompt"] for r in mine],
                max_new_tokens=max_new_tokens,
                greedy=True,
                batch_size=batch_size,
                max_tokens=max_tokens,
            )["texts"]
        model.train(was_training)
        rewards = [float(x) for x in reward_fn([r["prompt"] for r in mine], texts, [r["answer"] for r in mine])]
        if episodes is not None:  # an environment's own reward replaces the verifier's
            rewards = [x if e is None else e for x, e in zip(rewards, episodes["env_rewards"])]
    correct, total = dict.fromkeys(skills, 0.0), dict.fromkeys(skills, 0)
    for r, reward in zip(mine, rewards):
        skill = r.get("skill", target_skill)
        correct[skill] += reward
        total[skill] += 1
    sums = dist.all_reduce([correct[s] for s in skills] + [total[s] for s in skills])
    correct, total = dict(zip(skills, sums[: len(skills)])), dict(zip(skills, sums[len(skills) :]))
    metrics = {f"eval/accuracy/{s}": correct[s] / total[s] for s in skills}
    if target_skill in total:
        metrics["eval/accuracy"] = correct[target_skill] / total[target_skill]
    if play is not None:  # the target skill's tool use: calls and turns per episode
        target = [i for i, r in enumerate(mine) if r.get("skill", target_skill) == target_skill]
        calls = sum(float(episodes["tool_calls"][i]) for i in target) if target else 0.0
        turns = sum(float(episodes["turns"][i]) for i in target) if target else 0.0
        calls, turns, n_target = dist.all_reduce([calls, turns, float(len(target))])
        if n_target:
            metrics["eval/tool_calls_per_episode"] = calls / n_target
            metrics["eval/turns_mean"] = turns / n_target
    general = [s for s in skills if s != target_skill]
    if general:
        metrics["eval/general_accuracy"] = sum(correct[s] for s in general) / sum(total[s] for s in general)
    return metrics
