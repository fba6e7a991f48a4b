import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never download; an unknown id fails at once
os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(ROOT))
TINY_BASE = ROOT / "assets" / "tiny-base"


def load_build_module():
    spec = importlib.util.spec_from_file_location("assets_build", ROOT / "assets" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["assets_build"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def chat_tokenizer(tmp_path_factory):
    """The tiny world's character-level ChatML tokenizer, built fresh (independent of the shipped weights)."""
    from common.model import load_tokenizer

    path = tmp_path_factory.mktemp("tok")
    load_build_module().build_tokenizer(path)
    return load_tokenizer(str(path))


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory):
    """A randomly initialized tiny Llama with the tiny-world tokenizer, saved in HF format."""
    from common.model import load_tokenizer

    build = load_build_module()
    path = tmp_path_factory.mktemp("random_model")
    tok = build.build_tokenizer(path)
    build.build_init_model(path, load_tokenizer(str(path)), build.Args(hidden_size=32, num_layers=2))
    del tok
    return path


def run_script(*args, check=True, timeout=900):
    """Run a script from the repository root as a user would; returns the CompletedProcess."""
    proc = subprocess.run(
        [sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def read_metrics(run_dir) -> list[dict]:
    import json

    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").open()]


def stop_at(straight: Path, stopped: Path, step: int, logged: int | None = None) -> Path:
    """What a run killed after logging step `logged` (default `step`) leaves on disk, made from a finished run
    `straight` that saved `checkpoints/step_{step}`: its args.json, that checkpoint (and none after it) and its
    metrics up to step `logged` — `--resume stopped` must then continue exactly as `straight` went on."""
    import shutil

    (stopped / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "args.json", stopped / "args.json")
    shutil.copytree(straight / "checkpoints" / f"step_{step}", stopped / "checkpoints" / f"step_{step}")
    rows = [r for r in read_metrics(straight) if r["step"] <= (step if logged is None else logged)]
    import json

    (stopped / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return stopped


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------------------------------------------
# The realistic-model tier: a small random model of Qwen3's architecture (tied embeddings, embedding rows padded past
# the tokenizer as the real checkpoints are, stored in bf16) with a byte-level BPE tokenizer carrying Qwen3's
# published chat template (tests/fixtures/qwen3_chat_template.jinja: <think> handling, history rewriting) and
# Qwen3's published generation defaults. Built offline, once per session.

QWEN3_TEMPLATE = ROOT / "tests" / "fixtures" / "qwen3_chat_template.jinja"


def _reasoning(a: int, b: int) -> str:
    return f"<think>\n{a}+{b}: units {a % 10}+{b % 10}, tens {a // 10}+{b // 10}.\n</think>\n\n{a + b}"


def realistic_records(n: int = 48) -> dict[str, list[dict]]:
    """Messages with reasoning in assistant turns (single and multi-turn), preference pairs and prompts."""
    import random

    rng = random.Random(0)
    sft, prefs, prompts = [], [], []
    for i in range(n):
        a, b, c, d = (rng.randint(10, 49) for _ in range(4))
        turns = [{"role": "user", "content": f"What is {a}+{b}?"}, {"role": "assistant", "content": _reasoning(a, b)}]
        if i % 2:  # two turns: the template drops the first turn's reasoning from the history
            turns += [{"role": "user", "content": f"And {c}+{d}?"}, {"role": "assistant", "content": _reasoning(c, d)}]
        if i % 5 == 0:
            turns.insert(0, {"role": "system", "content": "You add numbers."})
        sft.append({"messages": turns})
        prefs.append(
            {"prompt": f"What is {a}+{b}?", "chosen": _reasoning(a, b), "rejected": _reasoning(a, b)[:-2] + "00"}
        )
        prompts.append({"prompt": f"What is {a}+{b}?", "answer": str(a + b), "skill": "arithmetic"})
    return {"sft": sft, "prefs": prefs, "prompts": prompts}


def build_qwen3_like(path: Path) -> Path:
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    template = QWEN3_TEMPLATE.read_text()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    corpus = [json.dumps(r) for rs in realistic_records(200).values() for r in rs]
    corpus += ["system user assistant You add numbers. And What is units tens"] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=template
    )
    tokenizer.add_tokens(["<think>", "</think>"])  # Qwen3: added tokens, not special (they stay in decoded text)
    tokenizer.save_pretrained(path)
    vocab = len(tokenizer)
    config = Qwen3Config(
        vocab_size=vocab + 16,  # padded embedding rows, as Qwen3's 151,936 rows for 151,669 tokens
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)  # the published checkpoints are bf16
    model.generation_config = GenerationConfig(  # Qwen3's published sampling defaults
        do_sample=True,
        temperature=0.6,
        top_k=20,
        top_p=0.95,
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id],
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory):
    return build_qwen3_like(tmp_path_factory.mktemp("qwen3-like"))
