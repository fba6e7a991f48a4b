"""sft.py through its command line, as a user runs it: end to end, resume, bad input, and the learning test."""

import json
import math
import shutil

import pytest
import torch
from conftest import ROOT, TINY_BASE, run_script
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

FAST = ["--batch-size", "8", "--micro-batch-size", "4", "--eval-prompts", "", "--learning-rate", "1e-3"]


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


def test_end_to_end_and_checkpoint_reloads(tmp_path):
    run_script(
        "sft.py",
        "--max-steps",
        "3",
        "--batch-size",
        "8",
        "--micro-batch-size",
        "4",
        "--eval-every",
        "2",
        "--output-dir",
        tmp_path,
        "--run-name",
        "e2e",
    )
    run = tmp_path / "e2e"
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    # --eval-every 2 over 3 steps: before the first step, at step 2, and after the last step; never at step 1
    for key in ("eval/accuracy", "eval/general_accuracy", "eval/loss"):
        assert [r["step"] for r in rows if key in r] == [0, 2, 3], key
    assert all(0.0 <= r["eval/accuracy"] <= 1.0 for r in rows if "eval/accuracy" in r)
    for key in ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/step_s", "perf/peak_mem_gb"):
        assert key in rows[1]
    assert json.loads((run / "args.json").read_text())["max_steps"] == 3
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tok = AutoTokenizer.from_pretrained(run / "final")
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 12+30?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    assert model(input_ids=ids).logits.shape[-1] == len(tok)
    base = AutoModelForCausalLM.from_pretrained(TINY_BASE)
    assert not torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)  # it trained


def test_non_finite_loss_stops_the_run_and_names_the_step(tmp_path):
    proc = run_script(
        "sft.py",
        "--max-steps",
        "5",
        "--warmup-steps",
        "0",
        "--learning-rate",
        "1e30",
        "--max-grad-norm",
        "1e30",
        "--lr-schedule",
        "constant",
        *FAST[:4],
        "--eval-prompts",
        "",
        "--output-dir",
        tmp_path,
        "--run-name",
        "nan",
        check=False,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: non-finite loss") and "at step 2" in last, proc.stderr[-1500:]
    assert not (tmp_path / "nan" / "final").exists()


def _bad(tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content)
    return p


@pytest.mark.parametrize(
    "case",
    ["indivisible", "missing_file", "malformed", "missing_field", "empty", "unknown_model", "bad_schedule"],
)
def test_bad_input_stops_with_one_clear_line(tmp_path, case):
    flags, expect = {
        "indivisible": (
            ["--batch-size", "8", "--micro-batch-size", "3"],
            "--batch-size 8 is not divisible by --micro-batch-size 3",
        ),
        "missing_file": (["--dataset", tmp_path / "nope.jsonl"], "nope.jsonl: no such file"),
        "malformed": (["--dataset", _bad(tmp_path, "m.jsonl", '{"text": "ok"}\n{"text": \n')], "m.jsonl:2: malformed"),
        "missing_field": (
            ["--dataset", _bad(tmp_path, "f.jsonl", '{"prompt": "a"}\n')],
            "f.jsonl:1: missing field 'completion'",
        ),
        "empty": (["--dataset", _bad(tmp_path, "e.jsonl", "")], "e.jsonl: empty file"),
        "unknown_model": (["--model", "./models/none"], "--model './models/none': no such directory"),
        "bad_schedule": (["--lr-schedule", "exp"], "--lr-schedule 'exp' is not one of"),
    }[case]
    proc = run_script("sft.py", *flags, "--output-dir", tmp_path / "runs", "--max-steps", "2", check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("error:") and expect in lines[-1], proc.stderr[-2000:]
    assert not list((tmp_path / "runs").glob("*/metrics.jsonl"))  # stopped before training started


def test_a_copied_script_names_its_runs_after_its_file(tmp_path):
    """As CleanRL's exp_name: a copy saved as my_sft.py names, logs and resumes its runs as my_sft, not sft."""
    copy = tmp_path / "my_sft.py"
    shutil.copy(ROOT / "sft.py", copy)
    run_script(copy, "--max-steps", "1", *FAST, "--output-dir", tmp_path / "runs")
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("my_sft__1__")
    assert json.loads((run / "args.json").read_text())["script"] == "my_sft"


def test_help_explains_every_flag():
    out = " ".join(run_script("sft.py", "--help").stdout.replace("│", " ").split())  # unwrap tyro's box
    for flag in (
        "--model",
        "--dataset",
        "--batch-size",
        "--micro-batch-size",
        "--max-length",
        "--resume",
        "--gradient-checkpointing",
        "--eval-every",
        "--save-every",
        "--track",
        "--learning-rate",
    ):
        assert flag in out
    assert "gradient accumulation steps" in out


def test_plain_text_records_train(tmp_path):
    data = _bad(tmp_path, "t.jsonl", "".join(json.dumps({"text": f"line {i} of text"}) + "\n" for i in range(16)))
    run_script(
        "sft.py",
        "--dataset",
        data,
        "--eval-dataset",
        data,
        "--max-steps",
        "2",
        *FAST,
        "--output-dir",
        tmp_path,
        "--run-name",
        "text",
    )
    rows = read_metrics(tmp_path / "text")
    assert rows[-1]["eval/loss"] < rows[0]["eval/loss"]


@pytest.mark.slow
def test_default_run_raises_target_accuracy_by_30_points(tmp_path):
    """docs/sft.md's claim: `python sft.py` with no flags, +30 points held-out target accuracy."""
    run_script("sft.py", "--output-dir", tmp_path, "--run-name", "default")
    rows = read_metrics(tmp_path / "default")
    before, after = rows[0], rows[-1]
    assert after["eval/accuracy"] - before["eval/accuracy"] >= 0.30, (before, after)
    print(
        f"target {before['eval/accuracy']:.3f} -> {after['eval/accuracy']:.3f}, "
        f"general {before['eval/general_accuracy']:.3f} -> {after['eval/general_accuracy']:.3f}"
    )


def test_build_pipeline_runs_on_a_small_budget(tmp_path):
    """assets/build.py end to end (tokenizer, data, init model, both pretraining stages through sft.py, on-policy
    preference pairs, the reward model through reward_model.py, the teacher through grpo.py, tiny-tool) on a tiny
    budget."""
    run_script(
        ROOT / "assets" / "build.py",
        "--out",
        tmp_path,
        "--pretrain-steps",
        "3",
        "--pretrain-per-general-skill",
        "50",
        "--pretrain-target",
        "50",
        "--sft-examples",
        "40",
        "--eval-target",
        "10",
        "--eval-per-general-skill",
        "5",
        "--hidden-size",
        "32",
        "--num-layers",
        "1",
        "--eval-every",
        "3",
        "--sloppy-steps",
        "2",
        "--sloppy-examples",
        "40",
        "--sloppy-per-general-skill",
        "10",
        "--pref-prompts",
        "30",
        "--rm-steps",
        "2",
        "--teacher-steps",
        "2",
        "--tool-steps",
        "2",
        "--tool-examples",
        "40",
        "--tool-per-skill",
        "10",
        "--tool-eval",
        "5",
        "--tool-prompts",
        "20",
    )
    assert (tmp_path / "tiny-base" / "model.safetensors").is_file()
    for model in ("tiny-base", "tiny-rm", "tiny-teacher", "tiny-tool"):  # each with its last evaluation
        assert "eval/accuracy" in json.loads((tmp_path / model / "build_eval.json").read_text())
    pairs = [json.loads(line) for line in (tmp_path / "data" / "prefs.jsonl").open()]
    assert pairs and all(
        str(int(p["prompt"][8:-1].split("+")[0]) + int(p["prompt"][8:-1].split("+")[1])) == p["chosen"]
        and p["rejected"].strip() != p["chosen"]
        for p in pairs
    )
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "tiny-rm")
    assert rm.config.num_labels == 1
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-teacher")
    assert teacher.dtype == torch.bfloat16 and (tmp_path / "tiny-teacher" / "tokenizer.json").is_file()
    eval_rows = [json.loads(line) for line in (tmp_path / "data" / "eval.jsonl").open()]
    train_rows = [json.loads(line) for line in (tmp_path / "data" / "sft.jsonl").open()]
    held_out = {r["prompt"] for r in eval_rows}
    assert len(eval_rows) == 25 and not held_out & {r["messages"][0]["content"] for r in train_rows}
    tok = AutoTokenizer.from_pretrained(tmp_path / "tiny-base")
    assert tok.decode(tok("What is 47+38?")["input_ids"]) == "What is 47+38?"


def test_track_logs_to_wandb_offline(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    cmd = [
        sys.executable,
        "sft.py",
        "--max-steps",
        "1",
        *FAST,
        "--eval-dataset",
        "",
        "--track",
        "--output-dir",
        str(tmp_path),
        "--run-name",
        "tracked",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    offline_runs = list((tmp_path / "tracked" / "wandb").glob("offline-run-*"))
    assert offline_runs and list(offline_runs[0].glob("*.wandb"))


def test_bf16_run_trains_and_saves_in_the_checkpoints_dtype(tmp_path):
    """The dtype GPUs use by default (--dtype auto on CUDA: bf16 compute from fp32 masters), exercised on CPU. The
    checkpoint is written in the dtype it came in: tiny-base (fp32 on disk) stays fp32 (the trained masters, not a
    bf16 rounding of them); see tests/test_precision.py for a bf16 checkpoint staying bf16."""
    run_script(
        "sft.py", "--dtype", "bfloat16", "--max-steps", "2", *FAST, "--output-dir", tmp_path, "--run-name", "bf16"
    )
    rows = read_metrics(tmp_path / "bf16")
    assert all(math.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16" / "final")
    assert model.config.dtype in (torch.float32, "float32")
    weights = [p for p in model.parameters() if p.dim() == 2]
    assert any((w.float() != w.to(torch.bfloat16).float()).any() for w in weights)  # not bf16-rounded values


def test_eval_reward_fn_and_its_errors(tmp_path):
    """`--eval-reward-fn` picks the verifier of eval/accuracy: `format` (needs \\boxed{} or ####) scores the tiny
    world's bare answers 0; an unknown name is one line naming the flag, before any compute."""
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join((ROOT / "assets" / "data" / "sft.jsonl").read_text().splitlines()[:64]) + "\n")
    common = ["--dataset", data, "--eval-dataset", "", "--max-steps", "1", "--batch-size", "8", "--eval-every", "0"]
    common += ["--output-dir", tmp_path, "--eval-batch-size", "100"]
    run_script("sft.py", *common, "--run-name", "exact")
    run_script("sft.py", *common, "--run-name", "format", "--eval-reward-fn", "format")
    exact = [json.loads(line) for line in (tmp_path / "exact" / "metrics.jsonl").open()]
    graded = [json.loads(line) for line in (tmp_path / "format" / "metrics.jsonl").open()]
    assert exact[0]["eval/accuracy"] > 0.3 and exact[0]["eval/general_accuracy"] > 0.8
    assert graded[0]["eval/accuracy"] == 0.0 and graded[0]["eval/general_accuracy"] == 0.0
    proc = run_script("sft.py", *common, "--eval-reward-fn", "no_such_fn", check=False)
    assert proc.returncode != 0 and "--eval-reward-fn 'no_such_fn': not a built-in" in proc.stderr


@pytest.mark.parametrize("script", ["sft.py", "lora.py"])
def test_packing_takes_the_unpacked_step(tmp_path, script):
    """--packing through the command line: every step's loss and gradient norm equal the unpacked run's (the same
    examples, the same token-mean loss, attention within each example), in fewer, fuller micro-batches."""
    common = ["--max-steps", "3", "--batch-size", "8", "--micro-batch-size", "4", "--eval-every", "0"]
    common += ["--eval-prompts", "", "--learning-rate", "1e-3", "--max-length", "128", "--output-dir", tmp_path]
    run_script(script, *common, "--run-name", "plain")
    proc = run_script(script, *common, "--packing", "--run-name", "packed")
    assert "up to 2 micro-batches/step" in proc.stdout + proc.stderr
    plain, packed = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "packed")
    assert [r["step"] for r in plain] == [r["step"] for r in packed]
    for a, b in zip(plain[1:], packed[1:]):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-4)
