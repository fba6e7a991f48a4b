"""Verifiable reward functions and `--reward-fn` loading.

A reward function has the signature

    def my_reward(prompts: list, completions: list[str], answers: list) -> list[float]

(one float per completion; `prompts` are the records' prompts, `answers` their `answer` fields). Built-in names:
`tiny_world` (exact answer after normalization), `math` (final-answer check: math-verify when installed, else a
hand-written parser for GSM8K-style numbers), `format` (a final
answer is marked with `\\boxed{...}` or `#### ...`). Anything else is `module:function`, imported from the
current directory or the Python path.
"""

from __future__ import annotations

import importlib
import math as _math
import re
import sys
from fractions import Fraction
from pathlib import Path

from common import die
from common.tinyworld import is_correct


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
