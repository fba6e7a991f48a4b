"""Rebuild the tiny world in assets/ from a seed, with the project's own scripts.

    python assets/build.py              # ~9 minutes on 2 CPU cores (see README: "The tiny world")
    python assets/build.py --data-only  # assets/data/ alone, in seconds

Writes
  assets/tiny-base/            a Llama-architecture chat model (~1.3M parameters, character-level tokenizer with a
                               ChatML template) pretrained by sft.py on the chat-formatted mix of all skills, with
                               little of the target skill, so that it follows the format, is strong on the general
                               skills and weak-to-moderate on the target skill
  assets/data/eval.jsonl       held-out {prompt, answer, skill}: 200 target-skill + 100 per general skill
  assets/data/sft.jsonl        target-skill conversations for sft.py (prompts never in eval.jsonl)
  assets/data/sft_eval.jsonl   the held-out target-skill items as conversations (eval/loss)
  assets/data/prompts.jsonl    {prompt, answer, skill} target-skill prompts for RL (grpo.py), none held out
Later scripts' assets (preferences, prompts, teacher, reward model) are added here by their issues.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.tinyworld import (
    GENERAL_SKILLS,
    SKILLS,
    TARGET_SKILL,
    as_conversation,
    make_samples,
    make_tasks,
    needs_carry,
)

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>"]


@dataclass
class Args:
    seed: int = 1
    """seed of every generated item and of the pretraining run"""
    out: str = str(ROOT / "assets")
    """where tiny-base/ and data/ are written"""
    hidden_size: int = 160
    """model width"""
    num_layers: int = 4
    """transformer blocks"""
    pretrain_steps: int = 3000
    """sft.py optimizer steps of pretraining"""
    pretrain_per_general_skill: int = 30000
    """pretraining conversations per general skill"""
    pretrain_target: int = 16000
    """pretraining conversations of the target skill"""
    pretrain_carry_frac: float = 0.05
    """share of those that need a carry (the rest do not, so tiny-base stays weak on the uniform eval)"""
    sft_examples: int = 20000
    """target-skill conversations in sft.jsonl"""
    eval_target: int = 200
    """held-out target-skill prompts"""
    eval_per_general_skill: int = 100
    """held-out prompts per general skill"""
    learning_rate: float = 3e-3
    """pretraining peak learning rate"""
    eval_every: int = 250
    """evaluate the pretraining run every N steps"""
    rl_prompts: int = 4000
    """distinct target-skill prompts in prompts.jsonl (RL)"""
    data_only: bool = False
    """write assets/data/ only (deterministic), keep the models"""


def build_tokenizer(path: Path):
    """A character-level tokenizer over printable ASCII and newline, with ChatML special tokens."""
    import string

    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|unk|>"))  # no merges: one token a character
    core.add_special_tokens(SPECIAL_TOKENS)
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|unk|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
    )
    tokenizer.save_pretrained(path)
    return tokenizer


def build_init_model(path: Path, tokenizer, args: Args) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.hidden_size * 14 // 5,
        num_hidden_layers=args.num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    print(f"init model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)


def write_jsonl(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def main(args: Args) -> None:
    out = Path(args.out)
    data = out / "data"
    # Held-out items first: nothing trained on may share their prompts.
    eval_tasks = make_tasks(TARGET_SKILL, args.eval_target, seed=args.seed)
    for skill in GENERAL_SKILLS:
        eval_tasks += make_tasks(skill, args.eval_per_general_skill, seed=args.seed)
    held_out = {t["prompt"] for t in eval_tasks}
    write_jsonl(data / "eval.jsonl", eval_tasks)
    write_jsonl(data / "sft_eval.jsonl", [as_conversation(t) for t in eval_tasks if t["skill"] == TARGET_SKILL])
    sft = make_samples(TARGET_SKILL, args.sft_examples, seed=args.seed + 1, exclude=held_out)
    write_jsonl(data / "sft.jsonl", [as_conversation(t) for t in sft])
    # RL prompts (grpo.py): distinct target-skill problems, none held out
    rl = make_tasks(TARGET_SKILL, args.rl_prompts, seed=args.seed + 4, exclude=held_out)
    write_jsonl(data / "prompts.jsonl", rl)
    if args.data_only:
        return

    # tiny-base's arithmetic is mostly addition without carrying, so it is weak on the held-out (uniform) problems,
    # about 30% of which need no carry; a few carrying examples give sampling something to find.
    n_carry = round(args.pretrain_carry_frac * args.pretrain_target)
    pretrain = make_samples(
        TARGET_SKILL,
        args.pretrain_target - n_carry,
        seed=args.seed + 2,
        exclude=held_out,
        accept=lambda t: not needs_carry(t),
    )
    pretrain += make_samples(TARGET_SKILL, n_carry, seed=args.seed + 3, exclude=held_out, accept=needs_carry)
    for skill in GENERAL_SKILLS:
        pretrain += make_samples(skill, args.pretrain_per_general_skill, seed=args.seed + 2, exclude=held_out)
    random.Random(args.seed).shuffle(pretrain)
    assert {t["skill"] for t in pretrain} == set(SKILLS)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_jsonl(tmp / "pretrain.jsonl", [as_conversation(t) for t in pretrain])
        tokenizer = build_tokenizer(tmp / "init")
        build_init_model(tmp / "init", tokenizer, args)
        # Pretraining is an SFT run from random weights on the chat-formatted mix.
        cmd = [
            sys.executable,
            str(ROOT / "sft.py"),
            "--model",
            str(tmp / "init"),
            "--dataset",
            str(tmp / "pretrain.jsonl"),
            "--eval-dataset",
            str(data / "sft_eval.jsonl"),
            "--eval-prompts",
            str(data / "eval.jsonl"),
            "--output-dir",
            str(tmp),
            "--run-name",
            "pretrain",
            "--seed",
            str(args.seed),
            "--max-steps",
            str(args.pretrain_steps),
            "--batch-size",
            "64",
            "--micro-batch-size",
            "64",
            "--learning-rate",
            str(args.learning_rate),
            "--warmup-steps",
            "50",
            "--weight-decay",
            "0.1",
            "--eval-every",
            str(args.eval_every),
        ]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
        shutil.rmtree(out / "tiny-base", ignore_errors=True)
        shutil.copytree(tmp / "pretrain" / "final", out / "tiny-base")
        last = [json.loads(line) for line in (tmp / "pretrain" / "metrics.jsonl").open()][-1]
    summary = {k: round(v, 4) for k, v in last.items() if k.startswith("eval/")}
    (out / "tiny-base" / "build_eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("tiny-base:", json.dumps(summary))


if __name__ == "__main__":
    main(tyro.cli(Args))
