"""sft.py, dpo.py and grpo.py against TRL's SFTTrainer, DPOTrainer and GRPOTrainer on the same model, data, batch and
steps, and against this machine's fp32 matmul rate.

    pip install -e ".[bench]"          # TRL, for this benchmark only (measured with trl 1.16.0)
    python benchmarks/vs_trl.py                      # everything (~35 minutes on 2 CPU cores)
    python benchmarks/vs_trl.py --only sft --runs 3
    python benchmarks/vs_trl.py --head-only          # the LM head's forward + backward alone at SFT's step size

The model: a random Qwen3-shaped model (H=256, 4 layers, 4 heads x 64, MLP 768, tied embeddings, V=151,936 rows) with
a byte-level BPE tokenizer of 151,669 entries trained offline (benchmarks/tokenization.py's, with the tiny world's
ChatML template), so the head is as wide as Qwen3's on both sides and grpo's log-probs span the same ids as TRL's.
Data: chat examples of 20-500 tokens (sft), pairs whose prompt + response take 40-500 tokens (dpo), prompts of ~40
tokens (grpo). fp32 on this CPU, batch 8 (sft: 8 examples; dpo: 8 pairs; grpo: 2 prompts x 4 completions of 64 new
tokens, beta 0, one update per rollout, reward = completion length / 10 on both sides).

Every run is a fresh process; variants are interleaved (ours, TRL, ours, TRL, ...), `--runs` each. Reported: the
median over runs of the median step time over the steps after the first, tokens/s (non-padding tokens through the
forward per second, counted the same way on both sides: our perf/tokens_per_s; TRL: the attention mask's sum of each
training batch, or the batch's length when padding-free), and the process's peak RSS. SFT's FLOPs per token are
counted from the shapes (6 x the matmul parameters incl. the head, plus causal attention at this data's lengths),
so tokens/s x FLOPs per token / the measured fp32 matmul rate is the share of the machine's limit each one achieves.

TRL variants: its defaults; for SFT also its best settings on a CPU: `loss_type="chunked_nll"` (its chunked LM-head
loss) and that with `packing=True` (best-fit decreasing, padding-free with position ids, what our `--packing` does).
DPO: `precompute_ref_log_probs=True` on both sides (the reference pass happens before the first step, not timed).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parent.parent
ROWS, VOCAB = 151_936, 151_669  # the model's head rows and the tokenizer's entries, as Qwen3's
BATCH, MAX_LENGTH = 8, 512


@dataclass
class Args:
    work: str = "/tmp/cleanpost-vs-trl"
    """where the model, tokenizer and data are built (reused when present) and runs write"""
    runs: int = 3
    """fresh processes per variant, interleaved"""
    steps: int = 5
    """optimizer steps per run (the first is a warm-up, not in the medians)"""
    only: tuple[str, ...] = ("sft", "dpo", "grpo")
    """which comparisons to run"""
    head_only: bool = False
    """only time our LM head (`chunked_logprobs`) forward + backward on 2,600 rows (an SFT step's tokens here) and
    one plain [2600, 256] x [256, 151936] matmul, best of 3: how much of SFT's step the head is"""
    child: str | None = None
    """internal: run one TRL variant in this process (NAME), writing its step times to --child-out"""
    child_out: str | None = None
    """internal: where a child writes its result (JSON)"""


# ----------------------------------------------------------------------------------------------------------------
# Model, tokenizer and data


def build(work: Path) -> Path:
    """The model directory (tokenizer + random weights) and the three datasets, built once under `work`."""
    model_dir = work / "model"
    if (model_dir / "model.safetensors").exists():
        return model_dir
    from qwen3_shape import small_qwen3
    from transformers import AutoTokenizer

    spec = importlib.util.spec_from_file_location("tokenization_bench", ROOT / "benchmarks" / "tokenization.py")
    tokenization = importlib.util.module_from_spec(spec)
    sys.modules["tokenization_bench"] = tokenization  # (its dataclass looks itself up there)
    spec.loader.exec_module(tokenization)
    print(f"training a byte-level BPE of {VOCAB:,} entries (once, into {model_dir}) ...", flush=True)
    tokenization.make_bpe(model_dir, VOCAB)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert len(tokenizer) <= ROWS, len(tokenizer)
    small_qwen3(ROWS, tokenizer).save_pretrained(model_dir)  # H=256, 4 layers, 4 heads x 64, MLP 768

    rng = random.Random(0)
    words = sorted(w for w in tokenizer.get_vocab() if w.isascii() and w.isalpha() and len(w) > 2)[:20_000]

    def text(tokens: int) -> str:  # about `tokens` tokens of random vocabulary words
        out = []
        while len(tokenizer(" ".join(out), add_special_tokens=False)["input_ids"]) < tokens:
            out.extend(rng.choices(words, k=max(1, (tokens - len(out)) // 2)))
        return " ".join(out)

    def write(name, rows):
        with (work / name).open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    write(
        "sft.jsonl",
        [
            {"messages": [{"role": "user", "content": text(10)}, {"role": "assistant", "content": text(n)}]}
            for n in (rng.randint(20, 500) - 10 for _ in range(256))
        ],
    )
    pairs = []
    for _ in range(64):
        prompt, length = text(rng.randint(20, 100)), rng.randint(20, 250)
        pairs.append(
            {
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": text(length)}],
                "rejected": [{"role": "assistant", "content": text(rng.randint(20, 250))}],
            }
        )
    write("dpo.jsonl", pairs)
    write("grpo.jsonl", [{"prompt": text(40), "answer": ""} for _ in range(64)])
    return model_dir


def sft_flops_per_token(work: Path, model_dir: Path) -> float:
    """Training FLOPs per token of sft at this data, from the model's config: 6 x (matmul parameters of the layers +
    the head), plus causal attention (QK^T and AV: 4 x heads x head_dim x the mean context per token, x 3 for
    forward and backward)."""
    from transformers import AutoConfig, AutoTokenizer

    c = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rendered = [
        tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False)
        for line in (work / "sft.jsonl").open()
    ]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in rendered]
    lengths = [min(n, MAX_LENGTH) for n in lengths]
    attention_width = c.num_attention_heads * c.head_dim
    kv_width = c.num_key_value_heads * c.head_dim
    per_layer = c.hidden_size * (2 * attention_width + 2 * kv_width) + 3 * c.hidden_size * c.intermediate_size
    dense = 6 * (c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size)  # q, o, k, v; gate, up, down; head
    mean_context = sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)
    return dense + 3 * c.num_hidden_layers * 4 * attention_width * mean_context


def head_seconds(hidden_size: int, rows: int = 2600) -> tuple[float, float]:
    """(chunked_logprobs forward + backward, one plain head matmul) in seconds at this benchmark's head (ROWS x
    `hidden_size`), best of 3."""
    import torch

    sys.path.insert(0, str(ROOT))
    from common.logprobs import chunked_logprobs

    torch.manual_seed(0)
    hidden = torch.randn(rows, hidden_size, requires_grad=True)
    weight = (torch.randn(ROWS, hidden_size) * 0.02).requires_grad_()
    targets = torch.randint(0, ROWS, (rows,))

    def head():
        hidden.grad = weight.grad = None
        t0 = time.perf_counter()
        chunked_logprobs(hidden, weight, targets).sum().backward()
        return time.perf_counter() - t0

    def matmul():
        t0 = time.perf_counter()
        with torch.no_grad():
            hidden @ weight.T
        return time.perf_counter() - t0

    head(), matmul()  # warm-up
    return min(head() for _ in range(3)), min(matmul() for _ in range(3))


def matmul_rate(m: int = 2048, k: int = 2048, n: int = 2048) -> float:
    """This machine's fp32 matmul rate (FLOP/s) with torch's default threads: the best of 8 [m, k] x [k, n]
    products. The limit is 2048^3; the LM head's tiles here are [~2,400 tokens, 256] x [256, 2,048 entries]."""
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    best = float("inf")
    for _ in range(8):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best


# ----------------------------------------------------------------------------------------------------------------
# Running one variant in a fresh process


def run_process(cmd: list[str]) -> int:
    """Run `cmd` from the repository root; returns its peak RSS in bytes (os.wait4's rusage of that child)."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{log.read().decode()[-4000:]}")
    return usage.ru_maxrss * 1024


def ours(script: str, work: Path, model_dir: Path, steps: int, extra: list[str]) -> dict:
    out = Path(tempfile.mkdtemp(dir=work))
    common = ["--model", model_dir, "--dtype", "float32", "--max-steps", steps, "--eval-every", 0]
    common += ["--eval-prompts", "", "--output-dir", out, "--run-name", "run", "--learning-rate", "1e-6"]
    data = {
        "sft": ["--dataset", work / "sft.jsonl", "--eval-dataset", "", "--max-length", MAX_LENGTH],
        "dpo": ["--dataset", work / "dpo.jsonl", "--eval-dataset", "", "--max-length", MAX_LENGTH],
        "grpo": ["--dataset", work / "grpo.jsonl", "--kl-every", 0, "--reward-fn", "tests.cli_rewards:length"],
    }[script]
    batch = {
        "sft": ["--batch-size", BATCH, "--micro-batch-size", BATCH],
        "dpo": ["--batch-size", BATCH, "--micro-batch-size", BATCH],
        "grpo": ["--prompts-per-step", 2, "--group-size", 4, "--max-new-tokens", 64, "--micro-batch-size", BATCH],
    }[script]
    rss = run_process([sys.executable, f"{script}.py", *map(str, common + data + batch + extra)])
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").open()]
    rows = [r for r in rows if "perf/step_s" in r][1:]
    tokens = [r["perf/tokens_per_s"] for r in rows if "perf/tokens_per_s" in r]
    lengths = [r["rollout/completion_len"] for r in rows if "rollout/completion_len" in r]
    return {
        "step_s": statistics.median(r["perf/step_s"] for r in rows),
        "tokens_per_s": statistics.median(tokens) if tokens else None,
        "completion_len": statistics.mean(lengths) if lengths else None,
        "rss": rss,
    }


def trl(name: str, work: Path, steps: int) -> dict:
    out = Path(tempfile.mkdtemp(dir=work)) / "result.json"
    cmd = [sys.executable, __file__, "--work", work, "--steps", steps, "--child", name, "--child-out", out]
    rss = run_process(list(map(str, cmd)))
    result = json.loads(out.read_text())
    return {**result, "rss": rss}


def trl_child(name: str, work: Path, steps: int, out: Path) -> None:
    """One TRL run in this process; writes the median step time and tokens/s after the first step."""
    import datasets
    import torch
    from transformers import AutoTokenizer, TrainerCallback

    datasets.disable_progress_bars()
    model_dir = work / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    common = {
        "output_dir": str(work / f"trl-{name}"),
        "per_device_train_batch_size": BATCH,
        "max_steps": steps,
        "learning_rate": 1e-6,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "bf16": False,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
        "model_init_kwargs": {"dtype": torch.float32},
    }
    if name.startswith("sft"):
        from trl import SFTConfig, SFTTrainer

        config = SFTConfig(
            **common,
            max_length=MAX_LENGTH,
            assistant_only_loss=True,
            loss_type="chunked_nll" if "chunked" in name else "nll",
            packing="packing" in name,
        )
        data = datasets.load_dataset("json", data_files=str(work / "sft.jsonl"), split="train")
        trainer = SFTTrainer(model=str(model_dir), args=config, train_dataset=data, processing_class=tokenizer)
    elif name.startswith("dpo"):
        from trl import DPOConfig, DPOTrainer

        config = DPOConfig(
            **common, max_length=MAX_LENGTH, precompute_ref_log_probs=True, precompute_ref_batch_size=BATCH, beta=0.1
        )
        data = datasets.load_dataset("json", data_files=str(work / "dpo.jsonl"), split="train")
        trainer = DPOTrainer(model=str(model_dir), args=config, train_dataset=data, processing_class=tokenizer)
    else:
        from trl import GRPOConfig, GRPOTrainer

        def length_reward(completions, **kwargs):  # tests.cli_rewards:length, on TRL's conversational completions
            return [len(c[0]["content"] if isinstance(c, list) else c) / 10 for c in completions]

        config = GRPOConfig(
            **common,
            num_generations=4,
            generation_batch_size=BATCH,
            max_completion_length=64,
            temperature=1.0,
            beta=0.0,
            num_iterations=1,
        )
        rows = [json.loads(line) for line in (work / "grpo.jsonl").open()]
        data = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows])
        trainer = GRPOTrainer(
            model=str(model_dir),
            reward_funcs=length_reward,
            args=config,
            train_dataset=data,
            processing_class=tokenizer,
        )

    times, tokens = [], [0]
    original_training_step = trainer.training_step

    def counting_training_step(model, inputs, *args, **kwargs):  # non-padding tokens of each training batch
        if "attention_mask" in inputs:
            tokens[-1] += int(inputs["attention_mask"].sum())
        elif "input_ids" in inputs:
            tokens[-1] += inputs["input_ids"].numel()  # padding-free: one flat row
        return original_training_step(model, inputs, *args, **kwargs)

    trainer.training_step = counting_training_step

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - self.t0)
            tokens.append(0)

    trainer.add_callback(StepTimer())
    trainer.train()
    step_s = statistics.median(times[1:])
    per_step = tokens[:-1]
    tokens_per_s = statistics.median(n / t for n, t in zip(per_step[1:], times[1:])) if any(per_step) else None
    lengths = [r["completions/mean_length"] for r in trainer.state.log_history if "completions/mean_length" in r]
    completion_len = statistics.mean(lengths[1:]) if len(lengths) > 1 else None
    out.write_text(json.dumps({"step_s": step_s, "tokens_per_s": tokens_per_s, "completion_len": completion_len}))


# ----------------------------------------------------------------------------------------------------------------


VARIANTS = {  # comparison -> [(label, how to run it)]
    "sft": [
        ("sft.py", ("ours", "sft", [])),
        ("sft.py --packing", ("ours", "sft", ["--packing"])),
        ("TRL SFTTrainer (defaults)", ("trl", "sft")),
        ('TRL SFTTrainer loss_type="chunked_nll"', ("trl", "sft-chunked")),
        ("TRL SFTTrainer chunked_nll + packing", ("trl", "sft-chunked-packing")),
    ],
    "dpo": [
        ("dpo.py --precompute-ref", ("ours", "dpo", ["--precompute-ref"])),
        ("TRL DPOTrainer precompute_ref_log_probs=True", ("trl", "dpo")),
    ],
    "grpo": [
        ("grpo.py", ("ours", "grpo", [])),
        ("TRL GRPOTrainer", ("trl", "grpo")),
    ],
}


def main(args: Args) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.child:
        trl_child(args.child, work, args.steps, Path(args.child_out))
        return
    import torch
    import transformers

    model_dir = build(work)
    hidden_size = transformers.AutoConfig.from_pretrained(model_dir).hidden_size
    if args.head_only:
        head, matmul = head_seconds(hidden_size)
        print(f"LM head forward + backward on 2,600 rows: {head:.2f} s; one plain head matmul: {matmul:.2f} s")
        return
    import trl as trl_package

    rate, head_tile_rate = matmul_rate(), matmul_rate(2400, hidden_size, 2048)
    flops = sft_flops_per_token(work, model_dir)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, TRL {trl_package.__version__}; "
        f"{torch.get_num_threads()} threads; fp32 matmul rate {rate / 1e9:.1f} GFLOP/s (2048^3), "
        f"{head_tile_rate / 1e9:.1f} GFLOP/s at the head's tile shape (2400 x {hidden_size} x 2048); "
        f"sft FLOPs/token {flops / 1e6:.1f} M\n",
        flush=True,
    )
    for comparison in args.only:
        results = {label: [] for label, _ in VARIANTS[comparison]}
        for _ in range(args.runs):
            for label, how in VARIANTS[comparison]:
                kind, *rest = how
                if kind == "ours":
                    results[label].append(ours(rest[0], work, model_dir, args.steps, rest[1]))
                else:
                    results[label].append(trl(rest[0], work, args.steps))
                print(f"  {comparison}: {label}: {results[label][-1]}", flush=True)
        extra = {"sft": " matmul share |", "grpo": " completion tokens |"}.get(comparison, "")
        print(f"\n| {comparison} | step time | tokens/s | peak RSS |{extra}")
        print("|---|---|---|---|" + ("---|" if extra else ""))
        for label, runs in results.items():
            step_s = statistics.median(r["step_s"] for r in runs)
            tps = [r["tokens_per_s"] for r in runs if r["tokens_per_s"]]
            tokens_per_s = statistics.median(tps) if tps else None
            rss = statistics.median(r["rss"] for r in runs)
            row = f"| {label} | {step_s:.2f} s | {f'{tokens_per_s:,.0f}' if tokens_per_s else '-'} | {rss / 2**30:.2f} GB |"
            if comparison == "sft":
                row += f" {tokens_per_s * flops / rate:.0%} |" if tokens_per_s else " - |"
            if comparison == "grpo":  # (a random model: every completion runs to the 64-token limit on both sides)
                lengths = [r["completion_len"] for r in runs if r.get("completion_len")]
                row += f" {statistics.mean(lengths):.1f} |" if lengths else " - |"
            print(row)
        print(flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
