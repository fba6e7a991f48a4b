"""Supervised fine-tuning (SFT): maximize the likelihood of the assistant's tokens.

    loss = - sum_{t in assistant tokens of the step} log p(x_t | x_<t) / (number of assistant tokens in the step)

The normalizer is the whole optimizer step's token count, so accumulating micro-batches gives exactly the gradient
of one big batch — and under torchrun, where each process takes its share of the step and the count is summed over
processes, N processes take exactly the step of one. `{"text": ...}` records train on every token (continued
pre-training).

    python sft.py                                         # the tiny world, a few minutes on a laptop CPU
    python sft.py --model Qwen/Qwen3-0.6B --dataset chat.jsonl --batch-size 64 --micro-batch-size 8 \\
        --learning-rate 1e-5 --max-steps 500 --eval-prompts '' --gradient-checkpointing
    torchrun --nproc_per_node=8 sft.py --model Qwen/Qwen3-0.6B ...   # FSDP2 over 8 GPUs, same flags
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

from common import die, dist
from common.data import (
    IGNORE_INDEX,
    Mixture,
    check_batch_sizes,
    count_loss_tokens,
    data_options,
    fit_prompts,
    load_prompts,
    load_sft_dataset,
    micro_batches,
    packed_micro_batches,
    prompt_budget,
)
from common.drift import Drift
from common.logprobs import token_logprobs
from common.model import (
    load_model,
    load_tokenizer,
    load_trainer_state,
    lr_lambda,
    save_checkpoint,
    save_model,
)
from common.rewards import eval_reward_fn, evaluate
from common.tinyworld import TARGET_SKILL
from common.tracking import Tracker, open_run, peak_memory_gb

SCRIPT = Path(__file__).stem  # the run's name and --resume's check, from the file name: a copy is its own script


@dataclass
class Args:
    # experiment
    seed: int = 1
    """seed of the data order and of torch"""
    output_dir: str = "runs"
    """runs are written to {output_dir}/{run_name}/"""
    run_name: str | None = None
    """the run's name; if not given: sft__{seed}__{unix time}"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works)"""
    wandb_project: str = "cleanpost"
    """the wandb project"""
    wandb_entity: str | None = None
    """the wandb entity (team)"""
    # model
    model: str = "assets/tiny-base"
    """hub id or local directory of the model to fine-tune"""
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
    dataset: tuple[str, ...] = ("assets/data/sft.jsonl",)
    """training data, one or more sources (mixed by --dataset-weights) of {messages} | {prompt, completion} | {text}
    records; each a JSONL/.json/.parquet/.csv file, a save_to_disk directory, or a hub id
    NAME[:CONFIG][@SPLIT][[START:STOP]] (e.g. HuggingFaceH4/ultrachat_200k@train_sft)"""
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
    eval_dataset: str = "assets/data/sft_eval.jsonl"
    """held-out data of the same shapes for eval/loss ('' to skip; any source --dataset takes, one of them)"""
    eval_prompts: str = "assets/data/eval.jsonl"
    """held-out {prompt, answer, skill} records for greedy accuracy ('' to skip; any source --dataset takes, one of
    them)"""
    target_skill: str = TARGET_SKILL
    """the skill reported as eval/accuracy; the other skills make eval/general_accuracy"""
    max_length: int = 256
    """examples are truncated to this many tokens (counted and reported)"""
    packing: bool = False
    """pack each step's examples into rows of --max-length tokens (best-fit decreasing; --micro-batch-size then counts
    rows): no compute on padding, the same loss and gradient (attention stays within each example; the loss is
    still the step's token mean)"""
    # optimization
    max_steps: int = 800
    """optimizer steps"""
    batch_size: int = 64
    """examples per optimizer step, over all processes (each of N torchrun processes takes batch_size / N)"""
    micro_batch_size: int = 64
    """examples per forward/backward in each process; gradient accumulation steps = batch_size / N / micro_batch_size"""
    learning_rate: float = 5e-4
    """peak learning rate of AdamW"""
    weight_decay: float = 0.0
    """AdamW weight decay (matrices only; not norms and biases)"""
    lr_schedule: str = "cosine"
    """cosine | linear | constant, after warmup"""
    warmup_steps: int = 10
    """linear warmup from 0 to the peak learning rate"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this (train/grad_norm is logged before clipping)"""
    # evaluation and checkpoints
    eval_every: int = 100
    """evaluate every N steps (0: only before the first and after the last step)"""
    eval_max_new_tokens: int = 16
    """generation budget of the accuracy evaluation"""
    eval_reward_fn: str = "tiny_world"
    """verifier of the greedy evaluation: tiny_world | math | format | module:function (eval/accuracy = its mean
    reward on the target skill)"""
    eval_batch_size: int = 128
    """prompts per generate call in the greedy evaluation (lower it for large models and long answers)"""
    kl_prompts: int = 64
    """eval/kl_to_init, the KL of the model to the initial one: over the first N held-out target-skill prompts of
    --eval-prompts, on the model's own samples (0: off; see common/drift.py)"""
    kl_samples: int = 4
    """eval/kl_to_init: completions sampled per prompt (temperature 1, the same seed at every evaluation)"""
    save_every: int = 0
    """write checkpoints/step_N every N steps for --resume (0: only final/)"""
    resume: str | None = None
    """a run directory (its newest checkpoint) or a checkpoint directory to continue from"""


def sft_loss(logps: torch.Tensor, labels: torch.Tensor, num_loss_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of the loss tokens divided by the whole step's loss-token count.

    logps (B, T-1): log p(input_ids[:, 1:]); labels (B, T), IGNORE_INDEX where no loss.
    Returns (loss for backward, summed NLL for logging)."""
    loss_mask = labels[:, 1:] != IGNORE_INDEX  # (B, T-1): token t+1 is predicted at position t
    nll_sum = -(logps * loss_mask).sum()
    return nll_sum / num_loss_tokens, nll_sum.detach()


@torch.no_grad()
def eval_loss(model, examples, micro_batch_size, pad_id, device) -> float:
    """Token-mean NLL over the held-out examples (each process takes every N-th; sums are reduced)."""
    model.eval()
    nll, tokens = 0.0, 0
    mine = dist.strided(list(range(len(examples))))
    with dist.unsharded(model):  # no communication per forward: the shares may differ by an example
        for mb in micro_batches(examples, mine, micro_batch_size, pad_id) if mine else []:
            mb = {k: v.to(device) for k, v in mb.items()}
            loss_tokens = mb["labels"][:, 1:] != IGNORE_INDEX  # (b, T-1): the only rows the LM head runs on
            logps = token_logprobs(model, mb["input_ids"], mb["attention_mask"], target_mask=loss_tokens)
            n = count_loss_tokens([mb])
            nll += sft_loss(logps, mb["labels"], n)[1].item()
            tokens += n
    model.train()
    nll, tokens = dist.all_reduce([nll, tokens])
    return nll / max(1, tokens)


def main(args: Args) -> None:
    # PLUMBING: check flags and inputs before any compute
    dist.init()  # torchrun: join the other processes (nothing for `python sft.py`)
    args, ckpt, run_dir = open_run(args, SCRIPT)  # a new run directory, or --resume's run and saved flags
    data_opts = data_options(args)  # --columns, --prompt-template, --dataset-weights: checked now
    eval_reward = eval_reward_fn(args.eval_reward_fn)  # the verifier of eval/accuracy
    rank_rows = dist.local_slice(args.batch_size)  # this process's share of every step
    grad_accum_steps = check_batch_sizes(rank_rows.stop - rank_rows.start, args.micro_batch_size, args.batch_size)
    if args.lr_schedule not in ("cosine", "linear", "constant"):
        die(f"--lr-schedule {args.lr_schedule!r} is not one of cosine, linear, constant")
    torch.manual_seed(args.seed)

    tokenizer = load_tokenizer(str(ckpt) if ckpt else args.model, args.chat_template_kwargs)
    train = Mixture(
        [
            load_sft_dataset(source, tokenizer, args.max_length, opts=data_opts, num_proc=args.num_proc)
            for source in args.dataset
        ],
        args.dataset,
        args.dataset_weights,
    )
    train_examples = train.items  # every source's examples, concatenated; `train.indices` draws the steps
    eval_examples = (
        load_sft_dataset(args.eval_dataset, tokenizer, args.max_length, opts=data_opts, num_proc=args.num_proc)
        if args.eval_dataset
        else []
    )
    eval_records = (
        load_prompts(args.eval_prompts, ("prompt", "answer"), data_opts, "--eval-prompts") if args.eval_prompts else []
    )
    eval_budget = prompt_budget(None, args.model, args.eval_max_new_tokens)  # the context minus the answer's room
    eval_records = fit_prompts(eval_records, tokenizer, eval_budget, "--eval-prompts", flag="--eval-max-new-tokens")
    model = load_model(
        str(ckpt) if ckpt else args.model,
        dtype=args.dtype,
        gradient_checkpointing=args.gradient_checkpointing,
        attn_implementation=args.attn_implementation,
        sharded_load=True,  # torchrun: each process reads only its shards (in dist.wrap)
    )
    model = dist.wrap(model, train=True)  # torchrun: FSDP2 shards, one process: unchanged
    device = next(model.parameters()).device
    model.train()
    drift = Drift(args, eval_records, device, args.eval_max_new_tokens)  # eval/kl_to_init: the initial model, on host

    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
        fused=device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, args.warmup_steps, args.max_steps, args.lr_schedule)
    )
    start_step = load_trainer_state(ckpt, optimizer, scheduler, model)["step"] if ckpt else 0
    tracker = Tracker(run_dir, args, script=SCRIPT, total_steps=args.max_steps, start_step=start_step)
    tracker.write(
        f"run: {run_dir}  |  {len(train_examples)} train examples, "
        f"{'up to ' if args.packing else ''}{grad_accum_steps} micro-batches/step"
        + (f" in each of {dist.world_size()} processes" if dist.world_size() > 1 else "")
        + ", "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}"
        + (f"  |  resumed at step {start_step} from {ckpt}" if ckpt else "")
    )
    tracker.write(train.describe(data_opts))

    def evaluation() -> dict:
        metrics = {}
        if eval_examples:
            metrics["eval/loss"] = eval_loss(
                model, eval_examples, args.micro_batch_size, tokenizer.pad_token_id, device
            )
        if eval_records:
            metrics.update(
                evaluate(
                    model,
                    tokenizer,
                    eval_records,
                    reward_fn=eval_reward,
                    target_skill=args.target_skill,
                    batch_size=args.eval_batch_size,
                    max_new_tokens=args.eval_max_new_tokens,
                )
            )
        return {**metrics, **drift(model, tokenizer)}  # eval/kl_to_init, eval/weight_drift

    if start_step == 0:  # every run shows its starting point
        start = evaluation()
        tracker.log(start, step=0)
        tracker.write("step 0: " + "  ".join(f"{k}={v:.4f}" for k, v in start.items()))

    for step in range(start_step, args.max_steps):
        t0 = time.time()
        # ALGO LOGIC: the step's examples depend only on (seed, batch_size, step); each process takes its slice.
        # The loss is normalized by the loss tokens of the whole step (summed over processes before backward, and
        # the processes' gradients are summed), so the gradient equals the full-batch gradient.
        step_examples = train.indices(args.batch_size, step, args.seed)[rank_rows]
        if args.packing:  # rows of --max-length tokens, examples back to back
            batches = packed_micro_batches(
                train_examples, step_examples, args.micro_batch_size, args.max_length, tokenizer.pad_token_id
            )
        else:
            batches = micro_batches(train_examples, step_examples, args.micro_batch_size, tokenizer.pad_token_id)
        num_loss_tokens = int(dist.all_reduce(count_loss_tokens(batches)))
        nll_sum = torch.zeros((), dtype=torch.float64, device=device)  # on the device: one host sync per step
        num_tokens = sum(int(mb["attention_mask"].sum()) for mb in batches)  # counted on the host, before the copy
        for mb in batches:
            mb = {k: v.to(device, non_blocking=True) for k, v in mb.items()}
            loss_tokens = mb["labels"][:, 1:] != IGNORE_INDEX  # (b, T-1): the only rows the LM head runs on
            logps = token_logprobs(
                model,
                mb["input_ids"],
                mb["attention_mask"],
                target_mask=loss_tokens,
                position_ids=mb.get("position_ids"),
            )  # (b, T-1)
            loss, nll = sft_loss(logps, mb["labels"], num_loss_tokens)
            loss.backward()
            nll_sum += nll
        nll_sum, num_tokens = dist.all_reduce([float(nll_sum), num_tokens])
        train_loss = nll_sum / num_loss_tokens
        grad_norm = dist.grad_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm))
        # PLUMBING: a broken step stops the run before it touches the weights or a checkpoint
        tracker.check_finite(train_loss, grad_norm, step + 1)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_s = time.time() - t0

        done = step + 1
        metrics = {
            "train/loss": train_loss,
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/epoch": done * args.batch_size / len(train_examples),
            **train.shares(args.batch_size, step, args.seed),
            "perf/tokens_per_s": num_tokens / step_s,
            "perf/step_s": step_s,
            "perf/peak_mem_gb": peak_memory_gb(device),
        }
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
