"""The guarantees every script makes, as one table: (script x guarantee), through the real command line.

    guarantee            what is compared
    resume               N steps straight vs a run stopped after step N/2 (what a kill leaves: args.json, the
                         step-N/2 checkpoint, metrics up to the step after it, a half-written last line) continued
                         with `--resume RUN` alone: every logged value of every step (losses, learning rates,
                         rollout statistics, evaluations) and the final weights
    micro_batch          the same run at two --micro-batch-size values: every logged value of every step
                         (train/loss and train/grad_norm included) and the final weights
    processes            1 process vs `torchrun --nproc_per_node=2` (frozen models sharded too): every logged value
                         of every step and the final weights (values and dtypes)

A metric logged by one run and not the other is a failure. The tolerances are fp32 summation-order noise (the runs
differ in how sums are split). Below the table: crash-safe checkpoints (a SIGKILL inside a checkpoint write), resume
flag checks, run directories, and seeds.
"""

import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, read_metrics, run_script, stop_at
from safetensors.torch import load_file

VLLM = importlib.util.find_spec("vllm") is not None
STEPS = 4  # every run below: 4 optimizer steps, a checkpoint at step 2
RUNS = {  # script -> the short tiny-world run (divisible by 2 processes), and the two micro-batch sizes
    "sft": (["--batch-size", "8", "--learning-rate", "1e-3"], ("8", "2")),
    "lora": (["--batch-size", "8", "--learning-rate", "1e-3"], ("8", "2")),
    "dpo": (["--batch-size", "8", "--shard-frozen"], ("8", "2")),
    "reward_model": (["--batch-size", "8"], ("8", "2")),
    "grpo": (["--prompts-per-step", "4", "--group-size", "2", "--generation-batch-size", "4"], ("8", "2")),
    "ppo": (
        ["--prompts-per-step", "4", "--group-size", "2", "--generation-batch-size", "4", "--ppo-epochs", "2"]
        + ["--shard-frozen"],
        ("8", "2"),
    ),
    "opd": (
        ["--prompts-per-step", "4", "--group-size", "2", "--generation-batch-size", "4", "--cold-start-steps", "1"]
        + ["--shard-frozen"],
        ("8", "2"),
    ),
}  # --shard-frozen: under torchrun the frozen models (reference, reward model, teacher) are sharded too
SCRIPTS = list(RUNS)


def steps_flags(script):
    # opd's steps are --cold-start-steps + --max-steps
    return ["--max-steps", str(STEPS - 1 if script == "opd" else STEPS)]


def command(script, out: Path, name: str, micro: str, *extra):
    base, _ = RUNS[script]
    return [f"{script}.py", *base, *steps_flags(script), "--micro-batch-size", micro, "--eval-every", "0"] + [
        "--save-every",
        "2",
        "--output-dir",
        out,
        "--run-name",
        name,
        *extra,
    ]


_done: dict = {}


def run_once(tmp_path_factory, script, micro_index=0, nproc=1) -> Path:
    """Each (script, micro-batch size, process count) run once per session; several guarantees compare it."""
    key = (script, micro_index, nproc)
    if key not in _done:
        out = tmp_path_factory.mktemp(f"{script}_mb{micro_index}_p{nproc}")
        args = command(script, out, "run", RUNS[script][1][micro_index])
        if nproc == 1:
            run_script(*args)
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
            assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        _done[key] = out / "run"
    return _done[key]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor the run saved at the end (the policy, ppo's value model, lora's adapters)."""
    out = {}
    for f in sorted(run_dir.glob("final/**/*.safetensors")) + sorted(run_dir.glob("value_model/*.safetensors")):
        out.update({f"{f.relative_to(run_dir)}:{k}": v for k, v in load_file(f).items()})
    assert out, f"no weights under {run_dir}"
    return out


NOISE_KEYS = ("rollout/logprob_diff_mean", "rollout/logprob_diff_max")  # values that are fp32 noise themselves
# Means of per-token log-prob differences between two models (~1e-2 here): their absolute error is that of the
# log-probs (~1e-6 once AdamW has carried summation-order noise into the weights: ppo's train/kl at step 4 was
# measured 1.25e-6 apart between micro-batch sizes), not relative to their small value
DIFFERENCE_KEYS = ("train/kl", "train/reverse_kl")


def assert_same_rows(a: list[dict], b: list[dict], *, rel: float, abs_: float, what: str):
    """Every logged value equal within tolerance; the sampler/trainer mismatch (itself summation-order noise, which
    is what differs between the runs) below 1e-4 in both."""
    assert [r["step"] for r in a] == [r["step"] for r in b], what
    for ra, rb in zip(a, b):
        keys_a = {k for k in ra if not k.startswith("perf/")}
        keys_b = {k for k in rb if not k.startswith("perf/")}
        assert keys_a == keys_b, f"{what}: step {ra['step']} logs {sorted(keys_a ^ keys_b)} in one run only"
        for k in sorted(keys_a - {"step"}):
            if k in NOISE_KEYS and abs_ > 1e-7:
                assert max(ra[k], rb[k]) < 1e-4, f"{what}: {k} at step {ra['step']}"
                continue
            tolerance = 1e-5 if k in DIFFERENCE_KEYS and abs_ > 1e-7 else abs_  # (resume compares exactly)
            assert rb[k] == pytest.approx(ra[k], rel=rel, abs=tolerance), f"{what}: {k} at step {ra['step']}"


def assert_same_weights(a: Path, b: Path, atol: float):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert {k: v.dtype for k, v in wa.items()} == {k: v.dtype for k, v in wb.items()}  # saved in the same dtype
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst <= atol, worst


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_equals_the_uninterrupted_run(script, tmp_path_factory, tmp_path):
    straight = run_once(tmp_path_factory, script)
    stopped = stop_at(straight, tmp_path / "stopped", step=2, logged=3)  # killed after logging step 3
    with (stopped / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "train/lo')  # ... while writing step 4's row
    proc = run_script(f"{script}.py", "--resume", stopped)  # the saved args.json gives every other flag
    out = proc.stdout + proc.stderr
    assert "resumed at step 2" in out
    assert "dropped 1 incomplete line" in out and "dropped 1 row(s)" in out
    rows = read_metrics(stopped)
    assert [r["step"] for r in rows] == list(range(STEPS + 1))  # no step twice
    assert_same_rows(read_metrics(straight), rows, rel=1e-6, abs_=1e-7, what=f"{script} resume")
    assert_same_weights(straight, stopped, atol=1e-6)


@pytest.mark.parametrize("script", SCRIPTS)
def test_micro_batch_size_does_not_change_the_run(script, tmp_path_factory):
    one, many = run_once(tmp_path_factory, script, 0), run_once(tmp_path_factory, script, 1)
    rows_one, rows_many = read_metrics(one), read_metrics(many)
    # (grpo skips the update of a step whose groups all tie: no loss to log there)
    assert any("train/grad_norm" in r and "train/loss" in r for r in rows_one[1:])
    assert_same_rows(rows_one, rows_many, rel=1e-4, abs_=1e-6, what=f"{script} micro-batch")
    # AdamW divides by the gradient's running RMS, which amplifies summation-order noise where a gradient is tiny:
    # lora's layer-0 v_proj adapter ends 4e-5 apart after 4 steps at lr 1e-3 (every other tensor <= 6e-7), so 1e-4
    # here; a wrong gradient shows in train/grad_norm above, which AdamW's scale invariance would hide in the weights
    assert_same_weights(one, many, atol=1e-4)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
@pytest.mark.parametrize("script", SCRIPTS)
def test_two_processes_equal_one(script, tmp_path_factory):
    one, two = run_once(tmp_path_factory, script, 1), run_once(tmp_path_factory, script, 1, nproc=2)
    # rel 1e-4: reward_model's train/grad_norm after two updates was measured 3e-5 apart (summation order)
    assert_same_rows(read_metrics(one), read_metrics(two), rel=1e-4, abs_=1e-6, what=f"{script} 2 processes")
    assert_same_weights(one, two, atol=1e-5)
    if script == "sft":  # the gathered checkpoint is a plain transformers model with the trained weights
        from transformers import AutoModelForCausalLM

        ids = torch.tensor([[5, 9, 17, 23, 4]])
        logits = [AutoModelForCausalLM.from_pretrained(run / "final")(ids).logits for run in (one, two)]
        torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Crash-safe checkpoints: a SIGKILL inside a checkpoint write


def test_kill_during_a_checkpoint_write_resumes_from_the_last_complete_one(tmp_path):
    """A run SIGKILLed while writing checkpoints/step_4 (all its files written, not yet renamed) leaves step_2
    complete, step_4.tmp, and metrics up to step 4: `--resume` says it ignores step_4.tmp, continues from step_2,
    drops the rows past it, and ends exactly where an uninterrupted run ends."""
    args = command("sft", tmp_path, "straight", "8")
    args[args.index("--max-steps") + 1] = "6"
    run_script(*args)
    args[args.index("--run-name") + 1] = "killed"
    env = {**os.environ, "CLEANPOST_TEST_CHECKPOINT_PAUSE": "step_4:600"}  # step_4's write waits inside
    proc = subprocess.Popen(
        [sys.executable, *map(str, args)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    killed = tmp_path / "killed"
    marker = killed / "checkpoints" / "step_4.tmp" / "WRITING"
    deadline = time.time() + 600
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before writing step_4"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / "step_4").exists()  # never visible under its final name
    resumed = run_script("sft.py", "--resume", killed)
    out = resumed.stdout + resumed.stderr
    assert "ignoring incomplete checkpoint(s) step_4.tmp" in out
    assert "step_2 (the newest complete checkpoint" in out and "resumed at step 2" in out
    assert "dropped 2 row(s)" in out  # steps 3 and 4, logged by the killed run
    assert [r["step"] for r in read_metrics(killed)] == list(range(7))
    straight = tmp_path / "straight"
    assert_same_rows(read_metrics(straight), read_metrics(killed), rel=1e-6, abs_=1e-7, what="resume after a kill")
    assert_same_weights(straight, killed, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# --resume RUN continues that run: its saved flags, its script, its directory


@pytest.fixture
def stopped_sft(tmp_path_factory, tmp_path):
    return stop_at(run_once(tmp_path_factory, "sft"), tmp_path / "stopped", step=2)


@pytest.mark.parametrize(
    "flag, value", [("--learning-rate", "0.5"), ("--batch-size", "16"), ("--seed", "7"), ("--model", "assets/tiny-rm")]
)
def test_resume_refuses_a_flag_that_changes_the_run(stopped_sft, flag, value):
    before = (stopped_sft / "metrics.jsonl").read_text()
    proc = run_script("sft.py", "--resume", stopped_sft, flag, value, check=False)
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {flag} ") and "differs from the run's" in line and "args.json" in line
    assert (stopped_sft / "metrics.jsonl").read_text() == before  # refused before it touched the run


def test_resume_may_extend_the_run_and_change_its_cadence(stopped_sft):
    proc = run_script("sft.py", "--resume", stopped_sft, "--max-steps", "6", "--eval-every", "3")
    assert "resume: --max-steps 4 -> 6, --eval-every 0 -> 3" in proc.stdout
    rows = read_metrics(stopped_sft)
    assert [r["step"] for r in rows] == list(range(7))
    assert [r["step"] for r in rows if "eval/loss" in r] == [0, 3, 6]
    saved = json.loads((stopped_sft / "args.json").read_text())
    assert saved["max_steps"] == 6 and saved["eval_every"] == 3 and saved["script"] == "sft"


def test_resume_refuses_a_run_of_another_script(stopped_sft):
    proc = run_script("dpo.py", "--resume", stopped_sft, check=False)
    assert proc.returncode == 1 and "is a run of sft.py, not of dpo.py" in proc.stderr


def test_resuming_a_finished_run_says_so_and_touches_nothing(tmp_path_factory):
    finished = run_once(tmp_path_factory, "sft")
    before = (finished / "metrics.jsonl").read_text()
    proc = run_script("sft.py", "--resume", finished)
    assert "finished at step 4" in proc.stdout and "nothing to resume" in proc.stdout
    assert (finished / "metrics.jsonl").read_text() == before


def test_a_new_run_never_writes_into_an_existing_run(tmp_path_factory, tmp_path):
    finished = run_once(tmp_path_factory, "sft")
    proc = run_script("sft.py", "--output-dir", finished.parent, "--run-name", finished.name, check=False)
    assert proc.returncode == 1 and "holds a run already" in proc.stderr and "--resume" in proc.stderr
    # default names: two runs started in the same second get two directories
    from common.tracking import _make_run_dir

    first = _make_run_dir(str(tmp_path), None, "sft", 1)
    second = _make_run_dir(str(tmp_path), None, "sft", 1)
    assert first != second and first.is_dir() and second.is_dir()


def test_resume_takes_every_flag_from_the_saved_arguments(tmp_path):
    """Called from Python (as a notebook would): a field left at its default takes the run's saved value — the
    reference model of a DPO run resumed without --model stays the run's model."""
    from common.tracking import open_run
    from dpo import Args

    run = tmp_path / "dpo_run"
    (run / "checkpoints" / "step_2").mkdir(parents=True)
    (run / "checkpoints" / "step_2" / "trainer_state.pt").touch()
    saved = Args(model="my/model", learning_rate=3e-6, dataset=("a.jsonl", "b.jsonl"), dataset_weights=(1.0, 2.0))
    (run / "args.json").write_text(json.dumps({"script": "dpo", **dataclasses.asdict(saved)}))
    args, ckpt, run_dir = open_run(Args(resume=str(run)), "dpo")
    assert (args.model, args.learning_rate, args.dataset, args.dataset_weights) == (
        "my/model",
        3e-6,
        ("a.jsonl", "b.jsonl"),
        (1.0, 2.0),
    )
    assert ckpt == run / "checkpoints" / "step_2" and run_dir == run


# ----------------------------------------------------------------------------------------------------------------
# Seeds: every generate call of a run has its own


@pytest.mark.parametrize("script", ["grpo", "ppo", "opd"])
def test_the_trainer_computes_the_log_probs_the_sampler_drew_with(script, tmp_path):
    """At --temperature 0.7 (fp32) the training forward's log-prob of every sampled token equals the sampler's
    (`rollout/logprob_diff_max`, every step, opd's teacher-sampled cold start included), so --is-correction tis
    changes nothing; grpo at --top-p 0.5 shows what the metrics are for: the loss's log-probs are over the full
    vocabulary, the sampler's over the nucleus."""
    base, _ = RUNS[script]
    flags = [*base, "--max-steps", "2", "--eval-every", "0", "--save-every", "0", "--output-dir", tmp_path]
    run_script(f"{script}.py", *flags, "--temperature", "0.7", "--run-name", "t07")
    rows = [r for r in read_metrics(tmp_path / "t07") if "train/loss" in r]
    assert len(rows) == (3 if script == "opd" else 2)
    for r in rows:
        assert 0 <= r["rollout/logprob_diff_mean"] <= r["rollout/logprob_diff_max"] < 1e-4, r
        assert abs(r["rollout/is_ratio_min"] - 1) < 1e-4 and abs(r["rollout/is_ratio_max"] - 1) < 1e-4, r
    # --is-correction tis with the same forward on both sides: weights within 1e-4 of 1, the same run
    run_script(f"{script}.py", *flags, "--temperature", "0.7", "--is-correction", "tis", "--run-name", "tis")
    corrected = [r for r in read_metrics(tmp_path / "tis") if "train/loss" in r]
    assert len(corrected) == len(rows)
    for a, b in zip(rows, corrected):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-3, abs=1e-6)
        assert b["rollout/is_masked_frac"] == 0
    if script == "grpo":  # the nucleus: pi_sampler = pi / (mass of the nucleus) >= pi_trainer, so rho <= 1
        spread = ["--reward-fn", "tests.cli_rewards:alternating"]  # top-p 0.5 samples alike: keep every update
        run_script("grpo.py", *flags, *spread, "--temperature", "0.7", "--top-p", "0.5", "--run-name", "nucleus")
        nucleus = [r for r in read_metrics(tmp_path / "nucleus") if "train/loss" in r]
        assert nucleus and all(r["rollout/logprob_diff_mean"] > 1e-2 for r in nucleus)
        assert all(r["rollout/is_ratio_max"] <= 1 + 1e-5 and r["rollout/is_ratio_min"] < 0.9 for r in nucleus)


def test_derive_seed_never_repeats_within_a_run():
    from common.generation import derive_seed

    seeds = [derive_seed(1, "sample", s, r, c) for s in range(60) for r in range(5) for c in range(40)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= x < 2**64 for x in seeds)  # what torch.manual_seed takes
    # the additive scheme it replaces: seed * 1_000_003 + 101 * step + round + call collides at 101 calls a step
    old = [1 * 1_000_003 + 101 * s + r + c for s in range(60) for r in range(5) for c in range(40)]
    assert len(set(old)) < len(old)
    assert derive_seed(1, "sample", 3) != derive_seed(2, "sample", 3) != derive_seed(1, "minibatch", 3)
    with pytest.raises(ValueError):
        derive_seed(1, "sample", 0, 0, 2**20)


@pytest.mark.parametrize("budget", ["0", "1"])
@pytest.mark.parametrize("script", ["grpo", "ppo", "opd"])
def test_no_two_generate_calls_of_a_run_share_a_seed(script, budget, tmp_path, monkeypatch):
    """A run in this process with several generate calls per step (and grpo's resampling rounds; with
    --generation-max-tokens 1 every call split into one part per row): every call's seed is recorded, and none
    repeats."""
    import importlib

    from common import generation

    module = importlib.import_module(script)
    seeds = []

    def recording(*a, **k):
        seeds.append(derive(*a, **k))
        return seeds[-1]

    derive = generation.derive_seed
    monkeypatch.setattr(generation, "derive_seed", recording)
    argv = [*RUNS[script][0], *steps_flags(script), "--generation-batch-size", "2", "--eval-prompts", ""]
    argv += ["--generation-max-tokens", budget]
    argv += ["--output-dir", str(tmp_path)] + (["--dynamic-sampling"] if script == "grpo" else [])
    import tyro

    module.main(tyro.cli(module.Args, args=argv))
    calls_per_step = 4 if budget == "0" else 8  # 8 completions, 2 a call (1 a part)
    assert len(seeds) >= STEPS * calls_per_step
    assert len(set(seeds)) == len(seeds)


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the flag, file or function, before the model is loaded or a step is spent


def run_with_path(script, *args, pythonpath):
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run(
        [sys.executable, f"{script}.py", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def last_line(proc) -> str:
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    (d / "broken_syntax.py").write_text("def reward(prompts, completions, answers)\n    return []\n")
    (d / "broken_name.py").write_text("def reward(prompts, completions, answers):\n    return [undefined] * 2\n")
    prompts = [json.loads(line) for line in (ROOT / "assets" / "data" / "prompts.jsonl").open()][:40]
    prompts[7]["prompt"] = "x" * 3000  # one prompt past the tiny model's 256-token context
    (d / "one_long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    return d


@pytest.mark.parametrize(
    "script, flags, message",
    [
        ("sft", ["--learning-rate", "0"], "--learning-rate must be a positive number, got 0.0"),
        ("dpo", ["--learning-rate", "-1e-5"], "--learning-rate must be a positive number"),
        ("grpo", ["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
        ("dpo", ["--max-length", "0"], "--max-length must be at least 2"),
        ("grpo", ["--is-cap", "1"], "--is-cap must be greater than 1"),
        *(
            [("ppo", ["--vllm"], '--vllm: vLLM is not installed; install it with pip install -e ".[vllm]"')]
            * (not VLLM)
        ),
        ("sft", ["--dataset", "{d}/latin1.jsonl"], "latin1.jsonl:2: not valid UTF-8 (byte b'\\xe9' at column 14)"),
        ("grpo", ["--reward-fn", "broken_syntax:reward"], "cannot import module 'broken_syntax': SyntaxError"),
        ("ppo", ["--reward-fn", "broken_name:reward"], "reward function 'broken_name:reward' raised NameError"),
        ("grpo", ["--max-prompt-length", "3"], "every prompt is longer than --max-prompt-length 3 tokens"),
    ],
)
def test_bad_input_is_one_line_before_compute(bad_inputs, script, flags, message):
    proc = run_with_path(script, *[f.format(d=bad_inputs) for f in flags], pythonpath=bad_inputs)
    assert message in last_line(proc)
    assert "step 0:" not in proc.stdout + proc.stderr  # stopped before the step-0 evaluation


def test_an_over_long_prompt_is_dropped_and_counted(bad_inputs, tmp_path):
    proc = run_script(
        "grpo.py", "--dataset", bad_inputs / "one_long.jsonl", "--max-steps", "1", "--prompts-per-step", "4",
        "--group-size", "2", "--eval-prompts", "", "--output-dir", tmp_path,
    )  # fmt: skip
    assert "one_long.jsonl: dropped 1 of 40 prompts longer than --max-prompt-length 248 tokens" in proc.stdout


@pytest.mark.parametrize(
    "script, flags, bound",
    [
        ("sft", [], "240 tokens (the model's context minus --eval-max-new-tokens)"),
        ("lora", [], "240 tokens (the model's context minus --eval-max-new-tokens)"),
        ("dpo", [], "240 tokens (the model's context minus --eval-max-new-tokens)"),
        (
            "grpo",
            ["--eval-max-new-tokens", "64", "--prompts-per-step", "4", "--group-size", "2"],
            "--max-prompt-length 192 tokens",
        ),
    ],
)
def test_an_over_long_evaluation_prompt_is_dropped_and_counted(bad_inputs, script, flags, bound, tmp_path):
    """Evaluation prompts must fit the model's context (tiny-base: 256) minus the room their answers get
    (--eval-max-new-tokens: 16 in sft, lora and dpo, which have no --max-prompt-length; grpo's default budget is
    taken against its evaluation's own answer length); a longer one is dropped and counted, the rest evaluated."""
    proc = run_script(
        f"{script}.py", "--eval-prompts", bad_inputs / "one_long.jsonl", "--max-steps", "1", "--batch-size", "8",
        *flags, "--output-dir", tmp_path, "--run-name", "run",
    )  # fmt: skip
    assert f"--eval-prompts: dropped 1 of 40 prompts longer than {bound}" in proc.stdout
    assert "eval/accuracy" in read_metrics(tmp_path / "run")[-1]
