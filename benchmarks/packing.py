"""sft.py throughput with and without --packing on examples whose lengths spread 20-500 tokens.

    python benchmarks/packing.py
    python benchmarks/packing.py --runs 3 --steps 8

A random Qwen3-shaped model (H=256, 4 layers, 4 heads x 64, MLP 768, tied) with the tiny world's character-level
tokenizer (so an example's token count is its character count), and 512 chat examples whose assistant answers are
uniform in length so that the whole example takes 20-500 tokens. `sft.py` runs `--steps` steps of 16 examples
(`--micro-batch-size 16`: one padded micro-batch unpacked; rows of `--max-length 512` packed), fp32, CPU, in fresh
processes interleaved (plain, packed, plain, packed, ...). Reported: the median over the steps after the first of
perf/tokens_per_s (non-pad tokens through forward and backward per second) and perf/step_s.
"""

from __future__ import annotations

import importlib.util
import json
import random
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Args:
    steps: int = 6
    """sft.py steps per run (the first is a warm-up)"""
    runs: int = 2
    """fresh processes per variant, interleaved"""


def build(tmp: Path) -> tuple[Path, Path]:
    from qwen3_shape import small_qwen3

    sys.path.insert(0, str(ROOT))
    from common.model import load_tokenizer

    spec = importlib.util.spec_from_file_location("assets_build", ROOT / "assets" / "build.py")
    assets = importlib.util.module_from_spec(spec)
    sys.modules["assets_build"] = assets
    spec.loader.exec_module(assets)
    model_dir = tmp / "model"
    assets.build_tokenizer(model_dir)
    tokenizer = load_tokenizer(str(model_dir))
    small_qwen3(len(tokenizer), tokenizer).save_pretrained(model_dir)
    rng = random.Random(0)
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    text = tokenizer.apply_chat_template(turns, tokenize=False)
    overhead = len(tokenizer(text, add_special_tokens=False)["input_ids"]) - 1  # the template's tokens
    data = tmp / "data.jsonl"
    with data.open("w") as f:
        for _ in range(512):
            answer = "".join(rng.choice("abcdefghij ") for _ in range(rng.randint(20, 500) - overhead))
            f.write(
                json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}]})
            )
            f.write("\n")
    return model_dir, data


def run(model_dir: Path, data: Path, out: Path, name: str, steps: int, packing: bool) -> dict:
    cmd = [sys.executable, "sft.py", "--model", str(model_dir), "--dataset", str(data), "--max-steps", str(steps)]
    cmd += ["--batch-size", "16", "--micro-batch-size", "16", "--max-length", "512", "--eval-every", "0"]
    cmd += ["--eval-prompts", "", "--output-dir", str(out), "--run-name", name] + (["--packing"] if packing else [])
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").open()]
    rows = [r for r in rows if "perf/tokens_per_s" in r][1:]  # after the warm-up step
    return {
        "tokens_per_s": statistics.median(r["perf/tokens_per_s"] for r in rows),
        "step_s": statistics.median(r["perf/step_s"] for r in rows),
        "loss": rows[-1]["train/loss"],
    }


def main(args: Args) -> None:
    results = {"plain": [], "packed": []}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data = build(Path(tmp))
        for i in range(args.runs):
            for name, runs in results.items():
                runs.append(run(model_dir, data, Path(tmp) / "runs", f"{name}{i}", args.steps, name == "packed"))
    print(f"sft.py, 16 examples of 20-500 tokens a step, {args.steps} steps x {args.runs} runs, fp32, CPU")
    print("| variant | tokens/s | step (s) | last loss |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        rate = statistics.median(r["tokens_per_s"] for r in runs)
        step = statistics.median(r["step_s"] for r in runs)
        print(f"| {name} | {rate:.0f} | {step:.2f} | {runs[-1]['loss']:.4f} |")


if __name__ == "__main__":
    main(tyro.cli(Args))
