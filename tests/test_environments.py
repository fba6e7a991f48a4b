"""Multi-turn environments (common/environments.py, grpo.py --env): the calculator, token-in/token-out on Qwen3's
template, the episode loop's masks, and one-line errors for broken environments."""

import functools
import json

import pytest
import torch
from conftest import ROOT, TINY_BASE, read_metrics, run_script

from common.environments import (
    Calculator,
    ToolError,
    evaluate_expression,
    parse_tool_calls,
    reply_tokens,
    run_episodes,
    turn_glue,
)
from common.generation import generate
from common.logprobs import completion_logprobs
from common.model import load_model, load_tokenizer
from common.tinyworld import tool_call

# The calculator


@pytest.mark.parametrize(
    "expression, value",
    [("123*45", 5535), (" 964 * 59 ", 56876), ("-(3+4)*2", -14), ("2**10", 1024), ("17//5", 3), ("17%5", 2),
     ("84/4", 21), ("+7-10", -3), ("((1+2)*(3+4))", 21)],
)  # fmt: skip
def test_calculator_evaluates_integer_arithmetic(expression, value):
    assert evaluate_expression(expression) == value


@pytest.mark.parametrize(
    "expression, message",
    [("7/2", "not an integer"), ("1/0", "division by zero"), ("5%0", "division by zero"), ("1.5*2", "unsupported"),
     ("True+1", "unsupported"), ("__import__('os').system('x')", "unsupported"), ("x*2", "unsupported"),
     ("2**1000", "exponent"), ("9**9**9", "exponent"), ("10**64*10**64", "too large"), ("1+", "cannot parse"),
     ("1" * 201, "longer than 200")],
)  # fmt: skip
def test_calculator_refuses_what_is_not_safe_integer_arithmetic(expression, message):
    with pytest.raises(ToolError, match=message):
        evaluate_expression(expression)


def test_tool_calls_are_parsed_in_the_hermes_format():
    qwen = (
        '<think>\n\n</think>\n\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+2"}}\n</tool_call>'
    )
    assert parse_tool_calls(qwen) == [{"name": "calculator", "arguments": {"expression": "2+2"}}]
    as_string = '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>'  # arguments as a JSON string
    assert parse_tool_calls(as_string) == [{"name": "f", "arguments": {"x": 1}}]
    assert parse_tool_calls("the answer is 4") == []
    bad = parse_tool_calls("<tool_call>{not json}</tool_call><tool_call>[1]</tool_call><tool_call>{")
    assert [type(c) for c in bad] == [ToolError] * 3 and "unclosed" in str(bad[2])


def test_calculator_environment_replies_and_reports_errors_to_the_model():
    env = Calculator({"prompt": "What is 123*45?", "answer": "5535"})
    assert env.reset() == [{"role": "user", "content": "What is 123*45?"}]
    assert env.step(tool_call("123*45")) == [{"role": "tool", "content": "5535"}]
    assert env.step("5535") is None  # the final answer: --reward-fn scores it
    two = env.step(tool_call("1/0") + '<tool_call>{"name": "search", "arguments": {}}</tool_call>')
    assert two == [
        {"role": "tool", "content": "error: division by zero"},
        {"role": "tool", "content": "error: unknown tool 'search' (the tool is calculator)"},
    ]
    assert env.step("<tool_call>oops")[0]["content"] == "error: unclosed <tool_call>"
    assert env.step('<tool_call>{"name": "calculator", "arguments": {"x": 1}}</tool_call>')[0]["content"].startswith(
        "error: calculator takes"
    )


# Token-in/token-out


def test_reply_tokens_are_the_templates_rendering_of_just_those_messages(chat_tokenizer, qwen3_dir):
    tiny = chat_tokenizer
    assert turn_glue(tiny, "<|im_end|>") == "\n"
    expected = "\n<|im_start|>tool\n5535<|im_end|>\n<|im_start|>assistant\n"  # written out by hand
    assert reply_tokens(tiny, [{"role": "tool", "content": "5535"}], "<|im_end|>") == tiny(expected)["input_ids"]
    qwen = load_tokenizer(str(qwen3_dir), '{"enable_thinking": false}')
    tools = [{"role": "tool", "content": "5535"}, {"role": "tool", "content": "7"}]
    expected = (  # Qwen3: consecutive tool results in one user turn, and the no-thinking generation prompt
        "\n<|im_start|>user\n<tool_response>\n5535\n</tool_response>\n<tool_response>\n7\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert reply_tokens(qwen, tools, "<|im_end|>") == qwen(expected, add_special_tokens=False)["input_ids"]
    user = reply_tokens(qwen, [{"role": "user", "content": "And 2+2?"}], "<|im_end|>")
    assert qwen.decode(user) == "\n<|im_start|>user\nAnd 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert turn_glue(qwen, "<|endoftext|>") == ""  # stopped by another EOS id: nothing the template would add


class Scripted:
    """Three tool replies, then the end with a reward."""

    def __init__(self, record):
        self.prompt, self.turn = record["prompt"], 0

    def reset(self):
        return [{"role": "user", "content": self.prompt}]

    def step(self, text):
        self.turn += 1
        return 1.0 if self.turn == 4 else [{"role": "tool", "content": f"result {self.turn}"}]


def _runs(mask: list[int], ids: list[int]) -> list[tuple[int, list[int]]]:
    """Consecutive runs of equal mask values: [(value, ids of the run), ...]."""
    runs = []
    for m, t in zip(mask, ids):
        if runs and runs[-1][0] == m:
            runs[-1][1].append(t)
        else:
            runs.append((m, [t]))
    return runs


def test_training_tokens_are_the_sampled_tokens_turn_by_turn_on_qwen3(qwen3_dir):
    tok = load_tokenizer(str(qwen3_dir), '{"enable_thinking": false}')
    model = load_model(str(qwen3_dir), dtype="float32", device="cpu").eval()
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():  # a random model rarely ends a turn: make its end-of-turn token likely
        model.get_output_embeddings().weight[eos] *= 20
    calls = []

    def sample(tokenizer, prompts, **kw):  # the real sampler, recording what each turn's call drew
        out = generate(model, tokenizer, prompts, **kw)
        calls.append((kw["prompt_ids"], out))
        return out

    records = [{"prompt": f"What is {a}+{a + 1}?", "answer": "x"} for a in range(10, 22)]
    out = run_episodes(
        sample,
        tok,
        "scripted",
        [Scripted(r) for r in records],
        records,
        max_turns=4,
        max_new_tokens=24,
        max_episode_tokens=1000,
        temperature=1.0,
        batch_size=16,
        seed=0,
    )
    reply = [
        tok(
            f"\n<|im_start|>user\n<tool_response>\nresult {t}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
            "<think>\n\n</think>\n\n",
            add_special_tokens=False,
        )["input_ids"]
        for t in (1, 2, 3)
    ]
    full_turns = 0
    for i, r in enumerate(records):
        prompt = out["prompt_ids"][i][out["prompt_mask"][i].bool()].tolist()
        n = int(out["completion_mask"][i].sum())
        ids, actions = out["completion_ids"][i, :n].tolist(), out["action_mask"][i, :n].tolist()
        assert prompt == tok(tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                                     add_generation_prompt=True, enable_thinking=False),
                             add_special_tokens=False)["input_ids"]  # fmt: skip
        # what each turn's generate call was given and drew, for this episode
        sampled, contexts = [], []
        for ctx_rows, call in calls:
            for row, ctx in enumerate(ctx_rows):
                if (prompt + ids)[: len(ctx)] == ctx and ctx[: len(prompt)] == prompt:
                    sampled.append(call["completion_ids"][row, : int(call["completion_mask"][row].sum())].tolist())
                    contexts.append(ctx)
        runs = _runs(actions, ids)
        assert [t for m, t in runs if m == 1] == sampled  # the training tokens are the sampled tokens, turn by turn
        assert [t for m, t in runs if m == 0] == reply[: len(sampled) - 1]  # the replies, rendered alone
        assert out["turns"][i] == len(sampled) and out["tool_calls"][i] == len(sampled) - 1
        for k, ctx in enumerate(contexts):  # each turn continued exactly the tokens before it
            assert ctx == prompt + [t for _, run in runs[: 2 * k] for t in run]
        if not out["truncated"][i]:  # the environment ended it after the fourth turn, with its reward
            full_turns += 1
            assert len(sampled) == 4 and out["env_rewards"][i] == 1.0
        else:  # a turn ran out of tokens before its end-of-turn token: no step(), no reward
            assert out["env_rewards"][i] is None
        if len(sampled) == 4:
            # re-rendering the conversation would not give the context the model saw: Qwen3's template drops the
            # empty think block of earlier assistant turns (the hazard token-in/token-out avoids)
            texts = [tok.decode(s, skip_special_tokens=True) for s in sampled]
            messages = [{"role": "user", "content": r["prompt"]}]
            for t, text in enumerate(texts[:3]):
                messages += [{"role": "assistant", "content": text}, {"role": "tool", "content": f"result {t + 1}"}]
            rerendered = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                     enable_thinking=False), add_special_tokens=False)["input_ids"]  # fmt: skip
            assert rerendered != contexts[3]
    assert full_turns >= 2, "the test needs episodes that reach their end"
    # the training forward's log-probs of the sampled tokens are the sampler's; the replies' tokens get none
    logps = completion_logprobs(
        model, out["prompt_ids"], out["prompt_mask"], out["completion_ids"], out["completion_mask"], 1.0,
        action_mask=out["action_mask"], vocab=len(tok),
    )  # fmt: skip
    action = out["action_mask"].bool()
    torch.testing.assert_close(logps[action], out["sampler_logps"][action], atol=2e-4, rtol=0)
    assert (logps[~action] == 0).all() and (out["sampler_logps"][~action] == 0).all()


def test_episode_budgets_end_episodes_as_truncated(chat_tokenizer, random_model_dir):
    model = load_model(str(random_model_dir), dtype="float32", device="cpu").eval()
    records = [{"prompt": "What is 1+1?", "answer": "2"}] * 3
    sample = functools.partial(generate, model)
    kw = {"temperature": 1.0, "batch_size": 8, "seed": 0}
    # every turn cut at 2 tokens without its end: one turn, truncated
    out = run_episodes(sample, chat_tokenizer, "s", [Scripted(r) for r in records], records, max_turns=4,
                       max_new_tokens=2, max_episode_tokens=100, **kw)  # fmt: skip
    assert out["truncated"].all() and (out["turns"] == 1).all() and (out["action_mask"].sum(1) <= 2).all()
    # an episode budget smaller than a turn's: the turn is cut at the episode's budget
    out = run_episodes(sample, chat_tokenizer, "s", [Scripted(r) for r in records], records, max_turns=4,
                       max_new_tokens=50, max_episode_tokens=3, **kw)  # fmt: skip
    assert out["truncated"].all() and (out["completion_mask"].sum(1) <= 3).all()


# grpo.py --env end to end


def test_env_on_a_model_that_never_calls_a_tool_is_the_single_turn_run(tmp_path):
    """tiny-base has never seen a tool call: with --env calculator every episode is one turn scored by --reward-fn,
    and the run (rollouts, seeds, loss, evaluation) is the single-turn run, value for value."""
    common = ["--max-steps", "2", "--eval-every", "0", "--kl-every", "0", "--kl-prompts", "8", "--output-dir", tmp_path]
    run_script("grpo.py", *common, "--run-name", "plain")
    run_script("grpo.py", *common, "--run-name", "env", "--env", "calculator")
    plain, env = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "env")
    assert len(plain) == len(env) == 3
    for a, b in zip(plain, env):
        for k, v in a.items():
            if not k.startswith("perf/") and k != "time":
                assert b[k] == v, k
    assert env[1]["rollout/tool_calls_per_episode"] == 0 and env[1]["rollout/turns_mean"] == 1
    assert env[0]["eval/tool_calls_per_episode"] == 0
    args = json.loads((tmp_path / "env" / "args.json").read_text())
    assert args["max_episode_tokens"] == 4 * 8  # resolved and saved: --max-turns x --max-new-tokens


def test_env_training_masks_the_environment_tokens(tmp_path):
    """A scripted three-turn environment on tiny-base: the loss, entropy and KL see only sampled tokens, so the
    logged sampled-token statistics stay those of the policy (logprob_diff ~0 in fp32) with replies in context."""
    run = tmp_path / "echo"
    run_script("grpo.py", "--env", "tests.cli_envs:Echo", "--max-steps", "2", "--eval-every", "0", "--kl-every", "1",
               "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "6", "--max-turns", "3",
               "--max-episode-tokens", "60", "--eval-prompts", "", "--output-dir", tmp_path, "--run-name", "echo")  # fmt: skip
    m = read_metrics(run)[-1]
    assert m["rollout/turns_mean"] > 1 and m["rollout/tool_calls_per_episode"] > 0
    assert m["rollout/logprob_diff_max"] < 1e-4  # the trainer's log-probs of the sampled tokens are the sampler's
    assert m["rollout/completion_len"] <= 3 * 6  # sampled tokens only, replies not counted
    assert (run / "final" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "env, message",
    [
        ("tests.cli_envs:Broken", ("--env tests.cli_envs:Broken: the factory at prompt record assets/data/prompts.jsonl:1: "
         "RuntimeError: no database connection")),
        ("tests.cli_envs:NotMessages", ("reset() at prompt record assets/data/prompts.jsonl:1: TypeError: reset() "
         "returned str, not a list of {role, content} messages")),
        ("tests.cli_envs:BadReply", ("step() at prompt record assets/data/prompts.jsonl:1: TypeError: step() returned "
         "message 0 {'role': 'tool'}: needs a role in")),
        ("tests.cli_envs:Hangs", ("step() at prompt record assets/data/prompts.jsonl:1: TimeoutError: no answer "
         "within --env-timeout 1 s")),
        ("tests.cli_envs:Nope", "--env 'tests.cli_envs:Nope': module 'tests.cli_envs' has no factory 'Nope'"),
        ("abacus", "--env 'abacus': not a built-in (calculator) and not of the form module:factory"),
    ],
)  # fmt: skip
def test_broken_environments_stop_before_compute_with_one_line(tmp_path, env, message):
    proc = run_script("grpo.py", "--env", env, "--env-timeout", "1", "--output-dir", tmp_path, "--run-name", "r",
                      check=False)  # fmt: skip
    assert proc.returncode == 1
    assert message in proc.stderr.strip().splitlines()[-1], proc.stderr[-500:]
    assert not (tmp_path / "r" / "metrics.jsonl").exists()  # stopped before the step-0 evaluation


def test_an_environment_failing_mid_run_names_itself_and_writes_no_checkpoint(tmp_path):
    proc = run_script("grpo.py", "--env", "tests.cli_envs:FailsLater", "--max-steps", "3", "--eval-prompts", "",
                      "--output-dir", tmp_path, "--run-name", "r", check=False)  # fmt: skip
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "--env tests.cli_envs:FailsLater: step() at prompt record assets/data/prompts.jsonl:" in last
    assert last.endswith("KeyError: 'lookup failed'")
    assert not (tmp_path / "r" / "final").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--vllm"], "--env samples episodes with transformers"),
        (["--overlong-buffer", "2"], "--overlong-buffer is a single-turn length penalty"),
        (["--max-turns", "0"], "--max-turns must be at least 1"),
        (["--max-episode-tokens", "300"], "--max-episode-tokens 300 leaves no room for a prompt"),
    ],
)
def test_env_flag_errors(tmp_path, flags, message):
    proc = run_script("grpo.py", "--env", "calculator", *flags, "--output-dir", tmp_path, check=False)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr[-500:]


def test_env_is_documented_in_help():
    out = run_script("grpo.py", "--help").stdout
    for flag in ("--env", "--max-turns", "--max-episode-tokens", "--env-timeout"):
        assert flag in out
    assert (ROOT / "common" / "environments.py").exists() and TINY_BASE.exists()


@pytest.mark.slow
def test_grpo_with_the_calculator_learns_to_call_it(tmp_path):
    """tiny-tool calls the calculator in a few percent of its samples at temperature 1 and is right mostly when it
    does: a dozen GRPO steps with --env calculator (docs/grpo.md's command, shortened) make calling the habit."""
    run_script("grpo.py", "--env", "calculator", "--model", "assets/tiny-tool", "--dataset",
               "assets/data/tool_prompts.jsonl", "--eval-prompts", "", "--target-skill", "multiply",
               "--max-new-tokens", "96", "--max-turns", "3", "--max-episode-tokens", "160", "--max-steps", "12",
               "--kl-every", "0", "--output-dir", tmp_path, "--run-name", "tool")  # fmt: skip
    steps = [m for m in read_metrics(tmp_path / "tool") if "rollout/tool_calls_per_episode" in m]
    assert len(steps) == 12
    first = sum(m["rollout/tool_calls_per_episode"] for m in steps[:3]) / 3
    last = sum(m["rollout/tool_calls_per_episode"] for m in steps[-3:]) / 3
    assert first < 0.2 and last > 2 * first + 0.1, (first, last)
    assert all(1 <= m["rollout/turns_mean"] <= 3 for m in steps)


def test_tool_use_benchmark_counts_calls_and_their_accuracy():
    """benchmarks/tool_use.py on tiny-tool: one table row per pass, whose counts add up over the episodes played."""
    out = run_script("benchmarks/tool_use.py", "--limit", "12").stdout
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith(("| greedy", "| T=1"))]
    assert len(rows) == 2
    for row in rows:
        calls = int(row[2].split()[0])
        with_call, without = (tuple(map(int, cell.split("/"))) for cell in row[3:5])
        assert with_call[1] == calls and without[1] == 12 - calls
        assert float(row[1]) == pytest.approx((with_call[0] + without[0]) / 12, abs=1e-3)
