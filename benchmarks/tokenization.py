"""Tokenization at scale: examples/s and peak RSS of `common.data.load_sft_dataset` on a large chat dataset, first run
(cache miss) and cached run, with the tiny world's tokenizer and with a byte-level BPE tokenizer of 150k entries
built offline (trained here with `tokenizers` on a synthetic corpus, with a ChatML template).

    python benchmarks/tokenization.py --num-examples 100000          # docs/data.md: "Tokenization measured"

Each measurement is a fresh process (`--measure`), run one after another (never two at once): peak RSS is the
process's VmHWM, reset after imports and the tokenizer load; `baseline` is the RSS then, so what the data costs is
`peak - baseline`, to compare with the token ids themselves (4 bytes a token for ids, 4 for labels).
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@dataclass
class Args:
    work_dir: str = "runs/bench_tokenize"
    """where the dataset, the 150k tokenizer and the caches are written"""
    num_examples: int = 100_000
    """chat examples in each tokenizer's dataset (user + assistant turns, ~300 tokens each)"""
    vocab_size: int = 150_000
    """entries of the byte-level BPE tokenizer"""
    num_proc: tuple[int, ...] = (1, 2)
    """--num-proc values measured on the first (uncached) run"""
    measure: str | None = None
    """internal: measure one run in this process: TOKENIZER_DIR:NUM_PROC:DATASET"""


WORDS = None


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_dataset(path: Path, n: int, user_words: int, assistant_words: int) -> None:
    import datasets

    global WORDS
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    WORDS = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(50_000)]
    rows = [
        {
            "messages": [
                {"role": "user", "content": _words(rng, user_words)},
                {"role": "assistant", "content": _words(rng, assistant_words)},
            ]
        }
        for _ in range(n)
    ]
    datasets.disable_progress_bars()
    datasets.Dataset.from_list(rows).to_parquet(str(path))


def make_bpe(path: Path, vocab_size: int) -> None:
    """A byte-level BPE of `vocab_size` entries trained on a synthetic corpus (Zipf-distributed random words), with
    the tiny world's ChatML template and special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tiny = AutoTokenizer.from_pretrained(ROOT / "assets" / "tiny-base")
    rng = random.Random(1)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choice(letters) for _ in range(rng.randint(3, 12))) for _ in range(400_000)]
    cum_weights = list(itertools.accumulate(1 / (k + 1) for k in range(len(vocab))))  # Zipf
    corpus = (" ".join(rng.choices(vocab, cum_weights=cum_weights, k=200)) for _ in range(20_000))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = list(dict.fromkeys(tiny.all_special_tokens))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, **{k: v for k, v in tiny.special_tokens_map.items()})
    fast.chat_template = tiny.chat_template
    fast.save_pretrained(path)


def _rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**10
    raise RuntimeError(field)


def measure(args: Args) -> None:
    import datasets  # noqa: F401 -- imported before the baseline: its import is not the data's memory

    from common.data import load_sft_dataset
    from common.model import load_tokenizer

    tokenizer_dir, num_proc, data = args.measure.split(":")
    tokenizer = load_tokenizer(tokenizer_dir)
    baseline = _rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS: the imports' peak
    t0 = time.time()
    notes = []
    examples = load_sft_dataset(data, tokenizer, 100_000, log=notes.append, num_proc=int(num_proc))
    seconds = time.time() - t0
    peak = _rss_mb("VmHWM")
    tokens = len(examples.tokens["input_ids"][0])
    print(
        json.dumps(
            {
                "tokenizer": Path(tokenizer_dir).name,
                "vocab": len(tokenizer),
                "num_proc": int(num_proc),
                "cached": any("read from the cache" in n for n in notes),
                "examples": len(examples),
                "tokens_per_example": tokens / len(examples),
                "examples_per_s": len(examples) / seconds,
                "seconds": seconds,
                "baseline_rss_mb": baseline,
                "peak_rss_mb": peak,
                "data_rss_mb": peak - baseline,
                "token_ids_mb": 8 * tokens / 2**20,
            }
        )
    )


def main(args: Args) -> None:
    if args.measure:
        return measure(args)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    bpe = work / f"bpe{args.vocab_size // 1000}k"
    if not (bpe / "tokenizer.json").exists():
        t0 = time.time()
        make_bpe(bpe, args.vocab_size)
        print(f"trained {bpe} in {time.time() - t0:.0f} s", file=sys.stderr)
    rows = []
    # ~300 tokens an example with each tokenizer: 45 words of the tiny (character) tokenizer, 100 of the BPE
    for tokenizer_dir, (user_words, assistant_words) in ((ROOT / "assets" / "tiny-base", (15, 30)), (bpe, (33, 67))):
        data = work / f"chat-{tokenizer_dir.name}.parquet"
        if not data.exists():
            make_dataset(data, args.num_examples, user_words, assistant_words)
        for num_proc in args.num_proc:
            shutil.rmtree(work / ".cleanpost-cache", ignore_errors=True)  # a first run
            runs = [num_proc, num_proc]  # then the same command again: the cached run
            for i, n in enumerate(runs):
                out = subprocess.run(
                    [sys.executable, __file__, "--work-dir", str(work), "--measure", f"{tokenizer_dir}:{n}:{data}"],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(json.dumps(row))
                if i == 1 and num_proc != args.num_proc[0]:
                    break
    print("\n| tokenizer | vocab | --num-proc | run | examples/s | tokens/example | data RSS MB | token ids MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        run = "cached" if r["cached"] else "first"
        print(
            f"| {r['tokenizer']} | {r['vocab']:,} | {r['num_proc']} | {run} | {r['examples_per_s']:,.0f} | "
            f"{r['tokens_per_example']:.0f} | {r['data_rss_mb']:.0f} | {r['token_ids_mb']:.0f} |"
        )


if __name__ == "__main__":
    main(tyro.cli(Args))
