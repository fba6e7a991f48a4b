"""Mixed precision through the real command line, on a CPU (`--dtype bfloat16` takes the GPU's `auto` path):
fp32 master weights and AdamW state, bf16 compute, fp32 gradient accumulation; pure bf16 only by `--dtype pure-bf16`.

The contrast is the point: at lr 1e-5 an Adam update (~lr a step) is far below half a bf16 ulp of a weight of
magnitude ~0.05 (~1e-4), so in pure bf16 almost every update rounds away, while fp32 master weights keep them.
"""

import json

import pytest
import torch
from conftest import ROOT, run_script, stop_at
from safetensors.torch import load_file

TEACHER = ROOT / "assets" / "tiny-teacher"  # stored in bf16: the "real checkpoint" case


@pytest.fixture(scope="module")
def small_sft(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    lines = (ROOT / "assets" / "data" / "sft.jsonl").read_text().splitlines()[:256]
    path.write_text("\n".join(lines) + "\n")
    return path


def sft(tmp_path, data, name, *extra):
    args = ["--dataset", data, "--eval-dataset", "", "--eval-prompts", "", "--eval-every", "0"]
    args += ["--batch-size", "16", "--output-dir", tmp_path, "--run-name", name, *extra]
    return run_script("sft.py", *args)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


def changed_fraction(final, initial) -> float:
    a, b = load_file(final), load_file(initial)
    matrices = [k for k in a if a[k].dim() == 2]
    return sum((a[k].float() != b[k].float()).sum().item() for k in matrices) / sum(a[k].numel() for k in matrices)


def test_mixed_precision_keeps_small_updates_that_pure_bf16_loses(tmp_path, small_sft):
    slow = ["--learning-rate", "1e-5", "--warmup-steps", "0", "--lr-schedule", "constant", "--max-steps", "3"]
    sft(tmp_path, small_sft, "mixed", "--model", TEACHER, "--dtype", "bfloat16", *slow, "--save-every", "3")
    sft(tmp_path, small_sft, "pure", "--model", TEACHER, "--dtype", "pure-bf16", *slow)
    initial = TEACHER / "model.safetensors"
    # the final checkpoint is bf16 like the one it came from; the masters kept their updates until that rounding
    final = load_file(tmp_path / "mixed" / "final" / "model.safetensors")
    assert {v.dtype for v in final.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "mixed" / "final" / "config.json").read_text())["dtype"] == "bfloat16"
    pure = changed_fraction(tmp_path / "pure" / "final" / "model.safetensors", initial)
    assert pure < 0.2, pure  # most updates vanished
    # the fp32 master weights in the resume state: (nearly) every entry moved, and AdamW's state is fp32
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(tmp_path / "mixed" / "checkpoints" / "step_3" / "train_state", tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    base = load_file(initial)
    weights = {k: v for k, v in state["model"].items() if v.dim() == 2 and k in base}  # tied lm_head: embedding
    assert {v.dtype for v in weights.values()} == {torch.float32}
    moved = sum((v != base[k].float()).sum().item() for k, v in weights.items()) / sum(
        v.numel() for v in weights.values()
    )
    assert moved > 0.95, moved
    moments = [v for k, v in state["optimizer"]["state"].items() if "exp_avg" in k] or [
        t for s in state["optimizer"]["state"].values() for name, t in s.items() if name.startswith("exp_avg")
    ]
    assert moments and {t.dtype for t in moments} == {torch.float32}


def test_mixed_precision_gradient_does_not_depend_on_micro_batch_size(tmp_path, small_sft):
    """The first step's gradient (same weights, same examples) from one micro-batch of 16 or four of 4: with fp32
    accumulation the norms agree to bf16 compute noise (measured 9e-5: differently padded micro-batches); a
    per-micro-batch normalizer would be off by a factor, fp32 accumulation dropped by far more than 1e-3."""
    grad_norms = {}
    for micro in (16, 4):
        name = f"micro-{micro}"
        sft(tmp_path, small_sft, name, "--dtype", "bfloat16", "--max-steps", "1", "--micro-batch-size", str(micro))
        (row,) = [r for r in metrics(tmp_path / name) if "train/loss" in r]
        grad_norms[micro] = row["train/grad_norm"]
    assert grad_norms[4] == pytest.approx(grad_norms[16], rel=1e-3)
    assert grad_norms[4] != grad_norms[16]  # bf16 compute did run (fp32 would agree exactly)


def masters(checkpoint, tmp_path):
    """The fp32 master weights in a checkpoint's sharded train state, as one plain dict."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / (checkpoint.parent.parent.name + checkpoint.name + ".pt")
    dcp_to_torch_save(checkpoint / "train_state", out)
    return torch.load(out, weights_only=False)["model"]


@pytest.mark.slow  # ~40 s: in the full suite (CI), not the quick loop
def test_mixed_precision_resume_continues_from_the_fp32_masters(tmp_path, small_sft):
    common = ["--model", TEACHER, "--dtype", "bfloat16", "--max-steps", "4", "--learning-rate", "1e-4"]
    common += ["--save-every", "2", "--micro-batch-size", "8"]
    sft(tmp_path, small_sft, "straight", *common)
    straight = tmp_path / "straight"
    stopped = stop_at(straight, tmp_path / "stopped", step=2)
    proc = run_script("sft.py", "--resume", stopped)
    assert "resumed at step 2" in proc.stdout + proc.stderr
    for a, b in zip(metrics(straight)[3:], metrics(stopped)[3:]):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-6)
    a = masters(straight / "checkpoints" / "step_4", tmp_path)
    b = masters(stopped / "checkpoints" / "step_4", tmp_path)
    # continuing from the bf16 rounding of the step-2 masters instead would be off by ~1e-3 of a weight
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-7
