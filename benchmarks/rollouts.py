"""Rollout throughput: transformers' generate (the HF path, with and without the shared prefill) vs a vLLM engine.

    python benchmarks/rollouts.py                                   # HF only
    python benchmarks/rollouts.py --vllm-python .venv-vllm/bin/python   # + vLLM from its own environment

One fixed workload: 128 tiny-world prompts x 8 samples, up to 64 new tokens, temperature 1, on one CPU thread, from
a random Llama of tiny-base's tokenizer with hidden size 256, 4 layers, 4 heads of 64 (vLLM's CPU attention needs a
head size of 64; tiny-base's is 40). Each engine runs in a fresh process (interleaved, `--repeats` times): load, a
warm-up call on 8 prompts, then one timed call over the whole workload (the HF path: one `generate` call of all 1,024
rows, as grpo.py's default `--generation-batch-size`). Reported: sampled tokens / wall second, the process's peak
RSS, and for vLLM the median cost of pushing the weights (`VLLMEngine.push`, as after every optimizer step) over 3
pushes. The random model's completions end at EOS at random, so the engines' token counts differ slightly; the rate
is per sampled token.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parent.parent
PROMPTS, SAMPLES, MAX_NEW_TOKENS = 128, 8, 64


@dataclass
class Args:
    vllm_python: str | None = None
    """python of an environment with vLLM (e.g. .venv-vllm/bin/python); without it only the HF path runs"""
    repeats: int = 2
    """fresh processes per engine, interleaved"""
    worker: str | None = None
    """internal: run one engine ("hf", "hf-unshared", "vllm") in this process on --model-dir"""
    model_dir: str | None = None
    """internal: the model the workers load"""


def build_model(path: Path) -> None:
    import importlib.util

    sys.path.insert(0, str(ROOT))
    from common.model import load_tokenizer

    spec = importlib.util.spec_from_file_location("assets_build", ROOT / "assets" / "build.py")
    build = importlib.util.module_from_spec(spec)
    sys.modules["assets_build"] = build
    spec.loader.exec_module(build)
    build.build_tokenizer(path)
    build.build_init_model(path, load_tokenizer(str(path)), build.Args(hidden_size=256, num_layers=4))


def worker(engine: str, model_dir: str) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from common.generation import generate
    from common.model import load_model, load_tokenizer

    torch.set_num_threads(1)
    prompts = [json.loads(line)["prompt"] for line in (ROOT / "assets/data/prompts.jsonl").open()][:PROMPTS]
    policy = load_model(model_dir, dtype="float32", device="cpu").eval()
    tokenizer = load_tokenizer(model_dir)
    kw = {"n": SAMPLES, "max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.0, "seed": 0}
    push_s = None
    if engine == "vllm":
        from common.vllm_engine import VLLMEngine

        llm = VLLMEngine(model_dir, policy, tokenizer, seed=0)
        sample = llm.generate
        pushes = []
        for _ in range(3):
            t0 = time.perf_counter()
            llm.push(policy)
            pushes.append(time.perf_counter() - t0)
        push_s = statistics.median(pushes)
    else:

        def sample(tok, ps, **k):
            return generate(policy, tok, ps, batch_size=len(ps) * SAMPLES, share_prefill=engine == "hf", **k)

    sample(tokenizer, prompts[:8], **kw)  # warm-up
    t0 = time.perf_counter()
    out = sample(tokenizer, prompts, **kw)
    seconds = time.perf_counter() - t0
    tokens = int(out["completion_mask"].sum())
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return {"engine": engine, "tokens": tokens, "seconds": seconds, "peak_rss_gb": peak_gb, "push_s": push_s}


def main(args: Args) -> None:
    if args.worker:
        print(json.dumps(worker(args.worker, args.model_dir)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    engines = [("hf", sys.executable), ("hf-unshared", sys.executable)]
    if args.vllm_python:
        engines.append(("vllm", args.vllm_python))
    results: dict[str, list[dict]] = {name: [] for name, _ in engines}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        build_model(model_dir)
        for _ in range(args.repeats):
            for name, python in engines:
                cmd = [python, __file__, "--worker", name, "--model-dir", str(model_dir)]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, check=False)
                if done.returncode:
                    sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
                results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{PROMPTS} prompts x {SAMPLES} samples, <= {MAX_NEW_TOKENS} new tokens, 1 thread, {args.repeats} runs each")
    print("| engine | sampled tokens | tokens/s (median) | peak RSS (GB) | weight push (s) |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        rate = statistics.median(r["tokens"] / r["seconds"] for r in runs)
        push = statistics.median(r["push_s"] for r in runs) if runs[0]["push_s"] is not None else None
        print(
            f"| {name} | {runs[0]['tokens']} | {rate:.0f} | {max(r['peak_rss_gb'] for r in runs):.2f} | "
            + (f"{push:.3f} |" if push is not None else "- |")
        )


if __name__ == "__main__":
    main(tyro.cli(Args))
