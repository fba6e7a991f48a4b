"""On-policy distillation: the student samples its own completions, a frozen teacher scores every token the student
produced, and the student minimizes the reverse KL to the teacher on its own trajectories (Agarwal et al. 2024,
arXiv 2306.13649; Gu et al. 2024, MiniLLM; Thinking Machines, "On-policy distillation", 2025).

    --objective sampled (default): per-token advantage A_t = log pi_T(y_t|.) - log pi_S(y_t|.) (negative per-token
        reverse KL on the sampled token, no discounting), policy-gradient loss -mean_t A_t rho_t
        (rho_t = pi_S / pi_S,old, clipped to [1 - eps, 1 + eps] when --num-iterations > 1);
        E_{y_t ~ pi_S}[-A_t] = KL(pi_S || pi_T) at that position.
    --objective full: the exact reverse KL sum_v pi_S(v|.) (log pi_S(v|.) - log pi_T(v|.)) at every completion
        position, summed over the vocabulary in row chunks (neither model's [N, V] logits exist in full).
    --objective forward-topk: the forward KL(pi_T~ || pi_S) from the teacher's --teacher-topk most likely tokens
        at each student-sampled position, renormalized over those k (GKD's forward KL, as verl's OPD ships it).
    --objective jsd: GKD's generalized Jensen-Shannon divergence, m = beta pi_T + (1 - beta) pi_S,
        JSD_beta = beta KL(pi_T || m) + (1 - beta) KL(pi_S || m) (--jsd-beta; 0: forward KL, 1: reverse KL).
    The three dense objectives are computed in row chunks over the vocabulary from both models' final hidden
    states, with closed-form gradients (`divergence`), so neither model's [N, V] logits exist in full.

Teacher and student must share the vocabulary. `--cold-start-steps N` first runs N SFT steps on teacher-sampled
completions (off-policy), the remedy when the student's samples start far from the teacher's (low overlap).

    python opd.py                                                     # the tiny world: tiny-base <- tiny-teacher
    python opd.py --model Qwen/Qwen3-0.6B --teacher Qwen/Qwen3-8B --dataset prompts.jsonl --eval-prompts '' \\
        --teacher-dtype bfloat16 --max-new-tokens 512 --micro-batch-size 8

Under `torchrun --nproc_per_node=N opd.py ...` each process samples and trains on prompts_per_step / N prompts,
the loss normalized by all processes' completion tokens; `--shard-frozen` shards the teacher too.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

from common import die, dist
from common.data import data_options, fit_rollout_prompts, load_prompts
from common.drift import Drift
from common.generation import (
    correction_metrics,
    generate,
    generation_token_budget,
    kv_bytes_per_token,
    logprob_mismatch,
    rollout_correction,
)
from common.logprobs import (
    chunked_logprobs_and_rank,
    completion_logprobs,
    gather_rows,
    lm_head_params,
    logits_fp32,
    scatter_rows,
)
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
    """the run's name; if not given: opd__{seed}__{unix time}"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works)"""
    wandb_project: str = "cleanpost"
    """the wandb project"""
    wandb_entity: str | None = None
    """the wandb entity (team)"""
    # models
    model: str = "assets/tiny-base"
    """hub id or local directory of the student (trained)"""
    teacher: str = "assets/tiny-teacher"
    """hub id or local directory of the teacher (frozen; same vocabulary; may be larger)"""
    dtype: str = "auto"
    """auto: bf16 compute from fp32 master weights on a GPU with native bf16, else fp32 | float32 | bfloat16: bf16
    compute, fp32 master weights, gradients and AdamW state (also on a CPU) | pure-bf16: everything in bf16 (8 instead
    of 16 bytes a parameter; updates below half a bf16 ulp of a weight are lost)"""
    teacher_dtype: str = "auto"
    """teacher dtype (e.g. bfloat16 to halve a large teacher's memory)"""
    shard_frozen: bool = False
    """under torchrun: shard the teacher with FSDP2 (1/N of its memory per GPU, an all-gather per forward) instead
    of a full copy per GPU; --objective full gathers it for each update"""
    gradient_checkpointing: bool = False
    """recompute the student's activations in backward to save memory"""
    attn_implementation: str | None = None
    """attention kernel: sdpa | eager | flash_attention_2 (default: transformers' choice; Gemma-2 needs eager)"""
    chat_template_kwargs: str | None = None
    """JSON passed to the chat template for training data, prompts and evaluation alike, e.g. '{"enable_thinking":
    false}' for Qwen3"""
    # data
    dataset: tuple[str, ...] = ("assets/data/prompts.jsonl",)
    """training data, one or more sources (mixed by --dataset-weights) of {prompt} records (prompt: string or message
    list): each a JSONL/.json/.parquet/.csv file, a save_to_disk directory, or a hub id
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
    # rollouts
    prompts_per_step: int = 32
    """prompts sampled per step"""
    group_size: int = 4
    """student completions per prompt"""
    max_new_tokens: int = 8
    """completion budget"""
    max_prompt_length: int | None = None
    """prompts longer than this many tokens (after the chat template) are dropped and counted when the data is
    loaded, for training and evaluation (default: the model's context length minus --max-new-tokens)"""
    temperature: float = 1.0
    """sampling temperature; both models' log-probs are taken at this temperature"""
    is_correction: Literal["auto", "none", "tis", "mis"] = "auto"
    """reweight each sampled token's loss by rho = pi_trainer / pi_sampler of the student, the sampler/trainer
    mismatch (not in the cold start, which imitates the teacher's samples): tis = min(rho, --is-cap) per token, mis
    = the sequence's rho where it lies in [1/cap, cap], else the sequence is dropped; auto: tis with --vllm, none
    on the HF path (the sampler is the training forward itself); see common.generation.rollout_correction"""
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
    # objective
    objective: Literal["sampled", "full", "forward-topk", "jsd"] = "sampled"
    """sampled: policy gradient with per-token advantage log pi_T - log pi_S; full: exact reverse KL over the vocab;
    forward-topk: forward KL from the teacher's top --teacher-topk tokens, renormalized (GKD, verl); jsd: GKD's
    generalized Jensen-Shannon with --jsd-beta over the vocab. The last three at every position the student sampled"""
    teacher_topk: int = 20
    """--objective forward-topk: the teacher's most likely tokens kept at each position"""
    jsd_beta: float = 0.5
    """--objective jsd: the mixture weight of the teacher, m = beta pi_T + (1 - beta) pi_S; 0 is the forward KL,
    1 the reverse KL"""
    num_iterations: int = 1
    """updates per rollout batch; > 1 uses the importance ratio to the rollout policy, clipped (sampled objective)"""
    epsilon: float = 0.2
    """clip range of the importance ratio"""
    kl_chunk_size: int = 256
    """rows per chunk of the full-vocabulary objectives (full, forward-topk, jsd)"""
    cold_start_steps: int = 0
    """SFT steps on teacher-sampled completions before going on-policy (0: none)"""
    # optimization
    max_steps: int = 100
    """on-policy steps (rollout batches), after the cold start"""
    micro_batch_size: int = 64
    """completions per forward/backward in each process (gradient accumulation)"""
    learning_rate: float = 1e-4
    """AdamW learning rate (constant after warmup)"""
    warmup_steps: int = 5
    """linear warmup of the learning rate"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm"""
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
    """a run directory (its newest checkpoint) or a checkpoint directory to continue from (same --max-steps,
    --cold-start-steps and number of processes)"""


# ALGO LOGIC


def sampled_token_loss(student_logps, old_logps, teacher_logps, epsilon):
    """Per-token loss (B, L) of the sampled objective: -A_t * rho_t (clipped like PPO), A_t = teacher - student
    log-prob of the sampled token at rollout time (detached)."""
    advantages = (teacher_logps - old_logps).detach()
    ratio = torch.exp(student_logps - old_logps)
    return torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - epsilon, 1 + epsilon))


DENSE_OBJECTIVES = ("full", "forward-topk", "jsd")  # computed over the vocabulary at every completion position


def divergence(logp_s, logp_t, objective: str, jsd_beta: float = 0.5, topk: int = 20, grad: bool = False):
    """Per-row divergence D (rows,) between the student p = exp(logp_s) and the teacher q = exp(logp_t), (rows, V)
    fp32 log-softmaxes at one position each; with `grad`, also dD/dz (rows, V), its gradient w.r.t. the student's
    (temperature-scaled) logits z, in closed form (softmax's Jacobian: dD/dz = p * (dD/dp - sum_v p_v dD/dp_v)):
      full (reverse KL, MiniLLM):  D = sum_v p (log p - log q);              dD/dz = p (log p - log q - D)
      forward-topk (GKD's forward KL from the teacher's top-k, as verl's OPD): q~ = q renormalized over the
                                   teacher's `topk` most likely tokens (0 elsewhere), D = KL(q~ || p)
                                   = sum_{v in top-k} q~ (log q~ - log p);  dD/dz = p - q~
      jsd (GKD's generalized Jensen-Shannon, arXiv 2306.13649 eq. 1): m = beta q + (1 - beta) p,
                                   D = beta KL(q || m) + (1 - beta) KL(p || m);  dD/dp = (1 - beta)(log p - log m)
                                   (the terms in q / m cancel), so dD/dz = (1 - beta) p (log p - log m - KL(p || m));
                                   beta = 0 is the forward KL(q || p) and beta = 1 the reverse KL(p || q), the
                                   limits GKD and TRL take (the mixture itself degenerates there)."""
    p = logp_s.exp()
    if objective == "jsd" and jsd_beta in (0.0, 1.0):
        objective = "full" if jsd_beta == 1.0 else "forward-topk"
        topk = logp_t.shape[-1]  # the forward KL over the whole vocabulary
    if objective == "full":
        d = (p * (logp_s - logp_t)).sum(-1)
        return (d, p * (logp_s - logp_t - d[:, None])) if grad else d
    if objective == "forward-topk":
        top_logp, top_ids = logp_t.topk(min(topk, logp_t.shape[-1]), dim=-1)  # (rows, k)
        top_logq = torch.log_softmax(top_logp, -1)  # renormalized over the top-k
        d = (top_logq.exp() * (top_logq - logp_s.gather(-1, top_ids))).sum(-1)
        return (d, p.scatter_add(-1, top_ids, -top_logq.exp())) if grad else d  # p - q~
    b = torch.tensor(jsd_beta, dtype=logp_s.dtype, device=logp_s.device)
    logm = torch.logaddexp(b.log() + logp_t, (1 - b).log() + logp_s)  # (rows, V)
    kl_pm = (p * (logp_s - logm)).sum(-1)
    d = b * (logp_t.exp() * (logp_t - logm)).sum(-1) + (1 - b) * kl_pm
    return (d, (1 - b) * p * (logp_s - logm - kl_pm[:, None])) if grad else d


class ChunkedDivergence(torch.autograd.Function):
    """`divergence` per row over the whole vocabulary, from the two models' final hidden states and head weights,
    `rows` rows at a time, so neither model's (N, V) logits exist in full; backward recomputes each chunk and applies
    the closed-form dD/dz. The teacher gets no gradient."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, temperature, rows, objective, beta, topk):
        d = s_hidden.new_empty(s_hidden.shape[0], dtype=_compute_dtype(s_hidden))
        for r0 in range(0, s_hidden.shape[0], rows):
            logp_s, logp_t = _chunk_logprobs(
                s_hidden[r0 : r0 + rows], s_weight, s_bias, t_hidden[r0 : r0 + rows], t_weight, t_bias, temperature
            )
            d[r0 : r0 + rows] = divergence(logp_s, logp_t, objective, beta, topk)
        ctx.save_for_backward(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias)
        ctx.args = temperature, rows, objective, beta, topk
        return d

    @staticmethod
    def backward(ctx, grad_d):
        s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias = ctx.saved_tensors
        temperature, rows, objective, beta, topk = ctx.args
        grad_hidden = torch.zeros_like(s_hidden)
        dtype = _compute_dtype(s_hidden)
        grad_weight = torch.zeros_like(s_weight, dtype=dtype)
        grad_bias = None if s_bias is None else torch.zeros_like(s_bias, dtype=dtype)
        for r0 in range(0, s_hidden.shape[0], rows):
            h = s_hidden[r0 : r0 + rows]
            logp_s, logp_t = _chunk_logprobs(
                h, s_weight, s_bias, t_hidden[r0 : r0 + rows], t_weight, t_bias, temperature
            )
            _, g = divergence(logp_s, logp_t, objective, beta, topk, grad=True)  # dD/dz (rows, V) fp32
            g = g * grad_d[r0 : r0 + rows, None].to(dtype) / temperature
            if grad_bias is not None:
                grad_bias += g.sum(0)
            g = g.to(s_weight.dtype)  # the matmuls in the head's dtype: no fp32 copy of the (V, H) head per chunk
            grad_hidden[r0 : r0 + rows] = (g @ s_weight).to(s_hidden.dtype)
            grad_weight += g.t() @ h.to(s_weight.dtype)  # accumulated in fp32 (one buffer for all chunks)
        grad_bias = None if grad_bias is None else grad_bias.to(s_bias.dtype)
        return grad_hidden, grad_weight.to(s_weight.dtype), grad_bias, *([None] * 8)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # bf16 -> fp32; fp32 and fp64 unchanged


def _chunk_logprobs(s_h, s_w, s_b, t_h, t_w, t_b, temperature):
    """(rows, V) fp32 log-softmaxes of the student and the teacher (each head in its own dtype, the logits never
    rounded to bf16)."""
    dtype = _compute_dtype(s_h)
    z_s = logits_fp32(s_h, s_w).to(dtype) + (0 if s_b is None else s_b.to(dtype))
    z_t = logits_fp32(t_h.to(t_w.dtype), t_w).to(dtype) + (0 if t_b is None else t_b.to(dtype))
    return torch.log_softmax(z_s / temperature, -1), torch.log_softmax(z_t / temperature, -1)


# PLUMBING


def check_same_vocabulary(student_tok, teacher_tok, student_name, teacher_name) -> None:
    """Stop before any compute if the two tokenizers would give different ids to the same text."""
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    where = f"--model {student_name!r} and --teacher {teacher_name!r}"
    if len(s_vocab) != len(t_vocab):
        die(f"{where} have different vocabularies: {len(s_vocab)} vs {len(t_vocab)} tokens")
    differ = sorted(k for k in s_vocab if t_vocab.get(k) != s_vocab[k])
    if differ:
        k = differ[0]
        die(f"{where} map {len(differ)} tokens differently, e.g. {k!r}: {s_vocab[k]} vs {t_vocab.get(k)}")
    for name in ("eos_token", "pad_token"):
        if getattr(student_tok, name) != getattr(teacher_tok, name):
            die(f"{where} have different {name}: {getattr(student_tok, name)!r} vs {getattr(teacher_tok, name)!r}")


def completion_hidden(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Final hidden states at the positions that predict each completion token: (B, L, H)."""
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention_mask = torch.cat([prompt_mask, completion_mask], 1)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    hidden = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    P, L = prompt_ids.shape[1], completion_ids.shape[1]
    return hidden[:, P - 1 : P + L - 1]


@torch.no_grad()
def teacher_token_stats(teacher, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature, vocab):
    """The teacher's log-prob of each student-sampled token and whether it is in the teacher's top-1 / top-5:
    (B, L) each, from its logits one micro-batch at a time, over the tokenizer's `vocab` ids (a head padded to
    more rows, e.g. Qwen2.5-7B's 152,064 for 151,665 tokens, has its padding rows left out)."""
    args = (prompt_ids, prompt_mask, completion_ids, completion_mask, temperature, vocab)
    return dist.root_forward(teacher, _teacher_token_stats, *args)  # a sharded teacher's head is gathered


def _teacher_token_stats(teacher, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature, vocab):
    hidden = completion_hidden(teacher, prompt_ids, prompt_mask, completion_ids, completion_mask)  # (B, L, H)
    weight, bias, softcap, multiplier = lm_head_params(teacher)
    weight, bias = weight[:vocab], None if bias is None else bias[:vocab]  # the tokenizer's ids only
    rows, (hidden, targets) = gather_rows(completion_mask, hidden, completion_ids)  # the completion tokens only
    chosen, rank = chunked_logprobs_and_rank(  # rank: tokens the teacher ranks strictly above the sampled one
        hidden, weight, targets, bias=bias, temperature=temperature / multiplier, softcap=softcap
    )  # (N,) each, tile by tile: no (B, L, V) tensor
    rank = scatter_rows(rank, rows, completion_mask.shape, fill=vocab)  # past each completion's end: in no top-k
    return scatter_rows(chosen, rows, completion_mask.shape), rank < 1, rank < 5


def dense_divergence(student, teacher, part, temperature, chunk_size, vocab, objective, jsd_beta=0.5, topk=20):
    """Per-token divergence (B, L) of a micro-batch for the dense objectives (`full`, `forward-topk`, `jsd`) over
    the tokenizer's `vocab` ids: the heads' common rows (checkpoints of one family often pad their embeddings to
    different sizes; padding rows are no tokens). Runs as the student's forward (`dist.root_forward`); a sharded
    teacher must be gathered around it and its backward (`dist.unsharded`)."""
    s_hidden = completion_hidden(student, *part)
    with torch.no_grad():
        t_hidden = completion_hidden(teacher, *part)
    sw, sb, _, s_mult = lm_head_params(student)
    tw, tb, _, t_mult = lm_head_params(teacher)
    if s_mult != 1.0 or t_mult != 1.0:
        die(f"--objective {objective} does not support logit-scaled heads (Cohere, Granite) yet")
    sw, tw = sw[:vocab], tw[:vocab]  # (V, H): rows past the tokenizer's ids are padding
    sb, tb = (None if b is None else b[:vocab] for b in (sb, tb))
    b, L = s_hidden.shape[:2]
    return ChunkedDivergence.apply(
        s_hidden.reshape(b * L, -1), sw, sb, t_hidden.reshape(b * L, -1), tw, tb, temperature, chunk_size,
        objective, jsd_beta, topk,
    ).view(b, L)  # fmt: skip


def main(args: Args) -> None:
    # PLUMBING: check flags and inputs before any compute
    dist.init()  # torchrun: join the other processes (nothing for `python opd.py`)
    args, ckpt, run_dir = open_run(
        args, SCRIPT, total_steps=lambda a: a.cold_start_steps + a.max_steps
    )  # a new run directory, or --resume's run and saved flags
    if args.vllm:
        require_vllm()  # one line naming the install command, before anything is loaded
    data_opts = data_options(args)  # --columns, --prompt-template, --dataset-weights: checked now
    eval_reward = eval_reward_fn(args.eval_reward_fn)  # the verifier of eval/accuracy
    rank_prompts = dist.local_slice(args.prompts_per_step, "--prompts-per-step")
    world = dist.world_size()
    n = args.prompts_per_step * args.group_size // world  # this process's completions per step
    gen_batch = args.generation_batch_size or n
    if n % gen_batch:
        die(f"--generation-batch-size {gen_batch} must divide each process's completions per step ({n})")
    if args.num_iterations > 1 and args.objective in DENSE_OBJECTIVES:
        die(
            f"--num-iterations > 1 applies to --objective sampled (--objective {args.objective} is recomputed exactly "
            "each update)"
        )
    if not 0.0 <= args.jsd_beta <= 1.0:
        die(f"--jsd-beta must be in [0, 1], got {args.jsd_beta}")
    if args.teacher_topk < 1:
        die(f"--teacher-topk must be at least 1, got {args.teacher_topk}")
    train_sources = [load_prompts(source, ("prompt",), data_opts) for source in args.dataset]
    eval_records = (
        load_prompts(args.eval_prompts, ("prompt", "answer"), data_opts, "--eval-prompts") if args.eval_prompts else []
    )
    tokenizer, teacher_tokenizer = (
        load_tokenizer(args.model, args.chat_template_kwargs),
        load_tokenizer(args.teacher, args.chat_template_kwargs),
    )
    check_same_vocabulary(tokenizer, teacher_tokenizer, args.model, args.teacher)
    train, eval_records = fit_rollout_prompts(train_sources, eval_records, tokenizer, args)  # over-long: dropped
    prompts = train.items  # every source's prompts, concatenated; `train.indices` draws the steps
    torch.manual_seed(args.seed)

    student = load_model(
        str(ckpt) if ckpt else args.model,
        dtype=args.dtype,
        gradient_checkpointing=args.gradient_checkpointing,
        attn_implementation=args.attn_implementation,
        sharded_load=True,  # torchrun: each process reads only its shards (in dist.wrap)
    )
    student = dist.wrap(student, train=True)  # torchrun: FSDP2 shards, one process: unchanged
    device = next(student.parameters()).device
    # --vllm: the student's rollout engine, holding a copy of its weights (pushed after every step's updates); the
    # cold start and the teacher's evaluation sample with transformers
    correction = args.is_correction if args.is_correction != "auto" else ("tis" if args.vllm else "none")
    engine = rollout_engine(args, ckpt, student, tokenizer)
    teacher = (
        load_model(
            args.teacher,
            dtype=args.teacher_dtype,
            device=device,
            attn_implementation=args.attn_implementation,
            sharded_load=True,
        )
        .eval()
        .requires_grad_(False)
    )
    teacher = dist.wrap(teacher, train=False, shard=args.shard_frozen)
    vocab = len(tokenizer)  # token ids both models share (check_same_vocabulary); heads may have padding rows beyond
    for name, m in (("--model", student), ("--teacher", teacher)):
        if lm_head_params(m)[0].shape[0] < vocab:
            die(f"{name}: its output layer has {lm_head_params(m)[0].shape[0]} rows for a tokenizer of {vocab} tokens")
    if lm_head_params(student)[2] is not None and args.objective in DENSE_OBJECTIVES:
        die(f"--objective {args.objective} does not support soft-capped heads (Gemma-2); use --objective sampled")
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.learning_rate, fused=device.type == "cuda")
    total_steps = args.cold_start_steps + args.max_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, args.warmup_steps, 0, "constant"))
    start_step = load_trainer_state(ckpt, optimizer, scheduler, student)["step"] if ckpt else 0
    if args.generation_max_tokens is None:  # auto: from the memory free now; saved, so a resume batches alike
        budget = 0 if args.vllm else generation_token_budget(student, device, optimizer)
        args = update_args(run_dir, SCRIPT, args, generation_max_tokens=budget)
    drift = Drift(  # eval/kl_to_init of the student to its initial self: a host copy visits for each evaluation
        args,
        eval_records,
        device,
        args.eval_max_new_tokens or args.max_new_tokens,
        max_tokens=args.generation_max_tokens,
    )
    tracker = Tracker(run_dir, args, script=SCRIPT, total_steps=total_steps, start_step=start_step)
    tracker.write(
        f"run: {run_dir}  |  student {args.model} ({sum(p.numel() for p in student.parameters()) / 1e6:.2f}M), "
        f"teacher {args.teacher} ({sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M)  |  objective "
        f"{args.objective}, {n * world} completions/step"
        + (f" ({n} in each of {world} processes)" if world > 1 else "")
        + (f", {args.cold_start_steps} cold-start SFT steps" if args.cold_start_steps else "")
        + (f"  |  resumed at step {start_step} from {ckpt}" if ckpt else "")
    )
    tracker.write(train.describe(data_opts))

    def evaluation(model) -> dict:
        if not eval_records:
            return {}
        budget = args.generation_max_tokens
        if budget and model is not student:  # the same bytes of KV cache, in the teacher's (larger) tokens
            budget = max(1, budget * kv_bytes_per_token(student) // kv_bytes_per_token(model))
        metrics = evaluate(
            model,
            tokenizer,
            eval_records,
            reward_fn=eval_reward,
            target_skill=args.target_skill,
            batch_size=args.eval_batch_size,
            max_new_tokens=args.eval_max_new_tokens or args.max_new_tokens,
            max_tokens=budget,
            engine=engine if model is student else None,
        )
        return {**metrics, **drift(model, tokenizer)} if model is student else metrics  # eval/kl_to_init, ...

    if start_step == 0:  # the starting point, and the teacher's accuracy as the ceiling
        teacher_eval = {k.replace("eval/", "eval/teacher_"): v for k, v in evaluation(teacher).items()}
        start = {**evaluation(student), **teacher_eval}
        tracker.log(start, step=0)
        tracker.write("step 0: " + "  ".join(f"{k}={v:.4f}" for k, v in start.items()))

    for step in range(start_step, total_steps):
        t0 = time.time()
        cold = step < args.cold_start_steps
        # ROLLOUT: the student samples (or, in the cold start, the teacher does); depends only on (seed, step)
        batch = [prompts[i] for i in train.indices(args.prompts_per_step, step, args.seed)[rank_prompts]]
        student.eval()
        sample = (
            functools.partial(generate, teacher if cold else student) if cold or engine is None else engine.generate
        )
        out = sample(
            tokenizer,
            [r["prompt"] for r in batch],
            n=args.group_size,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            batch_size=gen_batch,
            max_tokens=args.generation_max_tokens,
            seed_key=(args.seed, step, 0),
        )
        seqs = [out["prompt_ids"], out["prompt_mask"], out["completion_ids"], out["completion_mask"]]
        mask = out["completion_mask"].float().to(device)
        sampler_logps = out["sampler_logps"].to(device)  # (n, L) what the sampler drew each token with
        gen_s = time.time() - t0
        if engine is not None:
            engine.release()  # --vllm-sleep: the engine's memory is the trainer's until the next push
        with torch.no_grad():
            old_logps, teacher_logps, top1, top5 = [], [], [], []
            for s in range(0, n, args.micro_batch_size):
                part = [x[s : s + args.micro_batch_size].to(device) for x in seqs]
                old_logps.append(completion_logprobs(student, *part, args.temperature, vocab=vocab).float())
                chosen, in1, in5 = teacher_token_stats(teacher, *part, args.temperature, vocab)
                teacher_logps.append(chosen)
                top1.append(in1)
                top5.append(in5)
            old_logps, teacher_logps = torch.cat(old_logps), torch.cat(teacher_logps)  # (n, L)
            top1, top5 = torch.cat(top1).float(), torch.cat(top5).float()

        # ALGO LOGIC: cold start = SFT on the teacher's samples; then the chosen on-policy objective
        student.train()
        n_tok = max(1.0, dist.all_reduce(float(mask.sum())))  # over all processes
        losses, kls, grad_norms = [], [], []
        dense = args.objective in DENSE_OBJECTIVES and not cold
        with dist.unsharded(teacher if dense else None):  # a dense objective reads the teacher's head in backward
            for _ in range(1 if cold else args.num_iterations):
                sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, divergence: on the device
                for s in range(0, n, args.micro_batch_size):
                    part = [x[s : s + args.micro_batch_size].to(device) for x in seqs]
                    m = mask[s : s + args.micro_batch_size]
                    if cold:
                        tok_loss = -completion_logprobs(student, *part, args.temperature, vocab=vocab)
                    elif args.objective == "sampled":
                        logps = completion_logprobs(student, *part, args.temperature, vocab=vocab)
                        tok_loss = sampled_token_loss(
                            logps,
                            old_logps[s : s + args.micro_batch_size],
                            teacher_logps[s : s + args.micro_batch_size],
                            args.epsilon,
                        )
                    else:
                        tok_loss = dist.root_forward(
                            student,
                            dense_divergence,
                            teacher,
                            part,
                            args.temperature,
                            args.kl_chunk_size,
                            vocab,
                            args.objective,
                            args.jsd_beta,
                            args.teacher_topk,
                        )
                        sums[1] += (tok_loss.detach() * m).sum()
                    if not cold:  # the sampler/trainer mismatch correction (weights 1 with --is-correction none)
                        rows = slice(s, s + args.micro_batch_size)
                        w_is, _ = rollout_correction(old_logps[rows], sampler_logps[rows], m, correction, args.is_cap)
                        tok_loss = tok_loss * w_is
                    loss = (tok_loss * m).sum() / n_tok
                    loss.backward()
                    sums[0] += loss.detach()
                loss_sum, kl_sum = dist.all_reduce(sums).tolist()  # the update's one host sync
                grad_norm = dist.grad_norm(torch.nn.utils.clip_grad_norm_(student.parameters(), args.max_grad_norm))
                tracker.check_finite(loss_sum, grad_norm, step + 1)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss_sum)
                kls.append(kl_sum / float(n_tok))
                grad_norms.append(grad_norm)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        if engine is not None:
            engine.push(student)  # the next rollout (and this step's evaluation) samples the updated student

        # reverse KL per token: exact with --objective full, else the sampled estimate E[log pi_S - log pi_T]
        reverse_kl = kls[0] if dense and args.objective == "full" else dist.masked_mean(old_logps - teacher_logps, mask)
        lengths = dist.all_gather(out["completion_mask"].sum(1).float())
        trainer_logps = teacher_logps if cold else old_logps  # the training forward of the model that sampled
        metrics = {
            **logprob_mismatch(sampler_logps, trainer_logps, mask),
            **correction_metrics(trainer_logps, sampler_logps, mask, correction, args.is_cap),
            "train/loss": sum(losses) / len(losses),
            "train/phase": 0.0 if cold else 1.0,
            "train/reverse_kl": reverse_kl,
            **({"train/divergence": kls[0]} if dense else {}),  # the dense objective's value per token
            "train/teacher_logp": dist.masked_mean(teacher_logps, mask),
            "train/student_logp": dist.masked_mean(old_logps, mask),
            "train/overlap_top1": dist.masked_mean(top1, mask),
            "train/overlap_top5": dist.masked_mean(top5, mask),
            "train/grad_norm": sum(grad_norms) / len(grad_norms),
            "train/lr": lr,
            **train.shares(args.prompts_per_step, step, args.seed),
            "rollout/completion_len": lengths.mean().item(),
            "perf/gen_tokens_per_s": float(lengths.sum()) / max(gen_s, 1e-9),
            "perf/step_s": time.time() - t0,
            "perf/gen_share": gen_s / max(time.time() - t0, 1e-9),  # of the step: sampling and rewards
            "perf/peak_mem_gb": peak_memory_gb(device),
        }
        done = step + 1
        if done == total_steps or (args.eval_every and done % args.eval_every == 0):
            metrics.update(evaluation(student))
        tracker.log(metrics, step=done)
        tracker.step()
        if args.save_every and done % args.save_every == 0 and done < total_steps:
            save_checkpoint(run_dir, done, student, tokenizer, optimizer, scheduler)

    final = save_model(student, tokenizer, run_dir / "final")
    if args.save_every and total_steps % args.save_every == 0 and total_steps > start_step:
        save_checkpoint(run_dir, total_steps, student, tokenizer, optimizer, scheduler)
    tracker.close()
    last = {k: v for k, v in metrics.items() if k.startswith("eval/")} if total_steps > start_step else {}
    if dist.is_main():
        print(f"saved {final}" + ("  |  " + "  ".join(f"{k}={v:.4f}" for k, v in last.items()) if last else ""))


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__.split("\n\n")[0]))  # --help opens with what the script does
