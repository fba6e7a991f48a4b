"""Multi-turn environments for RL (`grpo.py --env`): the protocol, the built-in calculator, and the episode loop.

An environment is user code loaded by `--env module:factory` (as `--reward-fn`: the current directory is importable)
or a built-in name (`calculator`). The factory is called once per episode with the prompt record ({"prompt",
"answer", ...}) and returns an object with two methods (and, optionally, `tools`: JSON schemas the chat template
renders into the prompt, as `apply_chat_template(tools=...)` does):

    reset() -> list[dict]                    the conversation the episode starts from ({"role", "content"} messages)
    step(text: str) -> list[dict] | float | None
        called after each assistant turn with its decoded text; returns the messages to append (tool results
        {"role": "tool", "content": ...}, a user turn) to go on, or ends the episode: a number is its reward,
        None means "score the last assistant turn with --reward-fn" (the single-turn rule)

An episode also ends, marked truncated, when an assistant turn uses up --max-new-tokens without its end-of-turn token,
when its tokens after the prompt would pass --max-episode-tokens, or after --max-turns assistant turns; it is then
scored by --reward-fn on its last assistant turn (--mask-truncated drops it from the loss). Example, a guessing game:

    class Guess:
        def __init__(self, record):
            self.secret, self.tries = int(record["answer"]), 0

        def reset(self):
            return [{"role": "user", "content": "Guess my number, 1 to 100."}]

        def step(self, text):
            self.tries += 1
            guess = int(text) if text.strip().isdigit() else -1
            if guess == self.secret:
                return 1.0 / self.tries                                    # the end, with its reward
            return [{"role": "user", "content": "higher" if guess < self.secret else "lower"}]  # the next turn

    python grpo.py --env guess:Guess --dataset secrets.jsonl --max-turns 7 --max-episode-tokens 256

Token-in/token-out: an episode is kept as token ids, never as text. Each assistant turn's tokens are appended as the
sampler drew them, and each environment reply as the chat template renders those messages alone (`reply_tokens`:
the template's text after an assistant turn's end-of-turn token, the messages, the next generation prompt). The
conversation is never re-rendered, because templates that rewrite history (Qwen3 drops earlier turns' <think> blocks)
would then train on tokens the model never produced. The loss and the KL see only the sampled tokens (`action_mask`);
the environment's tokens are context. An environment that raises, hangs past --env-timeout, or returns something
that is not a list of messages, a number or None stops the run with one line naming it and the prompt record.
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
import re
import signal
import threading
from typing import ClassVar

import torch

from common import die
from common.data import ROLES, apply_template, has_chat_template
from common.generation import left_padded

# The built-in calculator


CALCULATOR_SCHEMA = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate integer arithmetic: + - * // % ** and parentheses (/ only where it divides).",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. 123*45"}},
            "required": ["expression"],
        },
    },
}
TOOL_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)  # an unclosed call is a call (an error)


class ToolError(ValueError):
    """A tool call the tool cannot serve: its message goes back to the model as the tool's reply."""


def evaluate_expression(expression: str, max_digits: int = 100) -> int:
    """Integer arithmetic from a string, without `eval`: the expression is parsed by `ast` and only integer literals,
    unary +/-, and + - * // % ** (exponent 0..64) and / (where it divides exactly) are evaluated; anything else, a
    division by zero, or a result of more than `max_digits` digits raises ToolError."""
    if len(expression) > 200:
        raise ToolError("expression longer than 200 characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ToolError(f"cannot parse {expression!r}") from None
    binary = {ast.Add: int.__add__, ast.Sub: int.__sub__, ast.Mult: int.__mul__, ast.Mod: int.__mod__}

    def value(node) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            v = value(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp):
            a, b = value(node.left), value(node.right)
            if isinstance(node.op, (ast.FloorDiv, ast.Div, ast.Mod)) and b == 0:
                raise ToolError("division by zero")
            if isinstance(node.op, ast.Pow):
                if not 0 <= b <= 64:
                    raise ToolError("exponent outside 0..64")
                if a and abs(a).bit_length() * b > 4 * max_digits:
                    raise ToolError("result too large")
                return a**b
            if isinstance(node.op, ast.FloorDiv):
                return a // b
            if isinstance(node.op, ast.Div):
                if a % b:
                    raise ToolError(f"{a}/{b} is not an integer")
                return a // b
            if type(node.op) in binary:
                out = binary[type(node.op)](a, b)
                if abs(out) >= 10**max_digits:
                    raise ToolError("result too large")
                return out
        raise ToolError(f"unsupported in integer arithmetic: {ast.unparse(node)!r}")

    return value(tree.body)


def parse_tool_calls(text: str) -> list[dict | ToolError]:
    """The tool calls in an assistant turn, in the Hermes format Qwen's chat templates define,
        <tool_call>{"name": "calculator", "arguments": {"expression": "123*45"}}</tool_call>
    each as {"name", "arguments"} (arguments given as a JSON string are decoded), or a ToolError for one that is not
    valid JSON of that shape (an unclosed <tool_call> too)."""
    calls = []
    for match in TOOL_CALL.finditer(text):
        if not match.group(0).endswith("</tool_call>"):
            calls.append(ToolError("unclosed <tool_call>"))
            continue
        try:
            call = json.loads(match.group(1).strip())
            arguments = call["arguments"]
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
            if not isinstance(call["name"], str) or not isinstance(arguments, dict):
                raise TypeError
            calls.append({"name": call["name"], "arguments": arguments})
        except (json.JSONDecodeError, KeyError, TypeError):
            calls.append(ToolError('a tool call must be JSON {"name": ..., "arguments": {...}}'))
    return calls


class Calculator:
    """`--env calculator`: the record's prompt is the user turn; an assistant turn with tool calls gets one
    {"role": "tool"} reply per call (the value, or "error: ..." for a call the calculator cannot parse or evaluate:
    the model reads the error, as with real tools); a turn without a tool call is the final answer, scored by
    --reward-fn (`step` returns None)."""

    tools: ClassVar[list[dict]] = [CALCULATOR_SCHEMA]

    def __init__(self, record: dict):
        prompt = record["prompt"]
        self.messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)

    def reset(self) -> list[dict]:
        return self.messages

    def step(self, text: str) -> list[dict] | None:
        calls = parse_tool_calls(text)
        if not calls:
            return None
        replies = []
        for call in calls:
            try:
                if isinstance(call, ToolError):
                    raise call
                if call["name"] != "calculator":
                    raise ToolError(f"unknown tool {call['name']!r} (the tool is calculator)")
                if not isinstance(call["arguments"].get("expression"), str):
                    raise ToolError('calculator takes {"expression": "<integer arithmetic>"}')
                content = str(evaluate_expression(call["arguments"]["expression"]))
            except ToolError as e:
                content = f"error: {e}"
            replies.append({"role": "tool", "content": content})
        return replies


BUILTIN = {"calculator": Calculator}


def load_env(spec: str):
    """`--env`: a built-in name or module:factory (a class or function of the prompt record)."""
    from common.rewards import import_spec

    return import_spec(spec, "--env", BUILTIN, "factory")


# Token-in/token-out: the tokens of an environment's reply

STUB_USER, STUB_REPLY = {"role": "user", "content": "cleanpost-stub-query"}, "cleanpost-stub-reply"


def turn_glue(tokenizer, stop_text: str, tools=None) -> str:
    """The template's text between an assistant turn's end-of-turn token and the next message ("\\n" for ChatML,
    "" for Llama 3): what it renders after a stub reply's content, less `stop_text` (the sampled stop token); "" if
    the template does not end the turn with `stop_text` (the model stopped with another EOS id)."""
    text = apply_template(tokenizer, [STUB_USER, {"role": "assistant", "content": STUB_REPLY}], tools=tools)
    tail = text[text.rindex(STUB_REPLY) + len(STUB_REPLY) :]
    return tail[len(stop_text) :] if stop_text and tail.startswith(stop_text) else ""


def reply_tokens(tokenizer, messages: list[dict], stop_text: str, tools=None) -> list[int]:
    """Token ids of an environment's reply appended after an assistant turn that ended with `stop_text`: the
    template's glue (`turn_glue`), then `messages` as the template renders them after a stub conversation, with the
    generation prompt. The stub is a user turn and a reply, or (for templates that render a final assistant turn
    differently, as Qwen3's empty think block) a user turn alone: the first for which the stub's rendering is a
    prefix of the stub + `messages` rendering. Raises ValueError if the template renders neither as an append."""
    for stub in ([STUB_USER, {"role": "assistant", "content": STUB_REPLY}], [STUB_USER]):
        try:
            before = apply_template(tokenizer, stub, tools=tools)
            after = apply_template(tokenizer, stub + messages, add_generation_prompt=True, tools=tools)
        except Exception:  # noqa: BLE001, S112 -- a template that refuses this order (strict user/assistant turns)
            continue
        if after.startswith(before):
            text = turn_glue(tokenizer, stop_text, tools) + after[len(before) :]
            return tokenizer(text, add_special_tokens=False)["input_ids"]
    raise ValueError("the chat template does not render these messages as an addition to the conversation")


def prompt_tokens(tokenizer, messages: list[dict], tools=None) -> list[int]:
    """An episode's first context: `messages` rendered with the generation prompt (and `tools`), as token ids."""
    text = apply_template(tokenizer, messages, add_generation_prompt=True, **({"tools": tools} if tools else {}))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# Bad input: one line naming the environment and the record


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise TimeoutError in the main thread after `seconds` (SIGALRM; elsewhere, or with 0, no limit)."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"no answer within --env-timeout {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_messages(messages, what: str) -> list[dict]:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise TypeError(f"{what} returned {type(messages).__name__}, not a list of {{role, content}} messages")
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise TypeError(f"{what} returned message {i} {str(m)[:80]}: needs a role in {ROLES} and string content")
    return messages


def call_env(spec: str, record: dict, what: str, fn, *args, timeout: float = 0):
    """fn(*args) under `timeout`; whatever it raises stops the run with one line naming `spec` and `record`."""
    try:
        with time_limit(timeout):
            return fn(*args)
    except Exception as e:  # noqa: BLE001 -- a user's environment: report it by name, whatever it raised
        where = record.get("_where", str(record.get("prompt"))[:60])
        die(f"--env {spec}: {what} at prompt record {where}: {type(e).__name__}: {e}")


def make_envs(spec: str, factory, records: list[dict], timeout: float = 0) -> list:
    return [call_env(spec, r, "the factory", factory, r, timeout=timeout) for r in records]


def check_env(spec: str, factory, records: list[dict], tokenizer, timeout: float = 0, n: int = 2) -> None:
    """Before any compute: build the first `n` records' environments, reset them, and step them once with the
    reference answer; a factory or method that raises, or a reply that is not messages/number/None, stops now."""
    if not has_chat_template(tokenizer):
        die("--env needs a tokenizer with a chat template (an episode is a conversation)")
    for record in records[:n]:
        env = make_envs(spec, factory, [record], timeout)[0]
        first = call_env(spec, record, "reset()", env.reset, timeout=timeout)
        call_env(spec, record, "reset()", check_messages, first, "reset()")
        call_env(spec, record, "reset()", prompt_tokens, tokenizer, first, getattr(env, "tools", None))
        reply = call_env(spec, record, "step()", env.step, str(record.get("answer", "")), timeout=timeout)
        check_reply(spec, record, reply, tokenizer, getattr(env, "tools", None))


def check_reply(spec, record, reply, tokenizer=None, tools=None):
    if reply is None:
        return None
    if isinstance(reply, (int, float)) and not isinstance(reply, bool):
        if not math.isfinite(reply):
            call_env(spec, record, "step()", _raise, ValueError(f"returned a non-finite reward {reply}"))
        return float(reply)
    messages = call_env(spec, record, "step()", check_messages, reply, "step()")
    if tokenizer is not None:
        call_env(spec, record, "step()'s reply", reply_tokens, tokenizer, messages, tokenizer.eos_token or "", tools)
    return messages


def _raise(e):
    raise e


# The episode loop


@torch.no_grad()
def run_episodes(
    sample,
    tokenizer,
    spec: str,
    envs: list,
    records: list[dict],
    *,
    max_turns: int,
    max_new_tokens: int,
    max_episode_tokens: int,
    timeout: float = 0,
    **sample_kwargs,
) -> dict:
    """Play the episodes of `envs` (one per row; `records[i]` is row i's prompt record) turn by turn: every live
    episode's context goes into one batched `sample` call per turn (`common.generation.generate`, or the vLLM
    engine's, with `prompt_ids=`), each sampled turn goes to its environment, and the reply's tokens are appended.
    Turn t > 0 samples from the `derive_seed` stream "sample/turn{t}" (turn 0 from "sample", as single-turn).

    Returns what `generate` returns, for the whole episode after the prompt: prompt_ids/prompt_mask (N, P) left-
    padded, completion_ids (N, L) right-padded with every token after the prompt (sampled and environment),
    completion_mask (N, L) 1 on those tokens, action_mask (N, L) 1 on the sampled ones, sampler_logps (N, L) (0 on
    the others), truncated (N,) bool, texts (the last assistant turn of each episode), and env_rewards (a number, or
    None: --reward-fn scores `texts`), turns (N,), tool_calls (N,) (the "tool" messages the environment returned)."""
    n = len(envs)
    tools = [getattr(env, "tools", None) for env in envs]
    starts = [call_env(spec, r, "reset()", env.reset, timeout=timeout) for env, r in zip(envs, records)]
    prompts = [
        prompt_tokens(tokenizer, call_env(spec, r, "reset()", check_messages, m, "reset()"), t)
        for m, r, t in zip(starts, records, tools)
    ]
    tokens, actions, logps = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)]
    turns, tool_calls, truncated = [0] * n, [0] * n, [False] * n
    texts, env_rewards, live, device = [""] * n, [None] * n, list(range(n)), None
    for turn in range(max_turns):
        if not live:
            break
        budget = [min(max_new_tokens, max_episode_tokens - len(tokens[i])) for i in live]  # each >= 1
        out = sample(
            tokenizer,
            None,
            prompt_ids=[prompts[i] + tokens[i] for i in live],
            max_new_tokens=max(budget),
            seed_stream="sample" if turn == 0 else f"sample/turn{turn}",
            **sample_kwargs,
        )
        device = out["completion_ids"].device
        ids_rows, lengths = out["completion_ids"].tolist(), out["completion_mask"].sum(1).tolist()  # one sync a turn
        logp_rows = out["sampler_logps"].tolist() if "sampler_logps" in out else None
        ended_rows = (~out["truncated"]).tolist()
        still = []
        for row, i in enumerate(live):
            k = min(lengths[row], budget[row])  # a row may run past its own budget (the call's is the largest)
            tokens[i] += ids_rows[row][:k]
            actions[i] += [1] * k
            logps[i] += logp_rows[row][:k] if logp_rows is not None else [0.0] * k
            turns[i] += 1
            texts[i] = tokenizer.decode(ids_rows[row][:k], skip_special_tokens=True)
            if not ended_rows[row] or lengths[row] > budget[row]:  # no end-of-turn token within the budget
                truncated[i] = True
                continue
            reply = call_env(spec, records[i], "step()", envs[i].step, texts[i], timeout=timeout)
            reply = check_reply(spec, records[i], reply)
            if not isinstance(reply, list):  # the end: a reward, or None (--reward-fn scores texts[i])
                env_rewards[i] = reply
                continue
            stop_text = tokenizer.decode(ids_rows[row][k - 1 : k])
            new = call_env(spec, records[i], "step()'s reply", reply_tokens, tokenizer, reply, stop_text, tools[i])
            tool_calls[i] += sum(m["role"] == "tool" for m in reply)
            if len(tokens[i]) + len(new) >= max_episode_tokens:  # no room left for a token of the next turn
                truncated[i] = True
                continue
            tokens[i] += new
            actions[i] += [0] * len(new)
            logps[i] += [0.0] * len(new)
            still.append(i)
        live = still
    for i in live:  # --max-turns assistant turns, and the environment still had not ended the episode
        truncated[i] = True
    pad = tokenizer.pad_token_id
    prompt = left_padded(prompts, pad)
    width = max(len(t) for t in tokens)

    def right(rows, value, dtype):
        return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=dtype, device=device)

    return {
        "prompt_ids": prompt["input_ids"].to(device),
        "prompt_mask": prompt["attention_mask"].to(device),
        "completion_ids": right(tokens, pad, torch.long),
        "completion_mask": right([[1] * len(t) for t in tokens], 0, torch.long),
        "action_mask": right(actions, 0, torch.long),
        "sampler_logps": right(logps, 0.0, torch.float32),
        "truncated": torch.tensor(truncated, device=device),
        "texts": texts,
        "env_rewards": env_rewards,
        "turns": torch.tensor(turns, dtype=torch.float32),
        "tool_calls": torch.tensor(tool_calls, dtype=torch.float32),
    }
