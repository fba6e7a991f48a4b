"""Verifiable reward functions and `--reward-fn` loading.

A reward function has the signature

    def my_reward(prompts: list, completions: list[str], answers: list) -> list[float]

(one float per completion; `prompts` are the records' prompts, `answers` their `answer` fields). Built-in names:
`tiny_world` (exact answer after normalization), `math` (final-answer check: math-verify when installed, else a
hand-written parser for GSM8K-style numbers), `format` (a final
answer is marked with `\\boxed{...}` or `#### ...`). Anything else is `module:function`, imported from the
current directory or the Python path. `evaluate` is the greedy evaluation every script reports: the mean reward of
such a function per skill on held-out prompt records.
"""

from __future__ import annotations

import functools
import importlib
import math as _math
import re
import sys
from fractions import Fraction
from pathlib import Path

import torch

from common import die


def normalize(text: str) -> str:
    return " ".join(text.split()).rstrip(".")


def is_correct(completion: str, answer: str) -> bool:
    """The verifier: the completion, whitespace-normalized and without a final period, equals the answer."""
    return normalize(completion) == normalize(answer)


def tiny_world_reward(prompts, completions, answers) -> list[float]:
    """1.0 when the completion is the exact answer (whitespace-normalized), else 0.0."""
    return [float(is_correct(c, str(a))) for c, a in zip(completions, answers)]


_NUMBER = r"[-+]?\s*(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+)?"


def _boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_final_answer(text: str) -> str | None:
    """The final answer of a solution: the last `\\boxed{...}`, else what follows the last `####`, else the last
    number in the text; None if there is none."""
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0].strip() if tail else None
    numbers = re.findall(_NUMBER, text)
    return numbers[-1].strip() if numbers else None


def normalize_number(text: str | None) -> Fraction | None:
    """'1,234' -> 1234, '-3.0' -> -3, '$12' -> 12, '3/4' -> 3/4, '\\frac{3}{4}' -> 3/4; None if not a number."""
    if text is None:
        return None
    s = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    s = re.sub(r"^\\[dt]?frac\{([-+]?\d+)\}\{(\d+)\}$", r"\1/\2", s)
    s = re.sub(r"\\(?:text|mathrm)\{[^}]*\}$", "", s).removesuffix("%")
    try:
        value = Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return value


def math_reward(prompts, completions, answers) -> list[float]:
    """1.0 when the completion's final answer equals the reference's, else 0.0. With math-verify installed
    (`pip install -e ".[math]"`, Hugging Face's verifier): the reference's `#### ...` tail or the whole answer, and
    the completion's last `\\boxed{}` (else its `#### ...` tail, else what math-verify extracts), compared
    symbolically by math-verify (fractions, roots, sets, intervals, equations, percentages, units). Without it, the
    hand-written parser `hand_math_reward`. tests/test_grpo.py's table of answer pairs shows where the two differ."""
    verifier = _math_verify()
    if verifier is None:
        return hand_math_reward(prompts, completions, answers)
    parse, verify = verifier
    out = []
    for completion, answer in zip(completions, answers):
        gold = str(answer)
        gold = gold.rsplit("####", 1)[1].strip() if "####" in gold else gold.strip()
        gold = gold if "\\boxed" in gold else f"\\boxed{{{gold}}}"  # a bare reference is read as LaTeX
        if _boxed(completion) is None and "####" in completion:
            completion = completion.rsplit("####", 1)[1].strip()
        out.append(float(verify(parse(gold), parse(completion))))
    return out


def _math_verify():
    """math-verify's (parse, verify), or None when it is not installed."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return None
    return parse, verify


def hand_math_reward(prompts, completions, answers) -> list[float]:
    """The hand-written check (no dependency): 1.0 when the completion's final answer equals the reference's
    numerically (GSM8K `#### 42` or `\\boxed{}` references; commas, signs, trailing `.0`, `$` and simple fractions
    normalized), else 0.0."""
    out = []
    for completion, answer in zip(completions, answers):
        gold = normalize_number(extract_final_answer(str(answer)))
        got = normalize_number(extract_final_answer(completion))
        out.append(float(gold is not None and got is not None and gold == got))
    return out


def format_reward(prompts, completions, answers) -> list[float]:
    """1.0 when the completion marks a final answer with `\\boxed{...}` or a `#### ...` line, else 0.0."""
    return [float(_boxed(c) is not None or re.search(r"####\s*\S", c) is not None) for c in completions]


BUILTIN = {"tiny_world": tiny_world_reward, "math": math_reward, "format": format_reward}


def load_reward_fn(spec: str, flag: str = "--reward-fn"):
    """A built-in name or `module:function` (the current directory is importable); errors name `flag`."""
    return import_spec(spec, flag, BUILTIN, "function")


def import_spec(spec: str, flag: str, builtins: dict, kind: str = "function"):
    """`spec` as a built-in name, or `module:name` imported from the current directory or the installed packages,
    a callable; anything else stops the run with one line naming `flag` (--reward-fn, --env)."""
    if spec in builtins:
        return builtins[spec]
    if ":" not in spec:
        die(f"{flag} {spec!r}: not a built-in ({', '.join(builtins)}) and not of the form module:{kind}")
    module_name, fn_name = spec.split(":", 1)
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 -- a user's module: ImportError, SyntaxError, NameError at import...
        where = f" ({e.filename}, line {e.lineno})" if isinstance(e, SyntaxError) else ""
        die(f"{flag} {spec!r}: cannot import module {module_name!r}: {type(e).__name__}: {e}{where}")
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        die(f"{flag} {spec!r}: module {module_name!r} has no {kind} {fn_name!r}")
    return fn


def eval_reward_fn(spec: str | None, default: list[str] | None = None, weights: list[float] | None = None):
    """The verifier of greedy evaluation (`--eval-reward-fn`): `spec` if given, else the run's own reward functions
    `default` (weighted as in training), else the tiny world's exact match. Returns fn(prompts, completions,
    answers) -> list[float]; a failing function stops the run naming it, as in training."""
    specs = [spec] if spec else (default or ["tiny_world"])
    weights = [1.0] if spec else (weights or [1.0] * len(specs))
    fns = [load_reward_fn(s, "--eval-reward-fn" if spec else "--reward-fn") for s in specs]

    def reward(prompts, completions, answers):
        return compute_rewards(specs, fns, weights, prompts, completions, answers)[0]

    return reward


def reward_name(spec: str) -> str:
    return spec.split(":")[-1]


def check_reward_fns(specs, fns, weights, records: list[dict], n: int = 4) -> None:
    """Score the first `n` records' reference answers as completions before any compute is spent: a function that
    raises, returns the wrong number of values or a non-number stops the run now, naming it (not after the model is
    loaded and the step-0 evaluation has run)."""
    sample = [records[i] for i in range(min(n, len(records)))]  # (a mixture of sources indexes one at a time)
    compute_rewards(
        specs, fns, weights, [r["prompt"] for r in sample], [str(r["answer"]) for r in sample],
        [r["answer"] for r in sample],
    )  # fmt: skip


def compute_rewards(specs, fns, weights, prompts, completions, answers) -> tuple[list[float], dict[str, list[float]]]:
    """Weighted sum of the reward functions, and each function's own rewards. A function that raises, returns the
    wrong number of values or a non-finite value stops the run with a message naming it."""
    total = [0.0] * len(completions)
    per_fn = {}
    for spec, fn, weight in zip(specs, fns, weights):
        try:
            values = fn(prompts, completions, answers)
        except Exception as e:  # noqa: BLE001 -- a user's function: report it by name, whatever it raised
            die(f"reward function {spec!r} raised {type(e).__name__}: {e}")
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            die(f"reward function {spec!r} must return a list of numbers")
        if len(values) != len(completions):
            die(f"reward function {spec!r} returned {len(values)} values for {len(completions)} completions")
        if not all(_math.isfinite(v) for v in values):
            die(f"reward function {spec!r} returned a non-finite value (NaN or inf)")
        per_fn[reward_name(spec)] = values
        total = [t + weight * v for t, v in zip(total, values)]
    return total, per_fn


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    records: list[dict],
    *,
    reward_fn=None,
    target_skill: str,
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
