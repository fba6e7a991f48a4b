"""Reward model: a Bradley-Terry scorer of (prompt, response) trained on preference pairs (Ouyang et al. 2022).

A causal LM checkpoint becomes `AutoModelForSequenceClassification` with one label (a fresh linear head on the
last hidden state); the score r(x, y) is read at the last non-pad token, whatever the padding side. With m an
optional per-pair margin (the record's "margin" field) and c = --center-rewards-coef (Eisenstein et al. 2023):

    loss = -log sigmoid(r(x, y_w) - r(x, y_l) - m) + c * (r(x, y_w) + r(x, y_l))^2

The checkpoint in runs/<run>/final loads with `AutoModelForSequenceClassification.from_pretrained` and is what
ppo.py consumes (`--reward-model`).

    python reward_model.py                                              # the tiny world, a few minutes on a CPU
    python reward_model.py --model Qwen/Qwen3-0.6B --dataset prefs.jsonl --eval-dataset prefs_test.jsonl \\
        --batch-size 64 --micro-batch-size 8 --learning-rate 1e-5 --max-steps 1000
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import tyro
from transformers import AutoModelForSequenceClassification

from common import die, dist
from common.data import Mixture, check_batch_sizes, data_options, load_preference_dataset, pair_micro_batches
from common.model import (
    last_token_scores,
    load_model,
    load_tokenizer,
    load_trainer_state,
    lr_lambda,
    save_checkpoint,
    save_model,
)
from common.tracking import Tracker, open_run, peak_memory_gb

SCRIPT = Path(__file__).stem  # the run's name and --resume's check, from the file name: a copy is its own script


@dataclass
class Args:
    # experiment
    seed: int = 1
    """seed of the data order, the head's initialization and of torch"""
    output_dir: str = "runs"
    """runs are written to {output_dir}/{run_name}/"""
    run_name: str | None = None
    """the run's name; if not given: reward_model__{seed}__{unix time}"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works)"""
    wandb_project: str = "cleanpost"
    """the wandb project"""
    wandb_entity: str | None = None
    """the wandb entity (team)"""
    # model
    model: str = "assets/tiny-base"
    """hub id or local directory: a causal LM (a fresh score head is added) or a reward model to train further"""
    dtype: str = "auto"
    """auto: bf16 compute from fp32 master weights on a GPU with native bf16, else fp32 | float32 | bfloat16: bf16
    compute, fp32 master weights, gradients and AdamW state (also on a CPU) | pure-bf16: everything in bf16 (8 instead
    of 16 bytes a parameter; updates below half a bf16 ulp of a weight are lost)"""
    gradient_checkpointing: bool = False
    """recompute activations in backward to save memory"""
    attn_implementation: str | None = None
    """attention kernel: sdpa | eager | flash_attention_2 (default: transformers' choice; Gemma-2 needs eager)"""
    chat_template_kwargs: str | None = None
    """JSON passed to the chat template for training data, prompts and evaluation alike, e.g. '{"enable_thinking":
    false}' for Qwen3"""
    # data
    dataset: tuple[str, ...] = ("assets/data/prefs.jsonl",)
    """training data, one or more sources (mixed by --dataset-weights) of {prompt, chosen, rejected[, margin]} pairs, or
    {chosen, rejected} conversations; each a JSONL/.json/.parquet/.csv file, a save_to_disk directory, or a hub id
    NAME[:CONFIG][@SPLIT][[START:STOP]] (e.g. trl-lib/ultrafeedback_binarized)"""
    dataset_weights: tuple[float, ...] | None = None
    """one weight per --dataset source: each example is drawn from a source with probability proportional to its
    weight, reproducibly from --seed (default: the sources' sizes, i.e. their concatenation); logged as data/share/*"""
    columns: str | None = None
    """FIELD=COLUMN,... maps our record fields onto a dataset's columns, for every dataset of the run (e.g.
    prompt=question,answer=answer for GSM8K; messages=conversations for a chat set); each source must have at least
    one of the columns"""
    prompt_template: str | None = None
    """a Python format string over a row's columns that makes its prompt, for training and evaluation prompts alike
    (e.g. '{question}\nPut the final answer in \\boxed{{}}.')"""
    system_prompt: str | None = None
    """a system turn put first in every prompt or conversation that has none"""
    num_proc: int = 1
    """processes that tokenize the datasets (the result is cached next to each dataset, keyed by its content, the
    tokenizer, the chat template, the prompt options and --max-length: a second run skips it)"""
    eval_dataset: str = "assets/data/prefs_eval.jsonl"
    """held-out pairs for eval/accuracy ('' to skip; any source --dataset takes, one of them)"""
    max_length: int = 256
    """prompt + response are truncated to this many tokens (counted and reported)"""
    # reward model
    center_rewards_coef: float = 0.0
    """weight of (r_chosen + r_rejected)^2, which keeps the scores centred at 0 (0 disables)"""
    # optimization
    max_steps: int = 1000
    """optimizer steps"""
    batch_size: int = 32
    """preference pairs per optimizer step, over all processes (each of N torchrun processes takes batch_size / N)"""
    micro_batch_size: int = 32
    """pairs per forward/backward in each process (2x rows: chosen and rejected in one forward)"""
    learning_rate: float = 3e-4
    """peak learning rate of AdamW"""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only; 0.1 gains ~2 held-out pairs of 147 on the tiny world over 0, two seeds)"""
    warmup_steps: int = 10
    """linear warmup from 0 to the peak learning rate, then linear decay to 0"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this (train/grad_norm is logged before clipping)"""
    # evaluation and checkpoints
    eval_every: int = 50
    """evaluate every N steps (0: only before the first and after the last step)"""
    save_every: int = 0
    """write checkpoints/step_N every N steps for --resume (0: only final/)"""
    resume: str | None = None
    """a run directory (its newest checkpoint) or a checkpoint directory to continue from"""


def reward_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor, center_rewards_coef: float
) -> torch.Tensor:
    """Per-pair Bradley-Terry loss (B,) from scores (B,): -log sigmoid(r_w - r_l - m) + c (r_w + r_l)^2."""
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - margin)
    if center_rewards_coef:
        losses = losses + center_rewards_coef * (chosen_rewards + rejected_rewards) ** 2
    return losses


def pair_metrics(prefix: str, losses, chosen_rewards, rejected_rewards) -> dict:
    return {
        f"{prefix}/loss": losses.mean().item(),
        f"{prefix}/accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
        f"{prefix}/margin": (chosen_rewards - rejected_rewards).mean().item(),
        f"{prefix}/rewards_chosen": chosen_rewards.mean().item(),
        f"{prefix}/rewards_rejected": rejected_rewards.mean().item(),
    }


def main(args: Args) -> None:
    # PLUMBING: check flags and inputs before any compute
    dist.init()  # torchrun: join the other processes (nothing for `python reward_model.py`)
    args, ckpt, run_dir = open_run(args, SCRIPT)  # a new run directory, or --resume's run and saved flags
    data_opts = data_options(args)  # --columns, --prompt-template, --dataset-weights: checked now
    rank_rows = dist.local_slice(args.batch_size)  # this process's share of every step
    grad_accum_steps = check_batch_sizes(rank_rows.stop - rank_rows.start, args.micro_batch_size, args.batch_size)
    if args.center_rewards_coef < 0:
        die(f"--center-rewards-coef must be >= 0, got {args.center_rewards_coef}")
    torch.manual_seed(args.seed)

    tokenizer = load_tokenizer(str(ckpt) if ckpt else args.model, args.chat_template_kwargs)
    train = Mixture(
        [
            load_preference_dataset(source, tokenizer, args.max_length, opts=data_opts, num_proc=args.num_proc)
            for source in args.dataset
        ],
        args.dataset,
        args.dataset_weights,
    )
    train_pairs = train.items  # every source's pairs, concatenated; `train.indices` draws the steps
    eval_pairs = (
        load_preference_dataset(args.eval_dataset, tokenizer, args.max_length, opts=data_opts, num_proc=args.num_proc)
        if args.eval_dataset
        else []
    )
    pad_id = tokenizer.pad_token_id
    model = load_model(
        str(ckpt) if ckpt else args.model,
        dtype=args.dtype,
        gradient_checkpointing=args.gradient_checkpointing,
        model_class=AutoModelForSequenceClassification,
        num_labels=1,
        attn_implementation=args.attn_implementation,
        sharded_load=True,  # torchrun: each process reads only its shards (in dist.wrap)
    )
    model.config.pad_token_id = pad_id  # what transformers' own pooling needs when others load the checkpoint
    model = dist.wrap(model, train=True)  # torchrun: FSDP2 shards, one process: unchanged
    device = next(model.parameters()).device
    model.train()

    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
        fused=device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, args.warmup_steps, args.max_steps, "linear")
    )
    start_step = load_trainer_state(ckpt, optimizer, scheduler, model)["step"] if ckpt else 0
    tracker = Tracker(run_dir, args, script=SCRIPT, total_steps=args.max_steps, start_step=start_step)
    tracker.write(
        f"run: {run_dir}  |  {len(train_pairs)} train pairs, {grad_accum_steps} micro-batches/step"
        + (f" in each of {dist.world_size()} processes" if dist.world_size() > 1 else "")
        + ", "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}"
        + (f"  |  resumed at step {start_step} from {ckpt}" if ckpt else "")
    )
    tracker.write(train.describe(data_opts))

    @torch.no_grad()
    def evaluation() -> dict:
        if not eval_pairs:
            return {}
        model.eval()
        parts = []
        mine = dist.strided(list(range(len(eval_pairs))))  # each process scores every N-th pair
        with dist.unsharded(model):
            for mb in pair_micro_batches(eval_pairs, mine, args.micro_batch_size, pad_id) if mine else []:
                mb = {k: v.to(device) for k, v in mb.items()}
                scores = last_token_scores(model, mb["input_ids"], mb["attention_mask"])  # (2b,)
                b = len(mb["index"])
                losses = reward_loss(scores[:b], scores[b:], mb["margin"], args.center_rewards_coef)
                parts.append((losses, scores[:b], scores[b:]))
        model.train()
        local = [torch.cat(p) for p in zip(*parts)] if parts else [torch.zeros(0)] * 3
        return pair_metrics("eval", *[dist.all_gather(t) for t in local])

    if start_step == 0:  # every run shows its starting point
        start = evaluation()
        tracker.log(start, step=0)
        tracker.write("step 0: " + "  ".join(f"{k}={v:.4f}" for k, v in start.items()))

    for step in range(start_step, args.max_steps):
        t0 = time.time()
        # ALGO LOGIC: pairs chosen by (seed, batch_size, step); chosen and rejected scored in one forward; the summed
        # per-pair losses are divided by the step's pair count (over all processes; each takes its slice), so
        # accumulation and N processes give the full-batch gradient.
        batches = pair_micro_batches(
            train_pairs,
            train.indices(args.batch_size, step, args.seed)[rank_rows],
            args.micro_batch_size,
            pad_id,
        )
        parts = []
        num_tokens = sum(int(mb["attention_mask"].sum()) for mb in batches)  # on the host, before the copy
        for mb in batches:
            mb = {k: v.to(device) for k, v in mb.items()}
            scores = last_token_scores(model, mb["input_ids"], mb["attention_mask"])  # (2b,): chosen, then rejected
            b = len(mb["index"])
            losses = reward_loss(scores[:b], scores[b:], mb["margin"], args.center_rewards_coef)
            (losses.sum() / args.batch_size).backward()
            parts.append((losses.detach(), scores[:b].detach(), scores[b:].detach()))
        metrics = pair_metrics("train", *[dist.all_gather(torch.cat(p)) for p in zip(*parts)])
        num_tokens = dist.all_reduce(num_tokens)
        grad_norm = dist.grad_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm))
        # PLUMBING: a broken step stops the run before it touches the weights or a checkpoint
        tracker.check_finite(metrics["train/loss"], grad_norm, step + 1)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_s = time.time() - t0

        done = step + 1
        metrics.update(
            {
                "train/lr": lr,
                "train/grad_norm": grad_norm,
                "train/epoch": done * args.batch_size / len(train_pairs),
                **train.shares(args.batch_size, step, args.seed),
                "perf/tokens_per_s": num_tokens / step_s,
                "perf/step_s": step_s,
                "perf/peak_mem_gb": peak_memory_gb(device),
            }
        )
        if done == args.max_steps or (args.eval_every and done % args.eval_every == 0):
            metrics.update(evaluation())
        tracker.log(metrics, step=done)
        tracker.step()
        if args.save_every and done % args.save_every == 0 and done < args.max_steps:
            save_checkpoint(run_dir, done, model, tokenizer, optimizer, scheduler)

    final = save_model(model, tokenizer, run_dir / "final")
    if args.save_every and args.max_steps % args.save_every == 0:
        save_checkpoint(run_dir, args.max_steps, model, tokenizer, optimizer, scheduler)
    tracker.close()
    last = {k: v for k, v in metrics.items() if k.startswith("eval/")} if args.max_steps > start_step else {}
    if dist.is_main():
        print(f"saved {final}" + ("  |  " + "  ".join(f"{k}={v:.4f}" for k, v in last.items()) if last else ""))


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__.split("\n\n")[0]))  # --help opens with what the script does
