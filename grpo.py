"""GRPO: reinforcement learning with verifiable rewards and group-relative advantages (DeepSeekMath, arXiv 2402.03300).

Each step samples `prompts_per_step` prompts, `group_size` completions each, scores them with verifiable reward
functions and normalizes each reward within its group:

    A_i = (r_i - mean(r_group)) / (std(r_group) + eps)                               (--scale-rewards group)
    loss = agg_t [ -min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i) + beta * k3_t ]
    rho_t = pi(y_t | .) / pi_old(y_t | .),   k3_t = pi_ref/pi - log(pi_ref/pi) - 1       (Schulman's k3 estimator)

    python grpo.py                                                      # the tiny world, a few minutes on a CPU
    python grpo.py --model Qwen/Qwen3-0.6B --dataset gsm8k.jsonl --reward-fn math --group-size 8 \\
        --prompts-per-step 32 --max-new-tokens 512 --micro-batch-size 8 --eval-prompts gsm8k_test.jsonl

Variants (each a flag, each a pure function below with its formula): `--importance-sampling-level sequence` is GSPO
(arXiv 2507.18071: one clipped ratio per completion); `--loss-type cispo` is MiniMax-M1's CISPO (arXiv 2506.13585: a
clipped, stop-gradient weight on a REINFORCE term); `--advantage rloo | reinforce++` replace the group-mean baseline;
`--overlong-buffer` is DAPO's soft overlong punishment; `--reward-fn math` uses math-verify when it is installed.

Departures and choices (each a flag): `--loss-agg token-mean` by default (DAPO, arXiv 2503.14476), where the paper
averages per sequence first (`seq-mean-token-mean`); `--scale-rewards none` with `seq-mean-token-sum-norm` is
Dr. GRPO (arXiv 2503.20783); `--epsilon-high` is DAPO's clip-higher; `--beta 0` (the default, as in DAPO and Dr.
GRPO) loads no reference model on the accelerator: the KL to the initial policy is then measured every
`--kl-every` steps with a frozen copy of the initial policy kept in host memory and streamed to the accelerator for
each probe (one forward over the rollout in the compute dtype).

Multi-turn (`--env calculator | module:factory`, protocol in common/environments.py): each completion is an episode
of up to `--max-turns` assistant turns, the environment replying after each (tool results, a user turn) until it ends
the episode with a reward or hands the last turn to `--reward-fn`. The episode is kept as tokens (the sampled ones
as sampled, the environment's rendered by the chat template for those messages alone), and only the sampled tokens
are in the loss and the KL:

    python grpo.py --env calculator --model assets/tiny-tool --dataset assets/data/tool_prompts.jsonl \\
        --eval-prompts assets/data/tool_eval.jsonl --target-skill multiply --max-new-tokens 96 --max-turns 3 \\
        --max-episode-tokens 160 --max-steps 100 --eval-every 20       # the tiny world's tool skill, ~7 min on a CPU

Under `torchrun --nproc_per_node=N grpo.py ...` each process samples and trains on prompts_per_step / N whole
groups (a group never straddles processes), with the loss normalized over all processes' tokens.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import tyro

from common import die, dist
from common.data import check_batch_sizes, data_options, fit_rollout_prompts, load_prompts
from common.drift import Drift
from common.environments import check_env, load_env, make_envs, run_episodes
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
    load_model,
    load_tokenizer,
    load_trainer_state,
    lr_lambda,
    offload_to_host,
    on_device,
    resolve_dtype,
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
    """the run's name; if not given: grpo__{seed}__{unix time}"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works)"""
    wandb_project: str = "cleanpost"
    """the wandb project"""
    wandb_entity: str | None = None
    """the wandb entity (team)"""
    # model
    model: str = "assets/tiny-base"
    """hub id or local directory of the policy to train (e.g. an sft.py checkpoint: runs/<run>/final)"""
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
    # data and rewards
    dataset: tuple[str, ...] = ("assets/data/prompts.jsonl",)
    """training data, one or more sources (mixed by --dataset-weights) of {prompt, answer} records (prompt: string or
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
    """held-out {prompt, answer, skill} records for greedy accuracy ('' to skip; any source --dataset takes, one of
    them)"""
    target_skill: str = TARGET_SKILL
    """the skill reported as eval/accuracy; the other skills make eval/general_accuracy"""
    reward_fn: list[str] = field(default_factory=lambda: ["tiny_world"])
    """reward functions: built-in tiny_world | math (math-verify when installed: pip install -e ".[math]"; else a
    hand-written GSM8K-style number check) | format, or module:function; several are summed"""
    reward_weights: list[float] | None = None
    """one weight per --reward-fn (default: all 1)"""
    # rollouts
    prompts_per_step: int = 16
    """prompts sampled per step"""
    group_size: int = 8
    """completions per prompt (G)"""
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
    env: str | None = None
    """multi-turn episodes: the built-in calculator (integer arithmetic through Hermes/Qwen <tool_call> JSON) or
    module:factory, one environment per prompt record that replies after each assistant turn (tool results, a user
    turn) or ends the episode with a reward (None: --reward-fn scores the last assistant turn); see
    common/environments.py. --max-new-tokens is then the budget of each turn"""
    max_turns: int = 4
    """--env: assistant turns per episode at most (an episode the environment has not ended by then is truncated)"""
    max_episode_tokens: int | None = None
    """--env: an episode's tokens after its prompt, sampled and the environment's (default --max-turns x
    --max-new-tokens); an episode that would pass it ends, truncated"""
    env_timeout: float = 30.0
    """--env: seconds one environment call may take before the run stops, naming it and the record (0: no limit)"""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards have zero spread and sample more prompts until the batch is full"""
    max_resample_rounds: int = 4
    """with --dynamic-sampling: extra sampling rounds per step before training on what there is"""
    generation_batch_size: int | None = None
    """completions per generate call in each process (default: all of the process's completions of the step);
    call k of process r samples with the seed derived from (seed, step, round, its global index), so any process
    count gives the same completions when this is the same"""
    generation_max_tokens: int | None = None
    """tokens of KV cache per generate call in each process, counted as rows x (longest prompt + max new tokens):
    a call of --generation-batch-size rows that does not fit is split into parts that do (part j of call k seeded
    from (seed, step, k, j)); evaluation uses the same bound; 0: none. Default: on a GPU, half of the memory free
    once the models are loaded, less the gradients and optimizer state still to come, over the model's KV bytes
    per token, resolved at the start and saved in args.json (a resume batches the same way); on a CPU, none.
    Not used with --vllm (the engine sizes its own KV cache)"""
    # optimization
    max_steps: int = 150
    """steps (rollout batches)"""
    batch_size: int | None = None
    """completions per optimizer step over all processes (default: the whole rollout batch, prompts_per_step *
    group_size)"""
    micro_batch_size: int = 64
    """completions per forward/backward in each process; accumulation steps = batch_size / N / micro_batch_size"""
    learning_rate: float = 1e-4
    """AdamW learning rate (constant after warmup)"""
    warmup_steps: int = 5
    """linear warmup of the learning rate"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this (train/grad_norm is logged before clipping)"""
    # algorithm
    num_iterations: int = 1
    """policy updates per rollout batch (mu); >1 makes the importance ratio and clipping matter"""
    loss_type: Literal["grpo", "cispo"] = "grpo"
    """grpo: PPO's clipped surrogate, -min(rho A, clip(rho) A); cispo (MiniMax-M1): -sg(min(rho, --cispo-max-weight))
    A log pi, a clipped constant weight on a REINFORCE term, so clipping drops no token's gradient"""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """token: one ratio rho_t per token; sequence: GSPO, one ratio per completion, exp of the mean token log-ratio,
    clipped per completion (with GSPO's clip range and per-sequence averaging as the defaults below)"""
    epsilon: float | None = None
    """lower clip range of --loss-type grpo: ratio >= 1 - epsilon (default 0.2; 3e-4 with
    --importance-sampling-level sequence, GSPO's)"""
    epsilon_high: float | None = None
    """upper clip range of --loss-type grpo: ratio <= 1 + epsilon_high (clip-higher, see DAPO; = epsilon for symmetric
    PPO clipping; default 0.28; 4e-4 with --importance-sampling-level sequence, GSPO's)"""
    cispo_max_weight: float = 5.0
    """--loss-type cispo: the cap of the importance weight, min(rho, this) (ScaleRL's eps_max; no lower bound)"""
    beta: float = 0.0
    """KL penalty coefficient (k3 to the reference); 0 loads no reference model on the accelerator"""
    shard_frozen: bool = False
    """under torchrun with --beta > 0: shard the reference with FSDP2 (1/N of its memory per GPU, an all-gather per
    forward) instead of a full copy per GPU"""
    kl_every: int = 10
    """with --beta 0: measure the KL to the initial policy every N steps (its weights wait in host memory and visit
    the accelerator for one forward over the rollout; 0 disables)"""
    advantage: Literal["group", "rloo", "reinforce++"] = "group"
    """the baseline: group = r - mean of the group (GRPO); rloo = r - mean of the group's other completions
    (leave-one-out); reinforce++ = (r - batch mean) / batch std over all completion tokens, no group statistics"""
    scale_rewards: Literal["group", "batch", "none"] | None = None
    """divide group/rloo advantages by the group std (GRPO), the batch std, or nothing (Dr. GRPO); default: group
    for --advantage group, none for rloo (reinforce++ normalizes by the batch itself)"""
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] | None = None
    """token-mean (DAPO), seq-mean-token-mean (original GRPO), seq-mean-token-sum-norm (Dr. GRPO: / max_new_tokens);
    default: token-mean, or seq-mean-token-mean with --importance-sampling-level sequence (GSPO's objective)"""
    mask_truncated: bool = False
    """drop completions cut at max_new_tokens from the loss (DAPO overlong filtering)"""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment: the last N tokens of --max-new-tokens cost a reward penalty growing linearly
    to --overlong-penalty at the budget (0: off); logged as rollout/overlong_penalty"""
    overlong_penalty: float = 1.0
    """the penalty at the budget (a completion cut at --max-new-tokens gets -this), with --overlong-buffer"""
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
    """write checkpoints/step_N every N steps for --resume (0: only final/)"""
    resume: str | None = None
    """a run directory (its newest checkpoint) or a checkpoint directory to continue from"""


# ALGO LOGIC: the algorithm as pure functions


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str, eps: float = 1e-4, batch_rewards: torch.Tensor | None = None
) -> torch.Tensor:
    """rewards (B*G,), prompt-major -> advantages (B*G,). A zero-spread group gets 0 advantage (no NaN).
    `batch_rewards`: what the `batch` scale's std is taken over (all processes' rewards; default `rewards`)."""
    grouped = rewards.view(-1, group_size)  # (B, G)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    return _scale(centered, grouped, rewards, scale, eps, batch_rewards)


def rloo_advantages(
    rewards: torch.Tensor, group_size: int, scale: str, eps: float = 1e-4, batch_rewards: torch.Tensor | None = None
) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024, arXiv 2402.14740): each completion's baseline is the mean reward of the other
    G - 1 completions of its prompt, A_i = r_i - 1/(G-1) sum_{j != i} r_j = G/(G-1) (r_i - mean(r_group)): an
    unbiased baseline (it does not depend on y_i). (B*G,) -> (B*G,); `scale` as in `group_advantages`."""
    grouped = rewards.view(-1, group_size)  # (B, G)
    centered = grouped - (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return _scale(centered, grouped, rewards, scale, eps, batch_rewards)


def _scale(centered, grouped, rewards, scale, eps, batch_rewards):
    if scale == "group":
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centered = centered / ((rewards if batch_rewards is None else batch_rewards).std() + eps)
    return centered.reshape(-1)


def reinforce_pp_advantages(
    rewards: torch.Tensor,
    lengths: torch.Tensor,
    eps: float = 1e-4,
    batch_rewards: torch.Tensor | None = None,
    batch_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """REINFORCE++ (Hu et al. 2025, arXiv 2501.03262) with an outcome reward: no group baseline, no group std; the
    advantage of every token is normalized over all completion tokens of the global batch,
        A_i = (r_i - mu) / (sigma + eps),  mu = sum_j len_j r_j / sum_j len_j,  sigma^2 = sum_j len_j (r_j - mu)^2 / sum_j len_j
    (each completion's reward weighted by its token count, as the paper whitens per-token advantages).
    rewards, lengths (B*G,); `batch_*`: all processes' (default: these)."""
    r = rewards if batch_rewards is None else batch_rewards
    w = (lengths if batch_lengths is None else batch_lengths).float()
    mu = (w * r).sum() / w.sum().clamp_min(1)
    sigma = ((w * (r - mu) ** 2).sum() / w.sum().clamp_min(1)).sqrt()
    return (rewards - mu) / (sigma + eps)


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), added to the reward: 0 for a completion of
    |y| <= L - buffer tokens, then linear down to -penalty at the budget L = max_new_tokens:
        R_len(y) = -penalty * (|y| - (L - buffer)) / buffer   for L - buffer < |y| <= L
    (a completion cut at the budget has |y| = L and gets -penalty). lengths (N,) -> (N,)."""
    start = max_new_tokens - buffer
    return -penalty * (lengths.float() - start).clamp(0, buffer) / buffer


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) on samples from pi: exp(d) - d - 1, d = ref - logp. >= 0."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def importance_log_ratio(logps, old_logps, mask, level: str) -> torch.Tensor:
    """log rho: per token (B, L), log pi(y_t|.) - log pi_old(y_t|.); or GSPO's per sequence (B, 1) (arXiv 2507.18071,
    eq. 7), the length-normalized sum over the sequence's tokens, log s_i = 1/|y_i| sum_t log(pi(y_t|.) / pi_old(y_t|.)).
    Its gradient spreads s_i A_i evenly over the sequence's tokens: grad s_i = s_i / |y_i| sum_t grad log pi(y_t|.)."""
    log_ratio = logps - old_logps
    if level == "token":
        return log_ratio
    mask = mask.to(log_ratio.dtype)
    return (log_ratio * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp_min(1)


def grpo_token_loss(
    logps,
    old_logps,
    advantages,
    epsilon,
    epsilon_high,
    ref_logps=None,
    beta=0.0,
    *,
    mask=None,
    level="token",
    loss_type="grpo",
    cispo_max_weight=5.0,
):
    """Per-token loss (B, L) and clip indicators (B, L). logps/old_logps/ref_logps/mask (B, L), advantages (B,).
      grpo:  -min(rho A, clip(rho, 1 - epsilon, 1 + epsilon_high) A)   (rho per token, or per sequence: GSPO)
      cispo: -sg(min(rho, cispo_max_weight)) A log pi(y_t|.)  (MiniMax-M1, arXiv 2506.13585, eq. 4: the clipped
             weight is a constant, so every token keeps its REINFORCE gradient; no lower bound, as the paper's
             eps_low is set large, and the upper bound is ScaleRL's eps_max, arXiv 2510.13786)
    plus beta * k3 to the reference per token. The indicators mark tokens whose weight the clip changed: with grpo
    their gradient is zero; with cispo it is only scaled down."""
    log_ratio = importance_log_ratio(logps, old_logps, mask, level)  # (B, L) or (B, 1)
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None]
    if loss_type == "cispo":
        loss = -torch.clamp(ratio, max=cispo_max_weight).detach() * adv * logps
        clipped_low = torch.zeros_like(ratio, dtype=torch.bool)
        clipped_high = (ratio > cispo_max_weight) & (adv > 0)
    else:
        unclipped = ratio * adv
        clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * adv
        loss = -torch.minimum(unclipped, clipped)
        clipped_low = (ratio < 1 - epsilon) & (adv < 0)  # the clip is active (gradient zero) on these tokens
        clipped_high = (ratio > 1 + epsilon_high) & (adv > 0)
    loss = loss.expand_as(logps)  # GSPO: the sequence's loss on each of its tokens (aggregated by --loss-agg)
    if beta != 0.0:
        loss = loss + beta * k3_kl(logps, ref_logps)
    return loss, clipped_low.expand_as(logps), clipped_high.expand_as(logps)


def aggregation_weights(
    mask: torch.Tensor, loss_agg: str, max_new_tokens: int, num_tokens: float | None = None, num_seqs: int | None = None
) -> torch.Tensor:
    """Per-token weights (B, L) such that loss = sum(weights * token_loss) over a whole (mini)batch is the chosen
    aggregation. Computed on the whole batch before it is cut into micro-batches, so any micro-batch size gives the
    same gradient. `num_tokens` / `num_seqs`: the batch's totals over all processes (default: this `mask`'s).
      token-mean:               1 / (tokens in the batch)
      seq-mean-token-mean:      1 / (len_i * sequences)
      seq-mean-token-sum-norm:  1 / (max_new_tokens * sequences)"""
    mask = mask.float()
    num_tokens = mask.sum() if num_tokens is None else torch.tensor(float(num_tokens), device=mask.device)
    num_seqs = mask.shape[0] if num_seqs is None else num_seqs
    if loss_agg == "token-mean":
        return mask / num_tokens.clamp_min(1)
    if loss_agg == "seq-mean-token-mean":
        return mask / (mask.sum(1, keepdim=True).clamp_min(1) * num_seqs)
    return mask / (max_new_tokens * num_seqs)


# PLUMBING


def algorithm_defaults(args: Args) -> dict:
    """The defaults that depend on other flags, checked and resolved once (saved in args.json, so a resume keeps them):
    GSPO's clip range (3e-4, 4e-4) and per-sequence averaging with --importance-sampling-level sequence, else PPO's
    (0.2, clip-higher 0.28) and DAPO's token mean; the group std for --advantage group, none for rloo."""
    seq = args.importance_sampling_level == "sequence"
    if args.loss_type == "cispo" and (args.epsilon is not None or args.epsilon_high is not None):
        die("--epsilon/--epsilon-high clip --loss-type grpo's ratio; cispo caps its weight with --cispo-max-weight")
    if args.cispo_max_weight <= 0:
        die(f"--cispo-max-weight must be positive, got {args.cispo_max_weight}")
    if args.advantage == "reinforce++" and args.scale_rewards not in (None, "none"):
        die("--advantage reinforce++ divides by the batch's std itself; --scale-rewards applies to group and rloo")
    if not 0 <= args.overlong_buffer < args.max_new_tokens:
        die(f"--overlong-buffer {args.overlong_buffer} must be in [0, --max-new-tokens {args.max_new_tokens})")
    if args.overlong_penalty < 0:
        die(f"--overlong-penalty must be >= 0 (it is subtracted), got {args.overlong_penalty}")
    values = {}
    if args.env is not None:
        if args.vllm:
            die("--env samples episodes with transformers; --vllm rollouts are single-turn for now")
        if args.overlong_buffer:
            die("--overlong-buffer is a single-turn length penalty; with --env bound episodes by --max-episode-tokens")
        if args.max_turns < 1:
            die(f"--max-turns must be at least 1, got {args.max_turns}")
        if args.max_episode_tokens is None:
            values["max_episode_tokens"] = args.max_turns * args.max_new_tokens
        elif args.max_episode_tokens < 1:
            die(f"--max-episode-tokens must be at least 1, got {args.max_episode_tokens}")
    if args.loss_type == "grpo" and args.epsilon is None:
        values["epsilon"] = 3e-4 if seq else 0.2
    if args.loss_type == "grpo" and args.epsilon_high is None:
        values["epsilon_high"] = 4e-4 if seq else 0.28
    if args.loss_agg is None:
        values["loss_agg"] = "seq-mean-token-mean" if seq else "token-mean"
    if args.scale_rewards is None:
        values["scale_rewards"] = "group" if args.advantage == "group" else "none"
    return values


SEQUENCE_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")  # a rollout's (N, ...) tensors
# completion_* cover everything after the prompt; action_mask the tokens the policy sampled (with --env: not the
# environment's replies), the only ones in the loss, the KL and the log-prob statistics
ROLLOUT_KEYS = (*SEQUENCE_KEYS, "action_mask", "truncated", "sampler_logps", "turns", "tool_calls")


@torch.no_grad()
def batched_logprobs(model, rollout, temperature, micro_batch_size, device, vocab):
    model_device = next(model.parameters()).device
    chunks = []
    for s in range(0, rollout["completion_ids"].shape[0], micro_batch_size):
        part = [rollout[k][s : s + micro_batch_size].to(model_device) for k in SEQUENCE_KEYS]
        actions = rollout["action_mask"][s : s + micro_batch_size].to(model_device)
        chunks.append(completion_logprobs(model, *part, temperature, action_mask=actions, vocab=vocab).to(device))
    return torch.cat(chunks)


def _stack_groups(groups: list[dict], pad_id: int) -> dict:
    """Concatenate groups whose prompt/completion widths may differ (prompts left-padded, completions right)."""
    P = max(g["prompt_ids"].shape[1] for g in groups)
    L = max(g["completion_ids"].shape[1] for g in groups)
    pad = torch.nn.functional.pad
    return {
        "prompt_ids": torch.cat(
            [pad(g["prompt_ids"], (P - g["prompt_ids"].shape[1], 0), value=pad_id) for g in groups]
        ),
        "prompt_mask": torch.cat([pad(g["prompt_mask"], (P - g["prompt_mask"].shape[1], 0)) for g in groups]),
        "completion_ids": torch.cat(
            [pad(g["completion_ids"], (0, L - g["completion_ids"].shape[1]), value=pad_id) for g in groups]
        ),
        "completion_mask": torch.cat(
            [pad(g["completion_mask"], (0, L - g["completion_mask"].shape[1])) for g in groups]
        ),
        "action_mask": torch.cat([pad(g["action_mask"], (0, L - g["action_mask"].shape[1])) for g in groups]),
        "sampler_logps": torch.cat([pad(g["sampler_logps"], (0, L - g["sampler_logps"].shape[1])) for g in groups]),
        "turns": torch.cat([g["turns"] for g in groups]),
        "tool_calls": torch.cat([g["tool_calls"] for g in groups]),
        "truncated": torch.cat([g["truncated"] for g in groups]),
        "overlong_penalty": torch.cat([g["overlong_penalty"] for g in groups]),
        "rewards": torch.cat([g["rewards"] for g in groups]).float(),
        "per_fn": {k: [x for g in groups for x in g["per_fn"][k]] for k in groups[0]["per_fn"]},
    }


def main(args: Args) -> None:
    # PLUMBING: check flags and inputs before any compute
    dist.init()  # torchrun: join the other processes (nothing for `python grpo.py`)
    args, ckpt, run_dir = open_run(args, SCRIPT)  # a new run directory, or --resume's run and saved flags
    args = update_args(run_dir, SCRIPT, args, **algorithm_defaults(args))  # clip ranges etc. that depend on flags
    if args.vllm:
        require_vllm()  # one line naming the install command, before anything is loaded
    data_opts = data_options(args)  # --columns, --prompt-template, --dataset-weights: checked now
    rank_prompts = dist.local_slice(args.prompts_per_step, "--prompts-per-step")  # whole groups per process
    world = dist.world_size()
    rollout_size = args.prompts_per_step * args.group_size
    sample_budget = args.max_episode_tokens if args.env else args.max_new_tokens  # sampled tokens a completion may have
    batch_size = args.batch_size or rollout_size
    if args.group_size < 2:
        die("--group-size must be at least 2 (advantages are relative to the group)")
    if rollout_size % batch_size:
        die(
            f"--batch-size {batch_size} does not divide the rollout batch (--prompts-per-step x --group-size = "
            f"{rollout_size})"
        )
    local_rollout, local_batch = rollout_size // world, batch_size // world
    if batch_size % world:
        die(f"--batch-size {batch_size} must be divisible by the number of processes ({world})")
    check_batch_sizes(local_batch, args.micro_batch_size, batch_size)
    gen_batch = args.generation_batch_size or local_rollout
    if local_rollout % gen_batch:
        die(
            f"--generation-batch-size {gen_batch} must divide each process's completions per step "
            f"({local_rollout} = --prompts-per-step x --group-size / {world} processes)"
        )
    weights = args.reward_weights or [1.0] * len(args.reward_fn)
    if len(weights) != len(args.reward_fn):
        die(f"--reward-weights has {len(weights)} values for {len(args.reward_fn)} --reward-fn")
    reward_fns = [load_reward_fn(spec) for spec in args.reward_fn]
    eval_reward = eval_reward_fn(args.eval_reward_fn, args.reward_fn, weights)  # the verifier of eval/accuracy
    train_sources = [load_prompts(source, ("prompt", "answer"), data_opts) for source in args.dataset]
    eval_records = (
        load_prompts(args.eval_prompts, ("prompt", "answer"), data_opts, "--eval-prompts") if args.eval_prompts else []
    )
    check_reward_fns(args.reward_fn, reward_fns, weights, train_sources[0])  # a broken function fails now
    tokenizer = load_tokenizer(str(ckpt) if ckpt else args.model, args.chat_template_kwargs)
    env_factory = load_env(args.env) if args.env else None
    if env_factory is not None:  # a broken environment fails now, before any model is loaded
        check_env(args.env, env_factory, train_sources[0], tokenizer, args.env_timeout)
    train, eval_records = fit_rollout_prompts(  # over-long: dropped
        train_sources, eval_records, tokenizer, args, args.max_episode_tokens if args.env else None
    )
    prompts = train.items  # every source's prompts, concatenated; `train.indices` draws the steps
    torch.manual_seed(args.seed)

    vocab = len(tokenizer)  # sampling and log-probs are over the tokenizer's ids (heads may have padding rows)
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
    # Reference: on the accelerator when it is in the loss (beta > 0); otherwise in host memory for the KL probe,
    # in the compute dtype, streamed to the accelerator for each probe.
    ref = None
    if (
        args.beta != 0 or args.kl_every or (eval_records and args.kl_prompts)
    ):  # args.model is the initial policy, also when resuming
        ref = load_model(
            args.model,
            dtype=str(resolve_dtype(args.dtype, device)).removeprefix("torch."),  # the policy's compute dtype
            device=device if args.beta != 0 else "cpu",
            attn_implementation=args.attn_implementation,
            sharded_load=args.beta != 0,  # placed by dist.wrap below
        )
        ref.eval().requires_grad_(False)
        if args.beta != 0:
            ref = dist.wrap(ref, train=False, shard=args.shard_frozen)
        else:
            ref = offload_to_host(ref)
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=args.learning_rate, weight_decay=0.0, fused=device.type == "cuda"
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, args.warmup_steps, 0, "constant"))
    start_step = load_trainer_state(ckpt, optimizer, scheduler, policy)["step"] if ckpt else 0
    if args.generation_max_tokens is None:  # auto: from the memory free now; saved, so a resume batches alike
        budget = 0 if args.vllm else generation_token_budget(policy, device, optimizer)
        args = update_args(run_dir, SCRIPT, args, generation_max_tokens=budget)
    drift = Drift(  # eval/kl_to_init against the reference (on the accelerator with --beta > 0, else from the host)
        args,
        eval_records,
        device,
        args.eval_max_new_tokens or args.max_new_tokens,
        initial=ref,
        on_accelerator=args.beta != 0,
        max_tokens=args.generation_max_tokens,
    )
    tracker = Tracker(run_dir, args, script=SCRIPT, total_steps=args.max_steps, start_step=start_step)
    tracker.write(
        f"run: {run_dir}  |  {len(prompts)} prompts, {rollout_size} completions/step, "
        f"{rollout_size // batch_size * args.num_iterations} optimizer steps/rollout, "
        f"{max(1, local_batch // args.micro_batch_size)} micro-batches/optimizer step"
        + (f" in each of {world} processes" if world > 1 else "")
        + ", "
        f"reference {'in the loss' if args.beta else 'KL probe from host memory' if ref else 'none'}  |  "
        f"loss {args.loss_type} ({args.importance_sampling_level} ratios, {args.loss_agg}), advantage {args.advantage}"
        + (f" / {args.scale_rewards} std" if args.advantage != "reinforce++" else "")
        + (f"  |  resumed at step {start_step} from {ckpt}" if ckpt else "")
    )
    tracker.write(train.describe(data_opts))

    def play(records: list[dict], max_new_tokens: int = args.max_new_tokens, **sampling) -> dict:
        # --env: one episode per record; every live episode's next turn in one batched generation
        return run_episodes(
            sample,
            tokenizer,
            args.env,
            make_envs(args.env, env_factory, records, args.env_timeout),
            records,
            max_turns=args.max_turns,
            max_new_tokens=max_new_tokens,
            max_episode_tokens=args.max_episode_tokens,
            timeout=args.env_timeout,
            max_tokens=args.generation_max_tokens,
            **sampling,
        )

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
            play=functools.partial(
                play,
                max_new_tokens=args.eval_max_new_tokens or args.max_new_tokens,
                greedy=True,
                batch_size=args.eval_batch_size,
            )
            if args.env
            else None,
        )
        return {**metrics, **drift(policy, tokenizer)}  # eval/kl_to_init, eval/weight_drift

    if start_step == 0:
        start = evaluation()
        tracker.log(start, step=0)
        tracker.write("step 0: " + "  ".join(f"{k}={v:.4f}" for k, v in start.items()))

    for step in range(start_step, args.max_steps):
        t0 = time.time()
        metrics = {}
        # ALGO LOGIC: rollouts. Prompts and sampling depend only on (seed, step), never on micro-batch size.
        policy.eval()
        groups, n_groups_seen, n_zero_std, gen_tokens = [], 0, 0, 0
        for round_ in range(1 + (args.max_resample_rounds if args.dynamic_sampling else 0)):
            idx = train.indices(args.prompts_per_step, step, args.seed + 7919 * round_)[rank_prompts]
            batch = [prompts[i] for i in idx]
            sampling = {
                "temperature": args.temperature,
                "top_p": args.top_p,
                "batch_size": gen_batch,
                "seed_key": (args.seed, step, round_),
            }
            if args.env:  # episodes, G per prompt; calls numbered as if every process had all its rows live
                rows = [r for r in batch for _ in range(args.group_size)]
                out = play(rows, first_call=dist.rank() * math.ceil(len(rows) / gen_batch), **sampling)
            else:
                out = sample(
                    tokenizer,
                    [r["prompt"] for r in batch],
                    n=args.group_size,
                    max_new_tokens=args.max_new_tokens,
                    max_tokens=args.generation_max_tokens,
                    **sampling,
                )
                out["action_mask"] = out["completion_mask"]  # one turn: every completion token was sampled
                out["turns"] = torch.ones(len(out["texts"]))
                out["tool_calls"] = torch.zeros(len(out["texts"]))
            gen_tokens += int(out["action_mask"].sum())
            answers = [r["answer"] for r in batch for _ in range(args.group_size)]
            prompt_list = [r["prompt"] for r in batch for _ in range(args.group_size)]
            rewards, per_fn = compute_rewards(args.reward_fn, reward_fns, weights, prompt_list, out["texts"], answers)
            if args.env:  # an environment's own reward replaces --reward-fn's (which stays logged, per function)
                rewards = [r if e is None else e for r, e in zip(rewards, out["env_rewards"])]
            penalty = torch.zeros(len(rewards))  # DAPO's soft overlong punishment, part of the reward
            if args.overlong_buffer:
                lengths = out["completion_mask"].sum(1)
                penalty = overlong_penalty(lengths, args.max_new_tokens, args.overlong_buffer, args.overlong_penalty)
            rewards = (torch.tensor(rewards) + penalty).view(-1, args.group_size)  # (B, G)
            for g in range(len(batch)):
                n_groups_seen += 1
                zero_std = bool(rewards[g].std() == 0)  # no signal: every advantage in the group is 0
                n_zero_std += zero_std
                if args.dynamic_sampling and zero_std:
                    continue
                if len(groups) < len(batch):
                    rows = slice(g * args.group_size, (g + 1) * args.group_size)
                    group = {k: out[k][rows] for k in ROLLOUT_KEYS}
                    group["rewards"] = rewards[g]
                    group["overlong_penalty"] = penalty[rows]
                    group["per_fn"] = {k: v[rows] for k, v in per_fn.items()}
                    groups.append(group)
            if len(groups) == len(batch):
                break
        # with --dynamic-sampling the processes may have kept different numbers of groups: all train on the
        # smallest number (every process must run the same number of forward/backward passes)
        del groups[int(dist.all_reduce(len(groups), "min")) :]
        n_groups_seen, n_zero_std, gen_tokens = dist.all_reduce([n_groups_seen, n_zero_std, gen_tokens])
        gen_s = time.time() - t0
        if engine is not None:
            engine.release()  # --vllm-sleep: the engine's memory is the trainer's until the next push
        if not groups:
            tracker.write(f"step {step + 1}: every sampled group had zero reward spread; no update")
            continue
        rollout = _stack_groups(groups, tokenizer.pad_token_id)  # dicts of (N, ...) tensors, N = len(groups) * G
        n = rollout["rewards"].shape[0]
        all_rewards = dist.all_gather(rollout["rewards"])  # every process's, for the batch std and the metrics
        lengths = rollout["action_mask"].sum(1)  # (N,) sampled tokens
        all_lengths = dist.all_gather(lengths.float())
        if args.advantage == "reinforce++":
            advantages = reinforce_pp_advantages(
                rollout["rewards"], lengths, batch_rewards=all_rewards, batch_lengths=all_lengths
            )  # (N,)
        else:
            estimator = group_advantages if args.advantage == "group" else rloo_advantages
            advantages = estimator(rollout["rewards"], args.group_size, args.scale_rewards, batch_rewards=all_rewards)
        loss_mask = rollout["action_mask"].clone()  # (N, L)
        if args.mask_truncated:
            loss_mask[rollout["truncated"]] = 0

        # old log-probs = the rollout policy's: needed when the policy changes within the batch, and for the KL
        # to the initial policy on the probe steps; otherwise the ratio is exactly 1 and logps.detach() serves.
        probe = ref is not None and (
            args.beta != 0 or (args.kl_every and (step % args.kl_every == 0 or step + 1 == args.max_steps))
        )
        need_old = args.num_iterations > 1 or local_batch < n or probe
        old_logps = (
            batched_logprobs(policy, rollout, args.temperature, args.micro_batch_size, device, vocab)
            if need_old
            else None
        )
        ref_logps = None
        if probe:
            with contextlib.nullcontext() if args.beta != 0 else on_device(ref, device):  # the probe: visit, leave
                ref_logps = batched_logprobs(ref, rollout, args.temperature, args.micro_batch_size, device, vocab)

        # ALGO LOGIC: policy updates; each optimizer step takes `batch_size` completions, micro-batched with
        # weights computed on the whole optimizer batch (so the gradient does not depend on --micro-batch-size).
        policy.train()
        t1 = time.time()
        stats = {k: [] for k in ("loss", "clip_frac_low", "clip_frac_high", "entropy", "grad_norm")}  # per update
        train_tokens, skipped = torch.zeros((), device=device), 0  # on the device: one host sync per optimizer step
        # the training forward's log-probs of the rollout tokens, compared with the sampler's below (without
        # old_logps: from the first pass, NaN for rows of a skipped update)
        trainer_logps = old_logps if old_logps is not None else torch.full_like(rollout["sampler_logps"], math.nan)
        for it in range(args.num_iterations):
            order = torch.randperm(
                n, generator=torch.Generator().manual_seed(derive_seed(args.seed, "minibatch", step, it))
            )
            for b0 in range(0, n, local_batch):  # with --dynamic-sampling n may fall short of a whole batch
                rows = order[b0 : b0 + local_batch]
                signal = (advantages[rows] != 0) & loss_mask[rows].bool().any(1)  # rows that move the policy
                if args.beta == 0 and not dist.all_reduce(float(signal.any()), "max"):
                    # no signal in this batch (every group zero-spread, or every row with an advantage masked by
                    # --mask-truncated): the gradient is exactly 0, but AdamW's momentum would still move the
                    # weights, so the update is skipped
                    skipped += 1
                    continue
                n_tok, n_seq = dist.all_reduce([float(loss_mask[rows].sum()), len(rows)])  # over all processes
                w = aggregation_weights(loss_mask[rows], args.loss_agg, sample_budget, n_tok, int(n_seq))
                sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, clip low, clip high, entropy
                n_tok = max(1.0, n_tok)
                for m0 in range(0, len(rows), args.micro_batch_size):
                    mb = rows[m0 : m0 + args.micro_batch_size]
                    mb_mask = loss_mask[mb].to(device)
                    logps, entropy = completion_logprobs(
                        policy,
                        *(rollout[k][mb].to(device) for k in SEQUENCE_KEYS),
                        args.temperature,
                        action_mask=rollout["action_mask"][mb].to(device),
                        return_entropy=True,
                        vocab=vocab,  # the support `generate` sampled from: the tokenizer's ids
                    )  # (m, L)
                    old = old_logps[mb] if old_logps is not None else logps.detach()
                    if old_logps is None and it == 0:
                        trainer_logps[mb] = old.to(trainer_logps.device)
                    ref_mb = ref_logps[mb] if (ref_logps is not None and args.beta != 0) else None
                    tok_loss, low, high = grpo_token_loss(
                        logps,
                        old,
                        advantages[mb].to(device),
                        args.epsilon,
                        args.epsilon_high,
                        ref_mb,
                        args.beta,
                        mask=mb_mask,
                        level=args.importance_sampling_level,
                        loss_type=args.loss_type,
                        cispo_max_weight=args.cispo_max_weight,
                    )
                    w_is, _ = rollout_correction(  # the sampler/trainer mismatch (1 with --is-correction none)
                        old, rollout["sampler_logps"][mb].to(device), mb_mask, correction, args.is_cap
                    )
                    tok_loss = tok_loss * w_is
                    loss = (tok_loss * w[m0 : m0 + args.micro_batch_size].to(device)).sum()
                    loss.backward()
                    with torch.no_grad():
                        parts = [loss, (low * mb_mask).sum(), (high * mb_mask).sum(), (entropy * mb_mask).sum()]
                        sums += torch.stack(parts).double()
                        train_tokens += rollout["prompt_mask"][mb].sum() + rollout["completion_mask"][mb].sum()
                loss_sum, clip_low, clip_high, ent = dist.all_reduce(sums).tolist()  # the step's one host sync
                grad_norm = dist.grad_norm(torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm))
                tracker.check_finite(loss_sum, grad_norm, step + 1)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                stats["loss"].append(loss_sum)
                stats["clip_frac_low"].append(clip_low / n_tok)
                stats["clip_frac_high"].append(clip_high / n_tok)
                stats["entropy"].append(ent / n_tok)
                stats["grad_norm"].append(grad_norm)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        if engine is not None:
            engine.push(policy)  # the next rollout (and this step's evaluation) samples the updated policy
        train_tokens = dist.all_reduce(float(train_tokens))
        train_s = time.time() - t1

        # KL of the rollout policy to the initial policy on the rollout tokens (k3 and k1), whatever beta is
        if ref_logps is not None:
            mask = rollout["action_mask"].to(device)
            k3_sum, k1_sum, n_mask = dist.all_reduce(
                [
                    float((k3_kl(old_logps, ref_logps) * mask).sum()),
                    float(((old_logps - ref_logps) * mask).sum()),
                    float(mask.sum()),
                ]
            )
            metrics["train/kl"] = k3_sum / max(1.0, n_mask)
            metrics["train/kl_k1"] = k1_sum / max(1.0, n_mask)

        seen = ~trainer_logps.isnan()
        sampled = rollout["action_mask"] * seen
        if dist.all_reduce(float(sampled.sum())) > 0:  # none when every update was skipped without old_logps
            metrics.update(logprob_mismatch(rollout["sampler_logps"], trainer_logps, sampled))
            metrics.update(
                correction_metrics(trainer_logps, rollout["sampler_logps"], sampled, correction, args.is_cap)
            )

        r = all_rewards
        per_fn = {k: dist.all_gather(torch.tensor(v, dtype=torch.float64)) for k, v in rollout["per_fn"].items()}
        metrics.update(
            {
                "rollout/reward_mean": r.mean().item(),
                "rollout/reward_std": r.std().item(),
                **{f"rollout/reward/{k}": v.mean().item() for k, v in per_fn.items()},
                "rollout/completion_len": all_lengths.mean().item(),
                "rollout/completion_len_max": all_lengths.max().item(),
                "rollout/truncated_frac": dist.all_gather(rollout["truncated"].float()).mean().item(),
                "rollout/zero_std_frac": n_zero_std / max(1, n_groups_seen),
                **(
                    {"rollout/overlong_penalty": dist.all_gather(rollout["overlong_penalty"]).mean().item()}
                    if args.overlong_buffer
                    else {}
                ),
                **(
                    {
                        "rollout/tool_calls_per_episode": dist.all_gather(rollout["tool_calls"]).mean().item(),
                        "rollout/turns_mean": dist.all_gather(rollout["turns"]).mean().item(),
                    }
                    if args.env
                    else {}
                ),
                **{f"train/{k}": sum(v) / len(v) for k, v in stats.items() if v},  # none if every update was skipped
                "train/skipped_updates": skipped,
                "train/lr": lr,
                **train.shares(args.prompts_per_step, step, args.seed),  # of the first draw of each step
                "perf/gen_tokens_per_s": gen_tokens / max(gen_s, 1e-9),
                "perf/train_tokens_per_s": train_tokens / max(train_s, 1e-9),
                "perf/step_s": time.time() - t0,
                "perf/gen_share": gen_s / max(time.time() - t0, 1e-9),  # of the step: sampling and rewards
                "perf/peak_mem_gb": peak_memory_gb(device),
            }
        )
        done = step + 1
        if done == args.max_steps or (args.eval_every and done % args.eval_every == 0):
            metrics.update(evaluation())
        tracker.log(metrics, step=done)
        tracker.step()
        if args.save_every and done % args.save_every == 0 and done < args.max_steps:
            save_checkpoint(run_dir, done, policy, tokenizer, optimizer, scheduler)

    final = save_model(policy, tokenizer, run_dir / "final")
    if args.save_every and args.max_steps % args.save_every == 0:
        save_checkpoint(run_dir, args.max_steps, policy, tokenizer, optimizer, scheduler)
    tracker.close()
    last = {k: v for k, v in metrics.items() if k.startswith("eval/")} if args.max_steps > start_step else {}
    if dist.is_main():
        print(f"saved {final}" + ("  |  " + "  ".join(f"{k}={v:.4f}" for k, v in last.items()) if last else ""))


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__.split("\n\n")[0]))  # --help opens with what the script does
