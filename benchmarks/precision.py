"""What each --dtype mode does to small updates and to gradient accumulation, measured through sft.py.

    python benchmarks/precision.py          # ~3 min on 2 CPU cores

From the bf16 tiny-teacher (a bf16 checkpoint, as real ones are), 3 steps of sft.py at lr 1e-5 (constant, no warmup)
in each mode: the share of weight-matrix entries that moved (fp32 masters where the mode has them, else the stored
weights), and the first step's gradient norm with micro-batches of 16 vs 4 of the same 16 examples.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

ROOT = Path(__file__).resolve().parent.parent
TEACHER = ROOT / "assets" / "tiny-teacher"


def sft(out: Path, name: str, *extra) -> Path:
    data = out / "sft.jsonl"
    if not data.exists():
        data.write_text("\n".join((ROOT / "assets/data/sft.jsonl").read_text().splitlines()[:256]) + "\n")
    cmd = [sys.executable, str(ROOT / "sft.py"), "--model", str(TEACHER), "--dataset", str(data)]
    cmd += ["--eval-dataset", "", "--eval-prompts", "", "--eval-every", "0", "--batch-size", "16"]
    cmd += ["--output-dir", str(out), "--run-name", name, *map(str, extra)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    return out / name


def moved(weights: dict, initial: dict) -> float:
    keys = [k for k in weights if weights[k].dim() == 2 and k in initial]
    changed = sum((weights[k].float() != initial[k].float()).sum().item() for k in keys)
    return changed / sum(weights[k].numel() for k in keys)


def main() -> None:
    initial = load_file(TEACHER / "model.safetensors")
    slow = ["--learning-rate", "1e-5", "--warmup-steps", "0", "--lr-schedule", "constant", "--max-steps", "3"]
    print("| --dtype | weights moved after 3 steps at lr 1e-5 | grad norm, micro 16 | micro 4 | relative difference |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for dtype in ("float32", "bfloat16", "pure-bf16"):
            run = sft(out, dtype, "--dtype", dtype, *slow, "--save-every", "3")
            state = run / "checkpoints" / "step_3"
            if (state / "train_state").is_dir():  # sharded: the fp32 masters
                dcp_to_torch_save(state / "train_state", out / f"{dtype}.pt")
                weights = torch.load(out / f"{dtype}.pt", weights_only=False)["model"]
            else:  # unsharded: the full-precision weights kept for --resume, else the stored ones
                masters = torch.load(state / "trainer_state.pt", weights_only=False).get("master_weights")
                weights = masters or load_file(state / "model.safetensors")
            norms = []
            for micro in (16, 4):
                run = sft(out, f"{dtype}-{micro}", "--dtype", dtype, "--max-steps", "1", "--micro-batch-size", micro)
                row = next(json.loads(line) for line in (run / "metrics.jsonl").open() if "train/loss" in line)
                norms.append(row["train/grad_norm"])
            rel = abs(norms[1] - norms[0]) / norms[0]
            print(f"| `{dtype}` | {moved(weights, initial):.3f} | {norms[0]:.6f} | {norms[1]:.6f} | {rel:.1e} |")


if __name__ == "__main__":
    main()
