"""The scripts under torchrun (2 processes, gloo on CPU, FSDP2) against one process on the same global batch, for
what tests/test_invariance.py's (script x guarantee) table does not run: mixed precision, grpo with the reference in
the loss, dpo's precomputed reference, opd's full objective, QLoRA with --merge, a 2-process resume.

N processes must take exactly the step one process takes: same parameters after 2 steps (max abs diff <= 1e-5 in
fp32) and the same logged losses. Also: the 2-process checkpoint loads with plain transformers, `--resume` with 2
processes continues the same curve, and resuming with another process count is refused with a clear message.
"""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_script, stop_at
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")


def run_torchrun(*args, nproc=2, check=True, timeout=900):
    """`torchrun --standalone --nproc_per_node=2 <script> ...` from the repository root, as a user runs it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


def max_param_diff(dir_a, dir_b) -> float:
    a, b = load_file(dir_a / "model.safetensors"), load_file(dir_b / "model.safetensors")
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_same_run(one, two, keys):
    """Same parameters (<= 1e-5) and the same logged values of `keys` at every step."""
    assert max_param_diff(one / "final", two / "final") <= 1e-5
    m1, m2 = metrics(one), metrics(two)
    assert [r["step"] for r in m1] == [r["step"] for r in m2]
    for r1, r2 in zip(m1, m2):
        for k in keys:
            if k in r1:
                assert r2[k] == pytest.approx(r1[k], rel=1e-5, abs=1e-6), (r1["step"], k)
    return m1, m2


@pytest.mark.slow  # ~100 s: in the full suite (CI), not the quick loop
def test_mixed_precision_two_processes_take_the_one_process_step(tmp_path):
    """--dtype bfloat16 (fp32 masters, bf16 compute, fp32 reduction) from the bf16 tiny-teacher: one process (FSDP2 on
    a one-process mesh) and two take the same step. Micro-batches of one row, so both runs compute the same bf16
    forward per row (length-sorted micro-batches of several rows would pad differently per process and differ by
    bf16 rounding, ~1e-4); measured: the same losses and fp32 masters within 3e-8 after 2 steps."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join((ROOT / "assets" / "data" / "sft.jsonl").read_text().splitlines()[:256]) + "\n")
    common = ["--model", ROOT / "assets" / "tiny-teacher", "--dtype", "bfloat16", "--dataset", data]
    common += ["--eval-dataset", data, "--eval-prompts", "", "--max-steps", "2", "--batch-size", "8"]
    common += ["--micro-batch-size", "1", "--learning-rate", "1e-3", "--eval-every", "0", "--save-every", "2"]
    common += ["--output-dir", tmp_path]
    run_script("sft.py", *common, "--run-name", "one")
    run_torchrun("sft.py", *common, "--run-name", "two")
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == [0, 1, 2]
    for r1, r2 in zip(m1, m2):
        for key in ("train/loss", "train/grad_norm", "eval/loss"):
            assert (key in r1) == (key in r2)
            if key in r1:
                assert r2[key] == pytest.approx(r1[key], rel=1e-5), (r1["step"], key)
    masters = []
    for name in ("one", "two"):
        dcp_to_torch_save(tmp_path / name / "checkpoints" / "step_2" / "train_state", tmp_path / f"{name}.pt")
        masters.append(torch.load(tmp_path / f"{name}.pt", weights_only=False)["model"])
    assert {v.dtype for v in masters[0].values()} == {torch.float32}
    assert max((masters[0][k] - masters[1][k]).abs().max().item() for k in masters[0]) <= 1e-6
    assert {v.dtype for v in load_file(tmp_path / "two" / "final" / "model.safetensors").values()} == {torch.bfloat16}


def test_sft_two_process_resume_continues_the_same_curve(tmp_path):
    common = ["--max-steps", "4", "--save-every", "2", "--batch-size", "8", "--micro-batch-size", "4"]
    common += ["--learning-rate", "1e-3", "--eval-every", "0", "--eval-prompts", "", "--output-dir", tmp_path]
    run_torchrun("sft.py", *common, "--run-name", "straight")
    straight = tmp_path / "straight"
    step2 = straight / "checkpoints" / "step_2"
    assert {"train_state", "rng_0.pt", "rng_1.pt", "trainer_state.pt", "model.safetensors"} <= {
        p.name for p in step2.iterdir()
    }
    stopped = stop_at(straight, tmp_path / "stopped", step=2)
    # the same checkpoint with one process: refused before any compute, naming both counts
    proc = run_script("sft.py", "--resume", stopped, check=False)
    assert proc.returncode != 0
    assert "written by 2 process(es)" in proc.stderr and "this run has 1" in proc.stderr
    proc = run_torchrun("sft.py", "--resume", stopped)
    assert "resumed at step 2" in proc.stdout + proc.stderr
    a, b = metrics(straight), metrics(stopped)
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4]
    for ra, rb in zip(a[3:], b[3:]):
        assert rb["train/loss"] == pytest.approx(ra["train/loss"], rel=1e-6, abs=1e-7)
        assert rb["train/lr"] == pytest.approx(ra["train/lr"], rel=1e-9)
    assert max_param_diff(straight / "final", stopped / "final") <= 1e-6


def test_dpo_two_processes_take_the_one_process_step(tmp_path):
    common = ["--max-steps", "2", "--batch-size", "8", "--micro-batch-size", "2", "--learning-rate", "1e-4"]
    common += ["--rpo-alpha", "1", "--eval-every", "0", "--eval-prompts", "", "--output-dir", tmp_path]
    run_script("dpo.py", *common, "--run-name", "one")
    run_torchrun("dpo.py", *common, "--precompute-ref", "--run-name", "two")  # (a sharded live one: test_invariance)
    keys = [
        "train/loss",
        "train/nll_chosen",
        "train/rewards_margin",
        "train/grad_norm",
        "eval/loss",
        "eval/rewards_accuracy",
    ]
    _, m2 = assert_same_run(tmp_path / "one", tmp_path / "two", keys)
    assert m2[1]["train/loss"] == pytest.approx(0.6931471805599453, abs=1e-6)  # policy == reference at step 1
    assert "eval/rewards_accuracy" in m2[-1]


def test_grpo_two_processes_take_the_one_process_step(tmp_path):
    # 4 prompts x 4 completions: each process samples 2 whole groups; --generation-batch-size 8 makes the one process
    # sample in the same two seeded calls, so both runs see the same completions
    common = ["--max-steps", "2", "--prompts-per-step", "4", "--group-size", "4", "--micro-batch-size", "4"]
    common += ["--generation-batch-size", "8", "--beta", "0.04", "--learning-rate", "1e-3"]
    common += ["--eval-every", "0", "--output-dir", tmp_path]
    run_script("grpo.py", *common, "--run-name", "one")
    run_torchrun("grpo.py", *common, "--shard-frozen", "--run-name", "two")
    keys = ["train/loss", "train/kl", "train/grad_norm", "rollout/reward_mean", "rollout/completion_len"]
    keys += ["eval/accuracy", "eval/general_accuracy"]
    _, m2 = assert_same_run(tmp_path / "one", tmp_path / "two", keys)
    assert "train/kl" in m2[-1] and "eval/accuracy" in m2[-1]
    assert any(r.get("train/loss", 0) != 0 for r in m2)  # there was a learning signal to compare


def test_indivisible_batch_is_refused_naming_the_flag(tmp_path):
    proc = run_torchrun(
        "sft.py", "--batch-size", "7", "--max-steps", "1", "--output-dir", tmp_path, check=False, timeout=300
    )
    assert proc.returncode != 0
    assert "--batch-size (7) must be divisible by the number of processes (2)" in proc.stderr


@pytest.mark.parametrize("objective", ["full"])  # sampled: tests/test_invariance.py's table
def test_opd_two_processes_take_the_one_process_step(tmp_path, objective):
    common = ["--max-steps", "2", "--prompts-per-step", "8", "--group-size", "2", "--micro-batch-size", "4"]
    common += ["--generation-batch-size", "8", "--objective", objective, "--eval-every", "0", "--eval-prompts", ""]
    common += ["--output-dir", tmp_path]
    run_script("opd.py", *common, "--run-name", "one")
    run_torchrun("opd.py", *common, "--shard-frozen", "--run-name", "two")
    _, m2 = assert_same_run(
        tmp_path / "one", tmp_path / "two", ["train/loss", "train/reverse_kl", "train/overlap_top1"]
    )
    assert m2[-1]["train/loss"] != 0


def test_lora_nf4_two_processes_take_the_one_process_step(tmp_path):
    common = ["--max-steps", "2", "--batch-size", "8", "--micro-batch-size", "2", "--quantize", "nf4", "--merge"]
    common += ["--eval-every", "0", "--eval-prompts", "", "--output-dir", tmp_path]
    run_script("lora.py", *common, "--run-name", "one")
    run_torchrun("lora.py", *common, "--run-name", "two")
    a = load_file(tmp_path / "one" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert max_param_diff(tmp_path / "one" / "merged", tmp_path / "two" / "merged") <= 1e-5
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for r1, r2 in zip(m1, m2):
        for k in ("train/loss", "train/lora_update_ratio", "eval/loss"):
            if k in r1:
                assert r2[k] == pytest.approx(r1[k], rel=1e-5), k
