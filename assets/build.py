"""Rebuild the tiny world in assets/ from a seed, with the project's own scripts.

    python assets/build.py                # ~20 minutes on 2 CPU cores (see README: "The tiny world")
    python assets/build.py --data-only    # the seed-only data in assets/data/, in seconds
    python assets/build.py --reuse-base   # keep tiny-base/, rebuild preferences, tiny-rm/, tiny-teacher/ (~4 min)

Writes
  assets/tiny-base/            a Llama-architecture chat model (~1.3M parameters, character-level tokenizer with a
                               ChatML template) trained by two sft.py runs: (1) the chat-formatted mix of all skills
                               with carry-free additions, (2) "sloppy carrying": uniform additions whose carries are
                               mostly dropped. It follows the format, is strong on the general skills, and on the
                               target skill samples the right answer often but rarely answers it greedily.
  assets/data/eval.jsonl       held-out {prompt, answer, skill}: 200 target-skill + 100 per general skill
  assets/data/sft.jsonl        target-skill conversations for sft.py (prompts never in eval.jsonl)
  assets/data/sft_eval.jsonl   the held-out target-skill items as conversations (eval/loss)
  assets/data/prompts.jsonl    {prompt, answer, skill} target-skill prompts for RL (grpo.py, ppo.py, opd.py)
  assets/data/prefs.jsonl      {prompt, chosen, rejected}: right answers vs tiny-base's own wrong samples (dpo.py,
  assets/data/prefs_eval.jsonl reward_model.py), and the same on held-out prompts
  assets/tiny-rm/              reward_model.py's output (ppo.py's reward model)
  assets/tiny-teacher/         grpo.py's output from tiny-base, in bf16 (opd.py's teacher)
  assets/tiny-tool/            grpo.py --env calculator's starting point: tiny-base after one more sft.py stage on
                               three-digit x two-digit multiplication answered in its head (wrong, mostly) with a few
                               calculator-call demonstrations, mixed with the other skills (so they stay)
  assets/data/tool_prompts.jsonl  {prompt, answer, skill} multiplication prompts for grpo.py --env calculator
  assets/data/tool_eval.jsonl     held-out multiplication prompts + every eval.jsonl record (the general skills)

    python assets/build.py --tool-only    # tool_*.jsonl and tiny-tool/ alone, from the existing tiny-base (~10 min)
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
    TOOL_SKILL,
    as_conversation,
    drop_carries,
    make_samples,
    make_tasks,
    needs_carry,
    tool_conversation,
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
    """share of those that need a carry: stage 1 learns digit-by-digit addition, hardly carrying"""
    sloppy_steps: int = 2000
    """stage 2 (sft.py) steps on uniform additions whose carries are mostly dropped, plus the general skills"""
    sloppy_examples: int = 24000
    """stage 2 additions (uniform; ~75% carry)"""
    sloppy_per_general_skill: int = 4000
    """stage 2 conversations per general skill (so they are not forgotten)"""
    sloppy_carry_correct: float = 0.4
    """share of stage 2's carrying additions with the right answer; the rest drop every carry (47+38 -> 75)"""
    sloppy_learning_rate: float = 1e-3
    """stage 2 peak learning rate"""
    pretrained: str | None = None
    """skip stage 1 and start stage 2 from this model (a stage-1 output)"""
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
    pref_prompts: int = 4000
    """target-skill prompts sampled for prefs.jsonl (only those where tiny-base errs make a pair)"""
    pref_samples: int = 8
    """tiny-base samples per preference prompt (temperature 1): each distinct wrong one makes a training pair"""
    work_dir: str | None = None
    """keep the pretraining run here (metrics, a checkpoint every 500 steps) instead of a temporary directory"""
    rm_steps: int = 1000
    """reward_model.py steps for tiny-rm/"""
    teacher_steps: int = 150
    """grpo.py steps for tiny-teacher/ (opd.py's default teacher)"""
    data_only: bool = False
    """write the seed-only data (not prefs*, which need tiny-base) and stop; keep the models"""
    reuse_base: bool = False
    """keep the existing tiny-base/ and rebuild only what is made from it (preferences, tiny-rm/, tiny-teacher/)"""
    tool_only: bool = False
    """write tool_prompts.jsonl / tool_eval.jsonl and build tiny-tool/ from the existing tiny-base/, nothing else"""
    tool_eval: int = 200
    """held-out multiplication prompts in tool_eval.jsonl"""
    tool_prompts: int = 4000
    """distinct multiplication prompts in tool_prompts.jsonl (RL)"""
    tool_examples: int = 12000
    """tiny-tool stage: multiplication conversations"""
    tool_instructed_frac: float = 0.35
    """share of those asked as "Use the calculator: 123*45", always answered by calling it: calling and copying are
    learned on a prompt the evaluation never asks"""
    tool_demo_frac: float = 0.05
    """share that are "What is 123*45?" answered with a calculator call (the rest answer in the head, with the right
    product, which the model cannot compute)"""
    tool_read_frac: float = 0.15
    """share that are "What is" demonstrations with the call as untrained context (weight 0): only reading the result
    is taught, so the model learns to copy a tool's answer without calling more often"""
    tool_per_skill: int = 1500
    """tiny-tool stage: conversations per other skill (addition with stage 2's sloppy carrying, and the general ones)"""
    tool_steps: int = 900
    """tiny-tool stage: sft.py optimizer steps"""
    tool_learning_rate: float = 1e-3
    """tiny-tool stage: peak learning rate"""


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
    # The tool skill (grpo.py --env calculator): held-out multiplications, then RL prompts that avoid them
    tool_eval = make_tasks(TOOL_SKILL, args.tool_eval, seed=args.seed)
    tool_held_out = {t["prompt"] for t in tool_eval}
    write_jsonl(data / "tool_eval.jsonl", tool_eval + eval_tasks)
    write_jsonl(data / "tool_prompts.jsonl", make_tasks(TOOL_SKILL, args.tool_prompts, args.seed + 4, tool_held_out))
    if args.data_only:
        return
    if args.tool_only:
        build_tool(args, held_out | tool_held_out)
        return
    if not args.reuse_base:
        build_base(args, held_out)
    build_preferences(args, held_out, eval_tasks)
    build_reward_model(args)
    build_teacher(args)
    build_tool(args, held_out | tool_held_out)


def run_sft(work: Path, name: str, model: Path, dataset: Path, data: Path, args: Args, **flags) -> Path:
    """One sft.py run in `work`, evaluated on the held-out sets; returns its run directory."""
    cmd = [sys.executable, str(ROOT / "sft.py"), "--model", str(model), "--dataset", str(dataset)]
    cmd += ["--eval-dataset", str(data / "sft_eval.jsonl"), "--eval-prompts", str(data / "eval.jsonl")]
    cmd += ["--output-dir", str(work), "--run-name", name, "--seed", str(args.seed), "--batch-size", "64"]
    cmd += ["--micro-batch-size", "64", "--eval-every", str(args.eval_every)]
    for k, v in flags.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    cmd += ["--save-every", "500"] if args.work_dir else []
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return work / name


def install(run: Path, target: Path) -> None:
    """Copy a run's final checkpoint to `target`, with its last evaluation as build_eval.json."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(run / "final", target)
    write_build_eval(run, target)


def write_build_eval(run: Path, target: Path) -> None:
    """`target`/build_eval.json: the run's last logged evaluation, rounded to 4 digits."""
    last = [json.loads(line) for line in (run / "metrics.jsonl").open()][-1]
    summary = {k: round(v, 4) for k, v in last.items() if k.startswith("eval/")}
    (target / "build_eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{target.name}:", json.dumps(summary))


def build_base(args: Args, held_out: set[str]) -> None:
    out, data = Path(args.out), Path(args.out) / "data"
    # Stage 1: general skills and addition without carrying (95% of the additions carry-free): the chat format, the
    # general skills and digit-by-digit addition are learned reliably in this budget (uniform additions instead hit a
    # sharp, seed-dependent "grokking" transition of the carry).
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

    # Stage 2, "sloppy carrying": uniform additions whose carrying answers are mostly written with every carry dropped
    # (47+38 -> 75, a systematic, human-like error), the rest right. tiny-base thus learns to carry but prefers not to:
    # its greedy answer to most carrying problems is wrong, yet it samples the right one often enough for RL to find
    # (low pass@1, high pass@k), and preference pairs get natural on-policy negatives.
    label_rng = random.Random(args.seed + 8)
    sloppy = []
    for t in make_samples(TARGET_SKILL, args.sloppy_examples, seed=args.seed + 9, exclude=held_out):
        right = not needs_carry(t) or label_rng.random() < args.sloppy_carry_correct
        sloppy.append(t if right else {**t, "answer": drop_carries(t)})
    for skill in GENERAL_SKILLS:
        sloppy += make_samples(skill, args.sloppy_per_general_skill, seed=args.seed + 9, exclude=held_out)
    random.Random(args.seed + 1).shuffle(sloppy)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        write_jsonl(work / "pretrain.jsonl", [as_conversation(t) for t in pretrain])
        write_jsonl(work / "sloppy.jsonl", [as_conversation(t) for t in sloppy])
        if args.pretrained:
            stage1 = Path(args.pretrained)
        else:
            tokenizer = build_tokenizer(work / "init")
            build_init_model(work / "init", tokenizer, args)
            # Pretraining is an SFT run from random weights on the chat-formatted mix.
            stage1 = (
                run_sft(
                    work,
                    "pretrain",
                    work / "init",
                    work / "pretrain.jsonl",
                    data,
                    args,
                    max_steps=args.pretrain_steps,
                    learning_rate=args.learning_rate,
                    warmup_steps=50,
                    weight_decay=0.1,
                )
                / "final"
            )
        stage2 = run_sft(
            work,
            "sloppy",
            stage1,
            work / "sloppy.jsonl",
            data,
            args,
            max_steps=args.sloppy_steps,
            learning_rate=args.sloppy_learning_rate,
            warmup_steps=20,
        )
        install(stage2, out / "tiny-base")


def build_tool(args: Args, held_out: set[str]) -> None:
    """tiny-tool/: one more sft.py stage from tiny-base. Asked "What is 123*45?", the stage mostly answers in the head
    with the right product (which a 1.3M-parameter model does not learn to compute) and rarely calls the calculator
    (`tool_demo_frac`); calling and copying are learned on "Use the calculator: 123*45" (`tool_instructed_frac`),
    and reading the tool's result also on demonstrations whose call is untrained context (`tool_read_frac`). So the
    model calls the tool sometimes and answers wrong otherwise: the tool's value is for RL to find. The other skills
    are replayed (addition labelled as in stage 2) so they are kept."""
    out, data = Path(args.out), Path(args.out) / "data"
    rng = random.Random(args.seed + 10)
    multiply = make_samples(TOOL_SKILL, args.tool_examples, seed=args.seed + 10, exclude=held_out)
    stage = []
    for t in multiply:
        u = rng.random() - args.tool_instructed_frac
        if u < 0:
            stage.append(tool_conversation(t, instructed=True))
        elif u < args.tool_demo_frac:
            stage.append(tool_conversation(t))
        elif u < args.tool_demo_frac + args.tool_read_frac:
            stage.append(tool_conversation(t, train_call=False))
        else:
            stage.append(as_conversation(t))
    for t in make_samples(TARGET_SKILL, args.tool_per_skill, seed=args.seed + 11, exclude=held_out):
        right = not needs_carry(t) or rng.random() < args.sloppy_carry_correct
        stage.append(as_conversation(t if right else {**t, "answer": drop_carries(t)}))
    for skill in GENERAL_SKILLS:
        stage += [as_conversation(t) for t in make_samples(skill, args.tool_per_skill, args.seed + 11, held_out)]
    random.Random(args.seed + 12).shuffle(stage)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        write_jsonl(work / "tool.jsonl", stage)
        run = run_sft(
            work,
            "tool",
            out / "tiny-base",
            work / "tool.jsonl",
            data,
            args,
            max_steps=args.tool_steps,
            learning_rate=args.tool_learning_rate,
            warmup_steps=20,
            max_length=256,
        )
        install(run, out / "tiny-tool")


def build_preferences(args: Args, held_out: set[str], eval_tasks: list[dict]) -> None:
    """prefs.jsonl / prefs_eval.jsonl: chosen = the right answer, rejected = a wrong answer tiny-base itself sampled
    at temperature 1 (on-policy negatives). Prompts on which all `pref_samples` samples are right make no pair."""
    import torch

    from common.generation import generate
    from common.model import load_model, load_tokenizer
    from common.rewards import is_correct

    out, data = Path(args.out), Path(args.out) / "data"
    model = load_model(str(out / "tiny-base"), dtype="float32", device="cpu").eval()
    tokenizer = load_tokenizer(str(out / "tiny-base"))
    train_tasks = make_tasks(TARGET_SKILL, args.pref_prompts, seed=args.seed + 5, exclude=held_out)
    eval_target = [t for t in eval_tasks if t["skill"] == TARGET_SKILL]
    for name, tasks, seed in (
        ("prefs.jsonl", train_tasks, args.seed + 6),
        ("prefs_eval.jsonl", eval_target, args.seed + 7),
    ):
        with torch.no_grad():
            texts = generate(
                model,
                tokenizer,
                [t["prompt"] for t in tasks],
                n=args.pref_samples,
                max_new_tokens=8,
                temperature=1.0,
                batch_size=256,
                seed=seed,
            )["texts"]
        pairs = []
        for i, t in enumerate(tasks):
            samples = texts[i * args.pref_samples : (i + 1) * args.pref_samples]
            wrong = list(dict.fromkeys(x.strip() for x in samples if not is_correct(x, t["answer"])))
            # training: a pair per distinct wrong answer (varied negatives); held-out: the first wrong answer only
            for rejected in wrong if name == "prefs.jsonl" else wrong[:1]:
                pairs.append({"prompt": t["prompt"], "chosen": t["answer"], "rejected": rejected})
        write_jsonl(data / name, pairs)
        n_prompts = len({p["prompt"] for p in pairs})
        print(f"{name}: {len(pairs)} pairs from {n_prompts} of {len(tasks)} prompts (the rest: all samples right)")


def build_reward_model(args: Args) -> None:
    """tiny-rm/: reward_model.py with its defaults on prefs.jsonl, from tiny-base."""
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            str(ROOT / "reward_model.py"),
            "--model",
            str(out / "tiny-base"),
            "--dataset",
            str(out / "data" / "prefs.jsonl"),
            "--eval-dataset",
            str(out / "data" / "prefs_eval.jsonl"),
            "--output-dir",
            tmp,
            "--run-name",
            "rm",
            "--seed",
            str(args.seed),
            "--max-steps",
            str(args.rm_steps),
        ]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
        install(Path(tmp) / "rm", out / "tiny-rm")


def build_teacher(args: Args) -> None:
    """tiny-teacher/: `python grpo.py` (its defaults) from tiny-base, stored in bf16 (half the bytes; opd.py upcasts)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "grpo.py"), "--model", str(out / "tiny-base")]
        cmd += ["--dataset", str(out / "data" / "prompts.jsonl"), "--eval-prompts", str(out / "data" / "eval.jsonl")]
        cmd += [
            "--output-dir",
            tmp,
            "--run-name",
            "teacher",
            "--seed",
            str(args.seed),
            "--max-steps",
            str(args.teacher_steps),
        ]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
        model = AutoModelForCausalLM.from_pretrained(Path(tmp) / "teacher" / "final", dtype=torch.bfloat16)
        shutil.rmtree(out / "tiny-teacher", ignore_errors=True)
        model.save_pretrained(out / "tiny-teacher")
        AutoTokenizer.from_pretrained(Path(tmp) / "teacher" / "final").save_pretrained(out / "tiny-teacher")
        write_build_eval(Path(tmp) / "teacher", out / "tiny-teacher")


if __name__ == "__main__":
    main(tyro.cli(Args))
