"""Real datasets, offline: every fixture is written with the `datasets` library itself (a GSM8K-shaped Parquet file,
a MATH-shaped JSON file, an UltraFeedback-shaped saved DatasetDict with implicit prompts, a ShareGPT chat set, a
hub-style dataset repository with two configs), then read through `common.data` and the scripts' command lines."""

import json
import math
import re

import datasets
import pytest
from conftest import ROOT, run_script

import common.data
from common.data import (
    DataOptions,
    Mixture,
    data_options,
    load_preference_dataset,
    load_prompts,
    load_sft_dataset,
    parse_source,
    read_records,
    split_implicit_prompt,
)
from common.rewards import math_reward

datasets.disable_progress_bars()

GSM8K = [
    {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "He has 3+4=<<3+4=7>>7.\n#### 7"},
    {"question": "A box holds 12 pens; 5 are taken. How many are left?", "answer": "12-5=<<12-5=7>>7\n#### 7"},
    {"question": "What is 1,000 + 234?", "answer": "1,000+234=1,234\n#### 1,234"},
    {"question": "Sam earns $6 an hour for 8 hours. How much?", "answer": "6*8=48\n#### 48"},
]
MATH = [
    {"problem": "What is $\\frac{1}{2}+\\frac{1}{4}$?", "solution": "We get $\\boxed{\\frac{3}{4}}$.", "level": "1"},
    {"problem": "Compute $2^5$.", "solution": "$2^5 = \\boxed{32}$", "level": "2"},
]


def _conversation(*turns):
    return [{"role": role, "content": text} for role, text in zip(["user", "assistant"] * len(turns), turns)]


ULTRAFEEDBACK = [  # TRL's implicit shape: chosen and rejected are whole conversations sharing the prompt turns
    {"prompt": "What is 2+2?", "chosen": _conversation("What is 2+2?", "4"), "rejected": _conversation("What is 2+2?", "5"),
     "score_chosen": 9.0, "score_rejected": 2.0},
    {"prompt": "Then 3+3?", "chosen": _conversation("What is 2+2?", "4", "Then 3+3?", "6"),
     "rejected": _conversation("What is 2+2?", "4", "Then 3+3?", "7"), "score_chosen": 8.0, "score_rejected": 1.0},
]  # fmt: skip


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """The real-world shapes, written by `datasets`: {name: path}."""
    d = tmp_path_factory.mktemp("shapes")
    datasets.Dataset.from_list(GSM8K).to_parquet(str(d / "gsm8k.parquet"))
    (d / "math.json").write_text(json.dumps(MATH))  # a JSON array, as MATH ships
    datasets.Dataset.from_list(GSM8K).to_csv(str(d / "gsm8k_csv.csv"), index=False)
    ufb = datasets.Dataset.from_list(ULTRAFEEDBACK)
    datasets.DatasetDict(train_prefs=ufb, test_prefs=ufb.select([0])).save_to_disk(str(d / "ultrafeedback"))
    sharegpt = [
        {"conversations": [{"from": "human", "value": f"What is {a}+{a}?"}, {"from": "gpt", "value": str(2 * a)}]}
        for a in range(1, 9)
    ]
    datasets.Dataset.from_list(sharegpt).save_to_disk(str(d / "sharegpt"))
    repo = d / "repo"  # a hub-style dataset repository (what `load_dataset(hub_id, config)` reads), two configs
    (repo / "main").mkdir(parents=True)
    (repo / "socratic").mkdir()
    datasets.Dataset.from_list(GSM8K).to_parquet(str(repo / "main" / "train-00000.parquet"))
    datasets.Dataset.from_list(GSM8K[:2]).to_parquet(str(repo / "main" / "test-00000.parquet"))
    datasets.Dataset.from_list(GSM8K[:1]).to_parquet(str(repo / "socratic" / "train-00000.parquet"))
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n    path: main/train-*\n"
        "  - split: test\n    path: main/test-*\n- config_name: socratic\n  data_files:\n  - split: train\n"
        "    path: socratic/train-*\n---\n"
    )
    return {p.name.split(".")[0]: p for p in d.iterdir()}


def _fill(text: str, shapes: dict) -> str:
    """'{gsm8k}@test' -> '/tmp/.../gsm8k.parquet@test'."""
    for name, path in shapes.items():
        text = text.replace("{" + name + "}", str(path))
    return text


# ----------------------------------------------------------------------------------------------------------------
# Sources


def test_source_spellings():
    assert parse_source("openai/gsm8k") == ("openai/gsm8k", None, None, None)
    assert parse_source("openai/gsm8k:main@train") == ("openai/gsm8k", "main", "train", None)
    assert parse_source("openai/gsm8k:main@test[:500]") == ("openai/gsm8k", "main", "test", ":500")
    assert parse_source("HuggingFaceH4/ultrachat_200k@train_sft") == (
        "HuggingFaceH4/ultrachat_200k",
        None,
        "train_sft",
        None,
    )
    assert parse_source("data/x.parquet[10:20]") == ("data/x.parquet", None, None, "10:20")


def test_every_local_shape_reads_into_records(shapes):
    rows, name = read_records(str(shapes["gsm8k"]))
    assert [r["question"] for r in rows] == [g["question"] for g in GSM8K] and name.endswith("gsm8k.parquet@train")
    assert rows[2]["_where"].endswith("row 2")
    rows, _ = read_records(str(shapes["math"]) + "[1:]")  # a slice of a JSON array
    assert [r["problem"] for r in rows] == [MATH[1]["problem"]]
    rows, _ = read_records(str(shapes["gsm8k_csv"]))
    assert rows[3]["answer"] == GSM8K[3]["answer"]
    rows, _ = read_records(f"{shapes['ultrafeedback']}@test_prefs")
    assert len(rows) == 1 and rows[0]["chosen"] == ULTRAFEEDBACK[0]["chosen"]
    rows, _ = read_records(str(shapes["sharegpt"]), DataOptions(columns={"messages": "conversations"}))
    assert rows[0]["messages"] == _conversation("What is 1+1?", "2")  # ShareGPT from/value -> role/content
    rows, _ = read_records(f"{shapes['repo']}:main@test")  # a dataset repository: config and split as on the hub
    assert len(rows) == 2
    rows, _ = read_records(f"{shapes['repo']}:socratic")
    assert len(rows) == 1
    lines = []  # no config given, several exist (openai/gsm8k): the first, said once
    rows, name = read_records(str(shapes["repo"]), log=lines.append)
    assert len(rows) == len(GSM8K) and name.endswith("repo:main@train")
    assert lines == [f"{shapes['repo']}: no config given; using 'main' (the configs are: main, socratic)"]


@pytest.mark.parametrize(
    "spec, pattern",
    [
        ("{repo}:main@validation", r"Unknown split .*validation.*'train', 'test'"),
        ("{repo}:nope", r"'nope' not found. Available: \['main', 'socratic'\]"),
        ("{ultrafeedback}@train", r"no split 'train'; the splits are: train_prefs, test_prefs"),
        ("{gsm8k}@test", r"a single file has one split \(train\)"),
        ("{gsm8k}[a:b]", r"slice \[a:b\] must be \[START:STOP\]"),
        ("nobody/no-such-dataset:main@train", r"'nobody/no-such-dataset' is not in the local datasets cache .*hub"),
        ("missing/dir/data.parquet", r"no such file or directory"),
    ],
)
def test_bad_sources_get_one_line(shapes, spec, pattern):
    spec = _fill(spec, shapes)
    with pytest.raises(SystemExit, match=pattern):
        read_records(spec)


def test_columns_map_fields_and_a_missing_column_lists_the_columns(shapes):
    opts = data_options(columns="prompt=question, answer=answer")
    records = load_prompts(str(shapes["gsm8k"]), ("prompt", "answer"), opts)
    assert records[0]["prompt"] == GSM8K[0]["question"] and records[0]["answer"] == GSM8K[0]["answer"]
    with pytest.raises(SystemExit, match=r"no column 'query'; the columns are: question, answer"):
        read_records(str(shapes["gsm8k"]), data_options(columns="prompt=query"))
    lines = []  # unmapped: GSM8K's `question`, MATH's `problem` and `solution` are taken, saying so
    assert (
        load_prompts(str(shapes["gsm8k"]), ("prompt", "answer"), log=lines.append)[1]["prompt"] == GSM8K[1]["question"]
    )
    math_rows = load_prompts(str(shapes["math"]), ("prompt", "answer"), log=lines.append)
    assert math_rows[0]["prompt"] == MATH[0]["problem"] and math_rows[0]["answer"] == MATH[0]["solution"]
    assert lines[0].endswith(
        "gsm8k.parquet@train: no 'prompt' column; using 'question' (--columns prompt=COLUMN picks another)"
    )
    assert [line.split(": ", 1)[1] for line in lines[1:]] == [
        "no 'prompt' column; using 'problem' (--columns prompt=COLUMN picks another)",
        "no 'answer' column; using 'solution' (--columns answer=COLUMN picks another)",
    ]
    odd = shapes["gsm8k"].parent / "odd.parquet"
    datasets.Dataset.from_list([{"q": "What is 1+1?", "a": "2"}]).to_parquet(str(odd))
    with pytest.raises(SystemExit, match=r"row 0: missing field 'prompt' \(the record has: q, a; --columns maps"):
        load_prompts(str(odd), ("prompt", "answer"))
    for bad in ("prompt", "prompt=", "=question"):
        with pytest.raises(SystemExit, match=r"--columns .*FIELD=COLUMN"):
            data_options(columns=bad)


def test_prompt_template_and_system_prompt(shapes):
    opts = data_options(
        columns="answer=solution",
        prompt_template="{problem}\nPut the final answer in \\boxed{{}}.",
        system_prompt="Be brief.",
    )
    records = load_prompts(str(shapes["math"]), ("prompt", "answer"), opts)
    assert records[1]["prompt"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Compute $2^5$.\nPut the final answer in \\boxed{}."},
    ]
    with pytest.raises(SystemExit, match=r"math.json@train row 0: --prompt-template uses column 'question'; the record "
                       r"has: problem, solution, level, answer"):  # fmt: skip
        load_prompts(
            str(shapes["math"]), ("prompt",), data_options(columns="answer=solution", prompt_template="{question}")
        )
    for bad, pattern in [
        ("{question", "expected '}'"),
        ("plain text", "uses no column"),
        ("{0}", "must name a column"),
    ]:
        with pytest.raises(SystemExit, match=pattern):
            data_options(prompt_template=bad)


def test_gsm8k_and_math_rows_are_scored_end_to_end(shapes):
    """The worked solutions stay the `answer`; the math verifier finds the final answer in them (#### 1,234 and
    \\boxed{\\frac{3}{4}}) and grades completions against it."""
    gsm = load_prompts(str(shapes["gsm8k"]), ("prompt", "answer"), data_options(columns="prompt=question"))
    completions = ["3 + 4 = 7. #### 7", "The answer is 8.", "So 1234 in all: \\boxed{1234}", "#### $48.00"]
    assert math_reward(None, completions, [r["answer"] for r in gsm]) == [1.0, 0.0, 1.0, 1.0]
    opts = data_options(columns="answer=solution", prompt_template="{problem}")
    math_rows = load_prompts(str(shapes["math"]), ("prompt", "answer"), opts)
    assert math_reward(None, ["\\boxed{0.75}", "it is 32"], [r["answer"] for r in math_rows]) == [1.0, 1.0]
    assert math_reward(None, ["\\boxed{1/2}", "\\boxed{31}"], [r["answer"] for r in math_rows]) == [0.0, 0.0]


# ----------------------------------------------------------------------------------------------------------------
# Preferences: TRL's implicit prompt


def test_implicit_prompt_splits_where_the_conversations_diverge(shapes, chat_tokenizer):
    chosen = _conversation("What is 2+2?", "4", "Then 3+3?", "6")
    rejected = _conversation("What is 2+2?", "4", "Then 3+3?", "7")
    prompt, c, r = split_implicit_prompt(chosen, rejected, "row 0")
    assert prompt == chosen[:3] and c == chosen[3:] and r == rejected[3:]
    with pytest.raises(SystemExit, match="row 7: 'chosen' and 'rejected' share no prompt turns"):
        split_implicit_prompt(_conversation("What is 2+2?", "4"), _conversation("What is 3+3?", "6"), "row 7")
    with pytest.raises(SystemExit, match=r"row 8: 'chosen' and 'rejected' differ in turn 2 \(user / user\)"):
        split_implicit_prompt(_conversation("a", "b", "c", "d"), _conversation("a", "b", "x", "d"), "row 8")
    # through the loader: the same tokens as the explicit shape of the same pairs
    implicit = load_preference_dataset(f"{shapes['ultrafeedback']}@train_prefs", chat_tokenizer, 256)
    explicit_rows = [
        {"prompt": u["chosen"][:-1], "chosen": u["chosen"][-1:], "rejected": u["rejected"][-1:]} for u in ULTRAFEEDBACK
    ]
    path = shapes["gsm8k"].parent / "explicit.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in explicit_rows))
    assert implicit.to_list() == load_preference_dataset(str(path), chat_tokenizer, 256).to_list()


# ----------------------------------------------------------------------------------------------------------------
# Tokenization: parallel and cached


def test_tokenization_is_cached_and_parallel(tmp_path, chat_tokenizer, monkeypatch):
    monkeypatch.delenv("CLEANPOST_NO_DATA_CACHE", raising=False)
    rows = [{"prompt": f"What is {a}+{b}?", "completion": str(a + b)} for a in range(30) for b in range(5)]
    path = tmp_path / "pc.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    lines = []
    first = load_sft_dataset(str(path), chat_tokenizer, 64, log=lines.append)
    assert "tokenized 150 examples" in lines[-1] and "cached in" in lines[-1]
    parallel = load_sft_dataset(str(path), chat_tokenizer, 64, log=lines.append, num_proc=2)  # the cache: no work
    assert "read from the cache" in lines[-1] and parallel.to_list() == first.to_list()
    # a different template, max length or tokenizer setting is a different key: tokenized again, here in 2 processes
    opts = data_options(prompt_template="Q: {prompt}")
    fresh = load_sft_dataset(str(path), chat_tokenizer, 64, log=lines.append, opts=opts, num_proc=2)
    assert "tokenized 150 examples" in lines[-1]
    assert fresh.to_list() == load_sft_dataset(str(path), chat_tokenizer, 64, opts=opts, log=lines.append).to_list()
    assert "read from the cache" in lines[-1] and fresh.to_list() != first.to_list()
    # another --max-length: tokenized again; its truncation and drop notes come back from the cache too
    notes = []
    load_sft_dataset(str(path), chat_tokenizer, 32, log=notes.append)
    assert "tokenized 50 examples" in notes[-1] and "truncated 150 of 150" in notes[0] and "dropped 100" in notes[1]
    load_sft_dataset(str(path), chat_tokenizer, 32, log=notes.append)
    assert notes[3:5] == notes[:2] and "read from the cache" in notes[-1]
    # no cache at all when asked; and read, tokenized and stored a chunk at a time, the same examples
    monkeypatch.setenv("CLEANPOST_NO_DATA_CACHE", "1")
    load_sft_dataset(str(path), chat_tokenizer, 64, log=lines.append)
    assert "tokenized 150 examples" in lines[-1] and "cached in" not in lines[-1]
    monkeypatch.setattr(common.data, "CHUNK_ROWS", 16)
    for num_proc in (1, 2):
        assert load_sft_dataset(str(path), chat_tokenizer, 64, num_proc=num_proc).to_list() == first.to_list()
    monkeypatch.delenv("CLEANPOST_NO_DATA_CACHE")
    chunked = load_sft_dataset(str(path), chat_tokenizer, 63, log=lines.append)  # a new key: written in 10 parts
    assert "cached in" in lines[-1] and chunked.to_list() == load_sft_dataset(str(path), chat_tokenizer, 63).to_list()
    assert [e["input_ids"] for e in chunked] == [e["input_ids"][:63] for e in first]


def test_a_bad_record_in_a_worker_stops_the_run_with_its_line(tmp_path, chat_tokenizer):
    path = tmp_path / "bad.jsonl"
    rows = [{"prompt": "What is 1+1?", "completion": "2"}] * 40 + [{"prompt": "What is 1+1?"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match=r"bad.jsonl:41: missing field 'completion'"):
        load_sft_dataset(str(path), chat_tokenizer, 64, num_proc=2)


# ----------------------------------------------------------------------------------------------------------------
# Mixtures


def test_mixture_draws_in_proportion_to_the_weights_and_resumes_exactly():
    sizes, weights, batch, steps = (40, 300), (1.0, 0.25), 16, 200
    mix = Mixture([list(range(sizes[0])), list(range(sizes[1]))], ["chat.jsonl", "general.parquet"], list(weights))
    drawn = [mix.indices(batch, s, seed=3) for s in range(steps)]
    n = batch * steps
    share = sum(i < sizes[0] for step in drawn for i in step) / n
    p = weights[0] / sum(weights)  # 0.8
    assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / n)  # binomial sampling error
    shares = mix.shares(batch, steps - 1, seed=3)
    assert shares == pytest.approx({"data/share/chat": share, "data/share/general": 1 - share}, abs=1e-12)
    # a fresh sampler (a resumed run) draws exactly what the uninterrupted one did, from any step
    assert Mixture([[0] * 40, [0] * 300], ["a", "b"], list(weights)).indices(batch, 150, seed=3) == drawn[150]
    # each source is read in seeded epochs: its first len(source) draws are a permutation of it
    first = [i for step in drawn for i in step if i < sizes[0]][: sizes[0]]
    assert sorted(first) == list(range(sizes[0]))
    # default weights: the sources' sizes (their concatenation); one source: the plain epoch order
    assert Mixture([[0] * 10, [0] * 30], ["a", "b"]).weights.tolist() == [0.25, 0.75]
    with pytest.raises(SystemExit, match="positive"):
        Mixture([[0], [0]], ["a", "b"], [1.0, 0.0])


# ----------------------------------------------------------------------------------------------------------------
# Through the scripts' command lines: each shape a script supports, 2 steps


def _run(script, tmp_path, *flags, check=True):
    no_eval = [] if script == "reward_model.py" else ["--eval-prompts", ""]  # the only script without greedy eval
    return run_script(
        ROOT / script, "--output-dir", tmp_path, "--run-name", "r", "--max-steps", "2", "--eval-every", "0",
        *no_eval, *flags, check=check,
    )  # fmt: skip


def _metrics(tmp_path):
    return [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").open()]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["sft.py", "lora.py"])
def test_sft_takes_a_chat_set_and_a_gsm8k_mixture(shapes, tmp_path, script):
    """ShareGPT conversations (messages=conversations) mixed with GSM8K rows made prompt/completion by
    --columns and --prompt-template; the shares are logged; the banner shows the template."""
    proc = _run(
        script, tmp_path, "--dataset", shapes["sharegpt"], shapes["gsm8k"], "--dataset-weights", "3", "1",
        "--columns", "messages=conversations,completion=answer", "--prompt-template", "Q: {question}",
        "--system-prompt", "Be brief.", "--eval-dataset", "", "--batch-size", "8",
    )  # fmt: skip
    assert "prompt template 'Q: {question}'" in proc.stdout + proc.stderr
    last = _metrics(tmp_path)[-1]
    assert last["step"] == 2 and math.isfinite(last["train/loss"])
    assert abs(last["data/share/sharegpt"] + last["data/share/gsm8k"] - 1) < 1e-9
    saved = json.loads((tmp_path / "r" / "args.json").read_text())
    assert saved["prompt_template"] == "Q: {question}" and saved["dataset_weights"] == [3.0, 1.0]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["dpo.py", "reward_model.py"])
def test_preference_scripts_take_ultrafeedback_with_implicit_prompts(shapes, tmp_path, script):
    _run(
        script, tmp_path, "--dataset", f"{shapes['ultrafeedback']}@train_prefs",
        "--eval-dataset", f"{shapes['ultrafeedback']}@test_prefs", "--batch-size", "2",
    )  # fmt: skip
    rows = _metrics(tmp_path)
    assert rows[-1]["step"] == 2 and math.isfinite(rows[-1]["train/loss"]) and "eval/loss" in rows[-1]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["grpo.py", "ppo.py", "opd.py"])
def test_rl_scripts_take_gsm8k_from_a_dataset_repository(shapes, tmp_path, script):
    flags = ["--dataset", f"{shapes['repo']}:main@train", "--columns", "prompt=question", "--prompts-per-step", "2"]
    flags += ["--max-new-tokens", "8", "--prompt-template", "{question} Answer:"]
    flags += {"grpo.py": ["--group-size", "2", "--reward-fn", "math"], "ppo.py": ["--reward-fn", "math"]}.get(
        script, []
    )
    _run(script, tmp_path, *flags)
    assert _metrics(tmp_path)[-1]["step"] == 2


@pytest.mark.parametrize(
    "flags, pattern",
    [
        (["--dataset", "{repo}:main@dev"], r"Unknown split .*dev"),
        (["--dataset", "{gsm8k}", "--columns", "prompt=query"], "no column 'query'; the columns are: question, answer"),
        (["--dataset", "{gsm8k}", "{math}", "--dataset-weights", "1"], "--dataset-weights has 1 values for 2"),
        (["--dataset", "{gsm8k}", "--columns", "prompt"], "--columns 'prompt': expected FIELD=COLUMN"),
        (["--dataset", "{gsm8k}", "--prompt-template", "{question"], "--prompt-template '{question'"),
        (["--dataset", "nobody/nothing"], "not in the local datasets cache"),
    ],
)
def test_bad_data_flags_stop_before_any_model_is_loaded(shapes, tmp_path, flags, pattern):
    flags = [_fill(f, shapes) for f in flags]
    proc = _run("grpo.py", tmp_path, "--model", tmp_path / "no-model-here", *flags, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and lines and lines[-1].startswith("error:"), proc.stderr[-2000:]
    assert re.search(pattern, lines[-1]), lines[-1]
    assert "Traceback" not in proc.stderr and not (tmp_path / "r").exists()
