"""RLHF with PPO: policy, reference, reward model, value model and GAE (Ouyang et al. 2022; the implementation
details follow Huang et al., "The N Implementation Details of RLHF with PPO", 2024).

Each step samples completions y for prompts x from the policy, scores them with a frozen reward model (or with
verifiable reward functions, --reward-fn) and builds per-token rewards over the completion tokens t = 1..T:

    r_t = -kl_coef * (log pi(y_t|.) - log pi_ref(y_t|.))  +  [t = T] * score(x, y)       (k1 KL penalty)
    delta_t = r_t + gamma V(s_{t+1}) - V(s_t),   A_t = delta_t + gamma lam A_{t+1},   R_t = A_t + V(s_t)   (GAE)
    loss = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))                            (policy)
         + vf_coef * mean_t 0.5 max((V_t - R_t)^2, (clip(V_t, V_old_t - eps_v, V_old_t + eps_v) - R_t)^2)  (value)

with advantages whitened over the batch, rho the ratio to the rollout policy, and --ppo-epochs passes over
--num-minibatches minibatches. The value model is an AutoModelForSequenceClassification initialized from the reward
model (default) or from the policy with a fresh head; it reads a value at every completion position.

    python ppo.py                                                     # the tiny world with assets/tiny-rm
    python ppo.py --model runs/<sft run>/final --reward-model runs/<rm run>/final --dataset prompts.jsonl \\
        --eval-prompts '' --prompts-per-step 64 --max-new-tokens 256 --micro-batch-size 8 --stop-token eos

Under `torchrun --nproc_per_node=N ppo.py ...` each process samples, scores and trains on prompts_per_step / N
prompts; token counts, advantage whitening and metrics are taken over all processes.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import tyro
from transformers import AutoModelForSequenceClassification

from common import die, dist
from common.data import (
    IGNORE_INDEX,
    collate,
    data_options,
    fit_rollout_prompts,
    load_prompts,
    tokenize_pair_side,
)
from common.drift import Drift
from common.generation import (
    correction_metrics,
    derive_seed,
    generate,
    generation_token_budget,
    logprob_mismatch,
    rollout_correction,
)
from common.logprobs import completion_logprobs
from common.model import (
    last_token_scores,
    load_model,
    load_tokenizer,
    load_trainer_state,
    lr_lambda,
    save_checkpoint,
    save_model,
)
from common.rewards import check_reward_fns, compute_rewards, eval_reward_fn, evaluate, load_reward_fn
from common.tinyworld import TARGET_SKILL
from common.tracking import Tracker, open_run, peak_memory_gb, update_args
from common.vllm_engine import require_vllm, rollout_engine

SCRIPT = Path(__file__).stem  # the run's name and --resume's check, from the file name: a copy is its own script


@dataclass
class Args:
    # experiment
    seed: int = 1
    """seed of the prompt order and of sampling"""
    output_dir: str = "runs"
    """runs are written to {output_dir}/{run_name}/"""
    run_name: str | None = None
    """the run's name; if not given: ppo__{seed}__{unix time}"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works)"""
    wandb_project: str = "cleanpost"
    """the wandb project"""
    wandb_entity: str | None = None
    """the wandb entity (team)"""
    # models
    model: str = "assets/tiny-base"
    """hub id or local directory of the policy to train (also the frozen reference)"""
    reward_model: str = "assets/tiny-rm"
    """the frozen reward model (reward_model.py's output); ignored when --reward-fn is given"""
    value_init: Literal["auto", "reward_model", "policy"] = "auto"
    """value model start: the reward model, or the policy with a fresh scalar head (auto: the reward model if used)"""
    dtype: str = "auto"
    """auto: bf16 compute from fp32 master weights on a GPU with native bf16, else fp32 | float32 | bfloat16: bf16
    compute, fp32 master weights, gradients and AdamW state (also on a CPU) | pure-bf16: everything in bf16 (8 instead
    of 16 bytes a parameter; updates below half a bf16 ulp of a weight are lost)"""
    gradient_checkpointing: bool = False
    """recompute activations in backward to save memory (policy and value model)"""
    attn_implementation: str | None = None
    """attention kernel: sdpa | eager | flash_attention_2 (default: transformers' choice; Gemma-2 needs eager)"""
    chat_template_kwargs: str | None = None
    """JSON passed to the chat template for training data, prompts and evaluation alike, e.g. '{"enable_thinking":
    false}' for Qwen3"""
    shard_frozen: bool = False
    """under torchrun: shard the reference and reward model with FSDP2 (1/N of their memory per GPU, an all-gather
    per forward) instead of a full copy per GPU"""
    # data and rewards
    dataset: tuple[str, ...] = ("assets/data/prompts.jsonl",)
    """training data, one or more sources (mixed by --dataset-weights) of {prompt[, answer]} records (prompt: string or
    message list): each a JSONL/.json/.parquet/.csv file, a save_to_disk directory, or a hub id
    NAME[:CONFIG][@SPLIT][[START:STOP]] (e.g. openai/gsm8k:main)"""
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
    eval_prompts: str = "assets/data/eval.jsonl"
    """held-out {prompt, answer, skill} records for greedy, verifier-measured accuracy ('' to skip; any source --dataset
    takes, one of them)"""
    target_skill: str = TARGET_SKILL
    """the skill reported as eval/accuracy; the other skills make eval/general_accuracy"""
    reward_fn: list[str] = field(default_factory=list)
    """score with verifiable reward functions (tiny_world | math | format | module:function) instead of the reward
    model; several are summed"""
    reward_weights: list[float] | None = None
    """one weight per --reward-fn (default: all 1)"""
    # rollouts
    prompts_per_step: int = 64
    """prompts sampled per step"""
    group_size: int = 1
    """completions per prompt"""
    max_new_tokens: int = 8
    """completion budget; a completion without EOS by then is truncated"""
    max_prompt_length: int | None = None
    """prompts longer than this many tokens (after the chat template) are dropped and counted when the data is
    loaded, for training and evaluation (default: the model's context length minus --max-new-tokens)"""
    temperature: float = 1.0
    """sampling temperature, applied to the training log-probs as well"""
    top_p: float = 1.0
    """nucleus sampling; the training log-probs stay over every token (as in TRL and OpenRLHF), so < 1 makes them
    differ from the sampler's (rollout/logprob_diff_mean shows by how much)"""
    is_correction: Literal["auto", "none", "tis", "mis"] = "auto"
    """reweight each sampled token's loss by rho = pi_trainer / pi_sampler, the sampler/trainer mismatch: tis =
    min(rho, --is-cap) per token (truncated IS), mis = the sequence's rho where it lies in [1/cap, cap], else the
    sequence is dropped; auto: tis with --vllm, none on the HF path, where the sampler is the training forward
    itself (rollout/logprob_diff_max ~1e-6 in fp32); see common.generation.rollout_correction"""
    is_cap: float = 2.0
    """C of --is-correction"""
    vllm: bool = False
    """sample rollouts and the evaluation with a vLLM engine in this process (pip install -e ".[vllm]"), which
    gets the policy's weights after every step's updates; the HF path (transformers.generate) is the default and
    the reference"""
    vllm_gpu_memory_utilization: float = 0.3
    """--vllm on a GPU: the share of the device's memory the engine takes (weights + KV cache)"""
    vllm_max_model_len: int | None = None
    """--vllm: the engine's longest prompt + completion (default: the model's context)"""
    vllm_sleep: bool = False
    """--vllm on a GPU: free the engine's KV cache and weights while the policy trains, wake it for rollouts"""
    stop_token: str | None = None
    """also end completions at this token (its text, e.g. a newline), as if it were EOS"""
    generation_batch_size: int | None = None
    """completions per generate call in each process (default: all of the process's completions of the step);
    call k of process r samples with the seed derived from (seed, step, its global index), the same for any process
    count"""
    generation_max_tokens: int | None = None
    """tokens of KV cache per generate call in each process, counted as rows x (longest prompt + max new tokens):
    a call of --generation-batch-size rows that does not fit is split into parts that do (part j of call k seeded
    from (seed, step, k, j)); evaluation uses the same bound; 0: none. Default: on a GPU, half of the memory free
    once the models are loaded, less the gradients and optimizer state still to come, over the model's KV bytes
    per token, resolved at the start and saved in args.json (a resume batches the same way); on a CPU, none.
    Not used with --vllm (the engine sizes its own KV cache)"""
    missing_eos_penalty: float | None = None
    """subtract this from the score of completions that never end (no EOS or stop token within the budget)"""
    # PPO
    max_steps: int = 100
    """steps (rollout batches)"""
    ppo_epochs: int = 4
    """passes over each rollout batch"""
    num_minibatches: int = 1
    """optimizer steps per pass (the rollout batch is cut into this many minibatches)"""
    micro_batch_size: int = 64
    """completions per forward/backward inside a minibatch, in each process (gradient accumulation)"""
    learning_rate: float = 3e-5
    """AdamW learning rate of policy and value model (constant after warmup)"""
    warmup_steps: int = 5
    """linear warmup of the learning rate (in rollout steps)"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm (policy and value together)"""
    kl_coef: float = 0.3
    """initial coefficient of the per-token KL penalty (the tiny world's reward model is hacked at 0.05; docs/ppo.md)"""
    target_kl: float | None = None
    """adaptive KL controller (Ziegler et al. 2019): steer the per-sequence KL to this value (None: fixed kl_coef)"""
    kl_horizon: int = 10000
    """adaptive KL controller horizon, in samples"""
    gamma: float = 1.0
    """discount over completion tokens"""
    lam: float = 0.95
    """GAE lambda"""
    cliprange: float = 0.2
    """policy ratio clip"""
    cliprange_value: float = 0.2
    """value clip around the rollout-time values"""
    vf_coef: float = 0.1
    """weight of the value loss"""
    whiten_rewards: bool = False
    """whiten the per-token rewards over the batch before GAE"""
    # evaluation and checkpoints
    eval_every: int = 25
    """evaluate every N steps (0: only before the first and after the last step)"""
    eval_reward_fn: str | None = None
    """verifier of the greedy evaluation: tiny_world | math | format | module:function (default: the run's
    --reward-fn; eval/accuracy = its mean reward on the target skill)"""
    eval_max_new_tokens: int | None = None
    """generation budget of the evaluation (default: --max-new-tokens)"""
    eval_batch_size: int = 128
    """prompts per generate call in the greedy evaluation (lower it for large models and long answers)"""
    kl_prompts: int = 64
    """eval/kl_to_init, the KL of the model to the initial one: over the first N held-out target-skill prompts of
    --eval-prompts, on the model's own samples (0: off; see common/drift.py)"""
    kl_samples: int = 4
    """eval/kl_to_init: completions sampled per prompt (temperature 1, the same seed at every evaluation)"""
    save_every: int = 0
    """write checkpoints/step_N (policy, value model, optimizer, adaptive KL coefficient, RNG) every N steps for
    --resume (0: only final/ and value_model/)"""
    resume: str | None = None
    """a run directory (its newest checkpoint) or a checkpoint directory to continue from"""


# ALGO LOGIC: the algorithm as pure functions


def kl_penalized_rewards(logps, ref_logps, mask, scores, kl_coef):
    """Per-token rewards (B, L): -kl_coef * (logp - ref_logp) on every completion token, the score (B,) added at the
    last completion token; 0 on padding. Returns (rewards, non_score_rewards)."""
    mask = mask.float()
    non_score = -kl_coef * (logps - ref_logps) * mask  # (B, L)
    rewards = non_score.clone()
    last = (mask.sum(1).long() - 1).clamp_min(0)  # (B,) index of the last real token (masks are 1..EOS, then 0)
    rows = torch.arange(len(last), device=rewards.device)
    rewards[rows, last] += scores * (mask.sum(1) > 0)
    return rewards, non_score


def gae(rewards, values, mask, gamma, lam):
    """Generalized advantage estimation over completion tokens. rewards, values, mask (B, L); after the last real
    token the value is 0. Returns (advantages (B, L), returns = advantages + values), 0 on padding."""
    mask = mask.float()
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    L = rewards.shape[1]
    for t in reversed(range(L)):
        next_values = values[:, t + 1] if t + 1 < L else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages[:, t] = last_gae
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def ppo_policy_loss(logps, old_logps, advantages, cliprange):
    """Per-token clipped surrogate (B, L) and whether the clipped branch is the active one."""
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def ppo_value_loss(values, old_values, returns, cliprange_value):
    """Per-token clipped value loss (B, L): 0.5 max((V - R)^2, (V_clipped - R)^2), and whether the clip is active."""
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped, clipped = (values - returns) ** 2, (v_clipped - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), clipped > unclipped


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, horizon: int, n_samples: int) -> float:
    """Ziegler et al.'s proportional controller: kl_coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon."""
    error = min(max(kl / target - 1, -0.2), 0.2)
    return kl_coef * (1 + error * n_samples / horizon)


# PLUMBING


def token_values(value_model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """V(s_t) for each completion token t: the value head on the hidden state just before t. (B, L) fp32."""
    return dist.root_forward(value_model, _token_values, prompt_ids, prompt_mask, completion_ids, completion_mask)


def _token_values(value_model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    hidden = value_model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state  # (B, P+L, H)
    P, L = prompt_ids.shape[1], completion_ids.shape[1]
    return value_model.score(hidden[:, P - 1 : P + L - 1]).squeeze(-1).float()


def masked_moments(x, mask) -> tuple[float, float]:
    """Mean and unbiased variance of x over mask == 1, over every process's batch. Naive (one process):
    `v = x[mask.bool()]; v.mean(), v.var()`."""
    n, total = dist.all_reduce([float(mask.sum()), float((x * mask).sum())])
    mean = total / max(n, 1.0)
    squares = dist.all_reduce(float(((x - mean) ** 2 * mask).sum()))
    return mean, squares / max(n - 1, 1.0)


def whiten(x, mask, shift_mean=True, eps=1e-8):
    """(x - mean) / std over mask == 1 of every process's batch; with shift_mean=False the mean is added back."""
    mean, var = masked_moments(x, mask)
    whitened = (x - mean) * (var + eps) ** -0.5
    return whitened if shift_mean else whitened + mean


def apply_stop_token(completion_ids, completion_mask, stop_id):
    """End completions at the first `stop_id` (kept, like EOS): mask what follows. Returns (mask, stopped (B,))."""
    is_stop = (completion_ids == stop_id) & completion_mask.bool()
    stopped = is_stop.any(1)
    first = torch.where(stopped, is_stop.float().argmax(1), completion_ids.shape[1])
    keep = torch.arange(completion_ids.shape[1], device=completion_ids.device)[None, :] <= first[:, None]
    return completion_mask * keep, stopped


@torch.no_grad()
def reward_model_scores(reward_model, rm_tokenizer, prompts, completions, micro_batch_size, device) -> torch.Tensor:
    """Score (prompt, completion text) pairs with the reward model, rendered with its own tokenizer and chat template
    exactly as reward_model.py rendered its training pairs. Returns (B,) fp32 on `device`."""
    examples = []
    for p, c in zip(prompts, completions):
        prompt = [{"role": "user", "content": p}] if isinstance(p, str) else p
        ids, _ = tokenize_pair_side(rm_tokenizer, prompt, [{"role": "assistant", "content": c}])
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * len(ids)})
    scores = []
    for s in range(0, len(examples), micro_batch_size):
        batch = collate(examples[s : s + micro_batch_size], rm_tokenizer.pad_token_id)
        scores.append(
            last_token_scores(reward_model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
        )
    return torch.cat(scores)


def main(args: Args) -> None:
    # PLUMBING: check flags and inputs before any compute
    dist.init()  # torchrun: join the other processes (nothing for `python ppo.py`)
    args, ckpt, run_dir = open_run(args, SCRIPT)  # a new run directory, or --resume's run and saved flags
    if args.vllm:
        require_vllm()  # one line naming the install command, before anything is loaded
    data_opts = data_options(args)  # --columns, --prompt-template, --dataset-weights: checked now
    rank_prompts = dist.local_slice(args.prompts_per_step, "--prompts-per-step")
    world = dist.world_size()
    n = args.prompts_per_step * args.group_size // world  # this process's completions per step
    if n % args.num_minibatches:
        die(f"--num-minibatches {args.num_minibatches} does not divide the rollout batch ({n} completions)")
    if (n // args.num_minibatches) % args.micro_batch_size and args.micro_batch_size < n // args.num_minibatches:
        die(f"--micro-batch-size {args.micro_batch_size} does not divide the minibatch ({n // args.num_minibatches})")
    gen_batch = args.generation_batch_size or n
    if n % gen_batch:
        die(f"--generation-batch-size {gen_batch} must divide each process's completions per step ({n})")
    if args.target_kl is not None and args.target_kl <= 0:
        die(f"--target-kl must be positive, got {args.target_kl}")
    use_rm = not args.reward_fn
    weights = args.reward_weights or [1.0] * len(args.reward_fn)
    if len(weights) != len(args.reward_fn):
        die(f"--reward-weights has {len(weights)} values for {len(args.reward_fn)} --reward-fn")
    reward_fns = [load_reward_fn(spec) for spec in args.reward_fn]
    eval_reward = eval_reward_fn(args.eval_reward_fn, args.reward_fn or None, weights)  # the verifier of eval/accuracy
    fields = ("prompt",) if use_rm else ("prompt", "answer")
    train_sources = [load_prompts(source, fields, data_opts) for source in args.dataset]
    eval_records = (
        load_prompts(args.eval_prompts, ("prompt", "answer"), data_opts, "--eval-prompts") if args.eval_prompts else []
    )
    if reward_fns:
        check_reward_fns(args.reward_fn, reward_fns, weights, train_sources[0])  # a broken function fails now
    tokenizer = load_tokenizer(args.model, args.chat_template_kwargs)
    train, eval_records = fit_rollout_prompts(train_sources, eval_records, tokenizer, args)  # over-long: dropped
    prompts = train.items  # every source's prompts, concatenated; `train.indices` draws the steps
    value_init = args.value_init if args.value_init != "auto" else ("reward_model" if use_rm else "policy")
    if value_init == "reward_model" and not use_rm and args.reward_model in ("", None):
        die("--value-init reward_model needs --reward-model")
    torch.manual_seed(args.seed)

    vocab = len(tokenizer)  # sampling and log-probs are over the tokenizer's ids (heads may have padding rows)
    stop_id = None
    if args.stop_token is not None:
        stop_ids = tokenizer(args.stop_token, add_special_tokens=False)["input_ids"]
        if len(stop_ids) != 1:
            die(f"--stop-token {args.stop_token!r} is {len(stop_ids)} tokens for this tokenizer; it must be one")
        stop_id = stop_ids[0]
    policy = load_model(
        str(ckpt) if ckpt else args.model,
        dtype=args.dtype,
        gradient_checkpointing=args.gradient_checkpointing,
        attn_implementation=args.attn_implementation,
        sharded_load=True,  # torchrun: each process reads only its shards (in dist.wrap)
    )
    policy = dist.wrap(policy, train=True)  # torchrun: FSDP2 shards, one process: unchanged
    device = next(policy.parameters()).device
    # --vllm: the rollout engine, holding a copy of the policy's weights (pushed after every step's updates)
    correction = args.is_correction if args.is_correction != "auto" else ("tis" if args.vllm else "none")
    engine = rollout_engine(args, ckpt, policy, tokenizer)
    sample = engine.generate if engine is not None else functools.partial(generate, policy)
    ref = (
        load_model(
            args.model, dtype=args.dtype, device=device, attn_implementation=args.attn_implementation, sharded_load=True
        )
        .eval()
        .requires_grad_(False)
    )
    ref = dist.wrap(ref, train=False, shard=args.shard_frozen)
    reward_model = rm_tokenizer = None
    if use_rm:
        rm_tokenizer = load_tokenizer(args.reward_model, args.chat_template_kwargs)
        reward_model = load_model(
            args.reward_model,
            dtype=args.dtype,
            device=device,
            model_class=AutoModelForSequenceClassification,
            attn_implementation=args.attn_implementation,
            sharded_load=True,
        )
        reward_model.eval().requires_grad_(False)
        reward_model = dist.wrap(reward_model, train=False, shard=args.shard_frozen)
    value_source = args.reward_model if value_init == "reward_model" else args.model
    value_model = load_model(
        str(ckpt / "value_model") if ckpt else value_source,
        dtype=args.dtype,
        device=device,
        gradient_checkpointing=args.gradient_checkpointing,
        model_class=AutoModelForSequenceClassification,
        num_labels=1,
        attn_implementation=args.attn_implementation,
        sharded_load=True,
    )
    value_model = dist.wrap(value_model, train=True)
    if value_init == "policy" and not ckpt:
        with torch.no_grad():  # a fresh head that starts at V = 0 (no prior on the scores)
            value_model.score.weight.zero_()
    policy.train()
    value_model.train()
    optimizer = torch.optim.AdamW(
        [*policy.parameters(), *value_model.parameters()], lr=args.learning_rate, fused=device.type == "cuda"
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, args.warmup_steps, 0, "constant"))
    trained = torch.nn.ModuleDict({"policy": policy, "value_model": value_model})  # what the optimizer updates
    resumed = load_trainer_state(ckpt, optimizer, scheduler, trained) if ckpt else {"step": 0, "extra": {}}
    start_step = resumed["step"]
    if args.generation_max_tokens is None:  # auto: from the memory free now; saved, so a resume batches alike
        budget = 0 if args.vllm else generation_token_budget(policy, device, optimizer)
        args = update_args(run_dir, SCRIPT, args, generation_max_tokens=budget)
    drift = Drift(  # eval/kl_to_init against the reference the KL penalty already keeps on the accelerator
        args,
        eval_records,
        device,
        args.eval_max_new_tokens or args.max_new_tokens,
        initial=ref,
        on_accelerator=True,
        max_tokens=args.generation_max_tokens,
    )
    tracker = Tracker(run_dir, args, script=SCRIPT, total_steps=args.max_steps, start_step=start_step)
    tracker.write(
        f"run: {run_dir}  |  {len(prompts)} prompts, {n * world} completions/step"
        + (f" ({n} in each of {world} processes)" if world > 1 else "")
        + f", {args.ppo_epochs} epochs x "
        f"{args.num_minibatches} minibatches  |  scores from "
        + (f"reward model {args.reward_model}" if use_rm else f"reward functions {', '.join(args.reward_fn)}")
        + f"  |  value model from {value_init.replace('_', ' ')} ({value_source})"
        + (f"  |  resumed at step {start_step} from {ckpt}" if ckpt else "")
    )
    tracker.write(train.describe(data_opts))

    def evaluation() -> dict:
        if not eval_records:
            return {}
        metrics = evaluate(
            policy,
            tokenizer,
            eval_records,
            reward_fn=eval_reward,
            target_skill=args.target_skill,
            batch_size=args.eval_batch_size,
            max_new_tokens=args.eval_max_new_tokens or args.max_new_tokens,
            max_tokens=args.generation_max_tokens,
            engine=engine,
        )
        return {**metrics, **drift(policy, tokenizer)}  # eval/kl_to_init, eval/weight_drift

    if start_step == 0:  # every run shows its starting point
        start = evaluation()
        tracker.log(start, step=0)
        tracker.write("step 0: " + "  ".join(f"{k}={v:.4f}" for k, v in start.items()))

    kl_coef = resumed["extra"].get("kl_coef", args.kl_coef)  # the adaptive controller's state (--target-kl)

    def save_ppo_checkpoint(step: int, kl_coef: float) -> None:
        def write(d):  # the policy in the checkpoint itself, the value model beside it
            save_model(policy, tokenizer, d, sync=False)  # save_checkpoint flushes the whole directory
            save_model(value_model, tokenizer, d / "value_model", sync=False)

        save_checkpoint(
            run_dir, step, policy, tokenizer, optimizer, scheduler, {"kl_coef": kl_coef}, write, state_model=trained
        )

    mb_size = min(args.micro_batch_size, n // args.num_minibatches)
    for step in range(start_step, args.max_steps):
        t0 = time.time()
        # ROLLOUT: prompts and samples depend only on (seed, step)
        policy.eval()
        batch = [prompts[i] for i in train.indices(args.prompts_per_step, step, args.seed)[rank_prompts]]
        out = sample(
            tokenizer,
            [r["prompt"] for r in batch],
            n=args.group_size,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            batch_size=gen_batch,
            max_tokens=args.generation_max_tokens,
            seed_key=(args.seed, step, 0),
        )
        prompt_ids, prompt_mask, completion_ids = out["prompt_ids"], out["prompt_mask"], out["completion_ids"]
        mask, texts, ended = out["completion_mask"], out["texts"], ~out["truncated"]
        if stop_id is not None:
            mask, stopped = apply_stop_token(completion_ids, mask, stop_id)
            ended = ended | stopped
            texts = tokenizer.batch_decode(
                completion_ids * mask + tokenizer.pad_token_id * (1 - mask), skip_special_tokens=True
            )
        gen_s = time.time() - t0
        if engine is not None:
            engine.release()  # --vllm-sleep: the engine's memory is the trainer's until the next push
        prompt_list = [r["prompt"] for r in batch for _ in range(args.group_size)]

        # SCORES: the reward model (or verifiable reward functions); an optional penalty for never ending
        if use_rm:
            scores = reward_model_scores(reward_model, rm_tokenizer, prompt_list, texts, mb_size, device)
        else:
            answers = [r["answer"] for r in batch for _ in range(args.group_size)]
            rewards = compute_rewards(args.reward_fn, reward_fns, weights, prompt_list, texts, answers)[0]
            scores = torch.tensor(rewards, dtype=torch.float32, device=device)  # (n,)
        raw_scores = scores.clone()
        if args.missing_eos_penalty is not None:
            scores = scores - args.missing_eos_penalty * (~ended.to(device)).float()

        # LOG-PROBS AND VALUES of the rollout (no grad), micro-batched
        seqs = [prompt_ids, prompt_mask, completion_ids, mask]
        old_logps, ref_logps, old_values = [], [], []
        with torch.no_grad():
            value_model.eval()
            for s in range(0, n, mb_size):
                part = [x[s : s + mb_size].to(device) for x in seqs]
                old_logps.append(completion_logprobs(policy, *part, args.temperature, vocab=vocab).float())
                ref_logps.append(completion_logprobs(ref, *part, args.temperature, vocab=vocab).float())
                old_values.append(token_values(value_model, *part))
            value_model.train()
        old_logps, ref_logps, old_values = (torch.cat(x) for x in (old_logps, ref_logps, old_values))  # (n, L)
        mask_d = mask.to(device).float()
        sampler_logps = out["sampler_logps"].to(device)  # (n, L) what the sampler drew each token with
        # the sampler/trainer mismatch correction of the policy loss (all 1 with --is-correction none)
        is_weights, _ = rollout_correction(old_logps, sampler_logps, mask_d, correction, args.is_cap)

        # ALGO LOGIC: KL-penalized per-token rewards, GAE, whitened advantages
        rewards, non_score = kl_penalized_rewards(old_logps, ref_logps, mask_d, scores, kl_coef)
        if args.whiten_rewards:
            rewards = whiten(rewards, mask_d, shift_mean=False) * mask_d
        advantages, returns = gae(rewards, old_values, mask_d, args.gamma, args.lam)
        advantages = whiten(advantages, mask_d) * mask_d

        # PPO UPDATES: ppo_epochs x num_minibatches optimizer steps; each minibatch's token-mean loss is accumulated
        # over micro-batches with the minibatch's token count as the normalizer
        policy.train()
        t1 = time.time()
        stats = {
            k: []
            for k in ("loss", "pg_loss", "vf_loss", "clip_frac", "vf_clip_frac", "approx_kl", "entropy", "grad_norm")
        }
        train_tokens = torch.zeros((), device=device)  # statistics stay on the device: one sync per optimizer step
        minibatch = n // args.num_minibatches
        for epoch in range(args.ppo_epochs):
            order = torch.randperm(
                n, generator=torch.Generator().manual_seed(derive_seed(args.seed, "minibatch", step, epoch))
            )
            for m0 in range(0, n, minibatch):
                rows = order[m0 : m0 + minibatch]
                n_tok = max(1.0, dist.all_reduce(float(mask_d[rows].sum())))  # the minibatch's, over all processes
                names = ("pg_loss", "vf_loss", "clip_frac", "vf_clip_frac", "approx_kl", "entropy")
                sums = torch.zeros(len(names), dtype=torch.float64, device=device)
                for u0 in range(0, len(rows), mb_size):
                    mb = rows[u0 : u0 + mb_size]
                    part = [x[mb].to(device) for x in seqs]
                    m = mask_d[mb]
                    logps, entropy = completion_logprobs(
                        policy, *part, args.temperature, return_entropy=True, vocab=vocab
                    )
                    values = token_values(value_model, *part)
                    pg, pg_clipped = ppo_policy_loss(logps, old_logps[mb], advantages[mb], args.cliprange)
                    vf, vf_clipped = ppo_value_loss(values, old_values[mb], returns[mb], args.cliprange_value)
                    pg_loss, vf_loss = (pg * is_weights[mb] * m).sum() / n_tok, (vf * m).sum() / n_tok
                    (pg_loss + args.vf_coef * vf_loss).backward()
                    with torch.no_grad():
                        sums += torch.stack(
                            [
                                pg_loss,
                                vf_loss,
                                (pg_clipped * m).sum() / n_tok,
                                (vf_clipped * m).sum() / n_tok,
                                (0.5 * (logps - old_logps[mb]) ** 2 * m).sum() / n_tok,
                                (entropy * m).sum() / n_tok,
                            ]
                        ).double()
                        train_tokens += part[1].sum() + part[3].sum()
                sums = dict(zip(names, dist.all_reduce(sums).tolist()))  # the step's one host sync
                grad_norm = dist.grad_norm(
                    torch.nn.utils.clip_grad_norm_(
                        [*policy.parameters(), *value_model.parameters()], args.max_grad_norm
                    )
                )
                tracker.check_finite(sums["pg_loss"] + args.vf_coef * sums["vf_loss"], grad_norm, step + 1)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                for k, v in sums.items():
                    stats[k].append(v)
                stats["loss"].append(sums["pg_loss"] + args.vf_coef * sums["vf_loss"])  # what backward saw
                stats["grad_norm"].append(grad_norm)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        if engine is not None:
            engine.push(policy)  # the next rollout (and this step's evaluation) samples the updated policy
        train_tokens = dist.all_reduce(float(train_tokens))
        train_s = time.time() - t1

        # METRICS (over every process's rollouts); then the adaptive KL controller sees this batch's KL
        kl_per_seq = dist.all_gather(((old_logps - ref_logps) * mask_d).sum(1))  # (N,) k1 summed over a completion
        non_score_per_seq = dist.all_gather(non_score.sum(1))
        all_scores, raw_scores = dist.all_gather(scores.to(device)), dist.all_gather(raw_scores)
        value_mean, _ = masked_moments(old_values, mask_d)
        returns_mean, returns_var = masked_moments(returns, mask_d)
        explained = 1 - masked_moments(returns - old_values, mask_d)[1] / max(returns_var, 1e-8)
        lengths = dist.all_gather(mask.sum(1).float())
        metrics = {
            **logprob_mismatch(sampler_logps, old_logps, mask_d),
            **correction_metrics(old_logps, sampler_logps, mask_d, correction, args.is_cap),
            "rollout/score_mean": raw_scores.mean().item(),
            "rollout/score_std": raw_scores.std().item() if len(raw_scores) > 1 else 0.0,
            "rollout/reward_mean": (all_scores + non_score_per_seq).mean().item(),
            "rollout/completion_len": lengths.mean().item(),
            "rollout/no_eos_frac": dist.all_gather((~ended).float()).mean().item(),
            "train/kl": kl_per_seq.mean().item(),
            "train/kl_coef": kl_coef,
            "train/non_score_reward": non_score_per_seq.mean().item(),
            **{f"train/{k}": sum(v) / len(v) for k, v in stats.items()},
            "train/value_mean": value_mean,
            "train/returns_mean": returns_mean,
            "train/explained_variance": explained,
            "train/lr": lr,
            **train.shares(args.prompts_per_step, step, args.seed),
            "perf/gen_tokens_per_s": float(lengths.sum()) / max(gen_s, 1e-9),
            "perf/train_tokens_per_s": train_tokens / max(train_s, 1e-9),
            "perf/step_s": time.time() - t0,
            "perf/gen_share": gen_s / max(time.time() - t0, 1e-9),  # of the step: sampling and rewards
            "perf/peak_mem_gb": peak_memory_gb(device),
        }
        if not use_rm:
            metrics["rollout/reward/" + "+".join(args.reward_fn)] = raw_scores.mean().item()
        if args.target_kl is not None:
            kl_coef = adaptive_kl_coef(kl_coef, metrics["train/kl"], args.target_kl, args.kl_horizon, n * world)
        done = step + 1
        if done == args.max_steps or (args.eval_every and done % args.eval_every == 0):
            metrics.update(evaluation())
        tracker.log(metrics, step=done)
        tracker.step()
        if args.save_every and done % args.save_every == 0 and done < args.max_steps:
            save_ppo_checkpoint(done, kl_coef)

    final = save_model(policy, tokenizer, run_dir / "final")
    save_model(value_model, tokenizer, run_dir / "value_model")
    if args.save_every and args.max_steps % args.save_every == 0 and args.max_steps > start_step:
        save_ppo_checkpoint(args.max_steps, kl_coef)
    tracker.close()
    last = {k: v for k, v in metrics.items() if k.startswith("eval/")} if args.max_steps > start_step else {}
    if dist.is_main():
        print(
            f"saved {final} (and the value model in {run_dir / 'value_model'})"
            + ("  |  " + "  ".join(f"{k}={v:.4f}" for k, v in last.items()) if last else "")
        )


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__.split("\n\n")[0]))  # --help opens with what the script does
