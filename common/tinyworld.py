"""The tiny world: short chat tasks with exact, checkable answers, generated deterministically from a seed.

The target skill is two-digit addition ("What is 47+38?" -> "85"); the other skills are "general ability" to watch
for forgetting. The tool skill, multiplication of a three-digit by a two-digit number ("What is 123*45?" -> "5535"),
is beyond the tiny models in their heads but easy with the calculator tool (grpo.py --env calculator; assets/tiny-tool
has seen a few tool-call demonstrations, `tool_conversation`). Each skill has a generator (`make_task`); all share
one verifier, `common.rewards.is_correct` (exact match after whitespace normalization), and every script reports
`common.rewards.evaluate`'s greedy accuracy on them.
"""

from __future__ import annotations

import json
import random
import string

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
