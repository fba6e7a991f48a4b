"""DPO: direct preference optimization (Rafailov et al. 2023, arXiv 2305.18290) and its loss family.

For a prompt x with a preferred response y_w and a dispreferred y_l, the log-ratios r_w = log pi(y_w|x) -
log pi_ref(y_w|x), r_l likewise, and their margin h = r_w - r_l (sequence log-prob sums unless said otherwise):

    sigmoid (DPO):      -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)          (eps = --label-smoothing)
    robust (rDPO):      [-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)] / (1 - 2 eps)
                        (Chowdhury et al. 2024, arXiv 2403.00409: unbiased under labels flipped with probability eps)
    hinge (SLiC):       max(0, 1 - beta h)                          (Zhao et al. 2023, arXiv 2305.10425)
    ipo (IPO):          (h - 1 / (2 beta))^2, log-probs averaged over the response's tokens (arXiv 2310.12036)
    apo-zero (APO):     (1 - sigmoid(beta r_w)) + sigmoid(beta r_l)  (D'Oosterlinck et al. 2024, arXiv 2408.06266)
    sppo-hard (SPPO):   (r_w - 1 / (2 beta))^2 + (r_l + 1 / (2 beta))^2  (Wu et al. 2024, arXiv 2405.00675)
  reference-free (no reference model is loaded or precomputed), with a = log-probs averaged over the response:
    simpo (SimPO):      -log sigmoid(beta (a_w - a_l) - gamma)      (Meng et al. 2024, arXiv 2405.14734;
                        gamma = --simpo-gamma, the target margin)
    orpo (ORPO):        NLL(y_w) - beta log sigmoid(log odds(y_w) - log odds(y_l)),  log odds(y) = a - log(1 - e^a)
                        (Hong et al. 2024, arXiv 2403.07691; beta is the paper's lambda; the NLL per chosen token)
    + rpo_alpha * NLL(y_w)  (--rpo-alpha; RPO, arXiv 2404.19733: keeps the chosen answers likely)

pi_ref is a frozen copy of the starting policy, or (--precompute-ref) its log-probs computed once before training,
after which the reference model is freed. The implicit rewards beta * (log pi - log pi_ref) of chosen and rejected
are the metrics to watch: the margin should grow, and the chosen reward should not collapse.

    python dpo.py                                                       # the tiny world, a few minutes on a CPU
    python dpo.py --model runs/<sft run>/final --dataset prefs.jsonl --eval-dataset prefs_test.jsonl \\
        --eval-prompts '' --batch-size 64 --micro-batch-size 4 --learning-rate 5e-7 --precompute-ref
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
import tyro

from common import die, dist
from common.data import (
    IGNORE_INDEX,
    Mixture,
    check_batch_sizes,
    data_options,
    fit_prompts,
    load_preference_dataset,
    load_prompts,
    pair_micro_batches,
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
    """the run's name; if not given: dpo__{seed}__{unix time}"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works)"""
    wandb_project: str = "cleanpost"
    """the wandb project"""
    wandb_entity: str | None = None
    """the wandb entity (team)"""
    # model
    model: str = "assets/tiny-base"
    """hub id or local directory of the policy to train; also the reference"""
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
    """training data, one or more sources (mixed by --dataset-weights) of {prompt, chosen, rejected} pairs, or {chosen,
    rejected} conversations; each a JSONL/.json/.parquet/.csv file, a save_to_disk directory, or a hub id
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
    """held-out pairs for the eval/ preference metrics ('' to skip; any source --dataset takes, one of them)"""
    eval_prompts: str = "assets/data/eval.jsonl"
    """held-out {prompt, answer, skill} records for greedy accuracy ('' to skip; any source --dataset takes, one of
    them)"""
    target_skill: str = TARGET_SKILL
    """the skill reported as eval/accuracy; the other skills make eval/general_accuracy"""
    max_length: int = 256
    """prompt + response are truncated to this many tokens (counted and reported)"""
    # DPO
    beta: float = 0.1
    """strength of the implicit KL to the reference (DPO's beta; IPO's tau); SimPO's reward scale (its paper uses
    2-10); ORPO's lambda, the weight of the odds-ratio term"""
    loss_type: Literal["sigmoid", "robust", "hinge", "ipo", "apo-zero", "sppo-hard", "simpo", "orpo"] = "sigmoid"
    """sigmoid: DPO | robust: rDPO (label noise --label-smoothing) | hinge: SLiC | ipo: IPO's squared loss on
    length-averaged log-ratios | apo-zero: APO | sppo-hard: SPPO | simpo: SimPO, reference-free, length-normalized
    | orpo: ORPO, reference-free, odds ratio + NLL (formulas in the module docstring)"""
    label_smoothing: float = 0.0
    """the probability that a label is flipped: conservative DPO (sigmoid) or robust DPO (robust, > 0)"""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin gamma (its paper: 0.5-1.5 with beta 2-2.5)"""
    rpo_alpha: float | None = None
    """if set, add rpo_alpha * the chosen responses' token-mean NLL (RPO)"""
    precompute_ref: bool = False
    """compute the reference log-probs once before training, then free the reference model (not with simpo or
    orpo, which have no reference)"""
    shard_frozen: bool = False
    """under torchrun: shard the reference with FSDP2 too (1/N of its memory per GPU, an all-gather per forward)
    instead of a full copy per GPU (no communication)"""
    # optimization
    max_steps: int = 60
    """optimizer steps"""
    batch_size: int = 32
    """preference pairs per optimizer step, over all processes (each of N torchrun processes takes batch_size / N)"""
    micro_batch_size: int = 32
    """pairs per forward/backward in each process (2x rows: chosen and rejected in one forward)"""
    learning_rate: float = 3e-5
    """peak learning rate of AdamW"""
    weight_decay: float = 0.0
    """AdamW weight decay (matrices only)"""
    warmup_steps: int = 10
    """linear warmup from 0 to the peak learning rate, then linear decay to 0"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this (train/grad_norm is logged before clipping)"""
    # evaluation and checkpoints
    eval_every: int = 20
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


REFERENCE_FREE = ("simpo", "orpo")
LENGTH_AVERAGED = ("ipo", "simpo", "orpo")  # their log-probs are means over the response's tokens


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses (the module docstring's formulas) and the implicit rewards. Inputs (B,) sequence
    log-probs: sums, or for LENGTH_AVERAGED types means over the response's tokens; the reference log-probs are None
    for REFERENCE_FREE types. Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)), rewards detached:
    beta * log-ratio, or beta * log-prob (the length-normalized reward) for the reference-free losses. ORPO's NLL
    term is not in `losses`: the caller adds it per chosen token, as for RPO."""
    if loss_type in REFERENCE_FREE:
        chosen_logratios, rejected_logratios = chosen_logps, rejected_logps  # (B,): no reference
    else:
        chosen_logratios = chosen_logps - ref_chosen_logps  # (B,)
        rejected_logratios = rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "apo-zero":
        losses = (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
    elif loss_type == "sppo-hard":
        losses = (chosen_logratios - 1 / (2 * beta)) ** 2 + (rejected_logratios + 1 / (2 * beta)) ** 2
    elif loss_type == "simpo":
        losses = -F.logsigmoid(beta * h - simpo_gamma)
    elif loss_type == "orpo":
        # log odds(y) = log p - log(1 - p) with p = exp(a), a < 0 the mean token log-prob (a clamped below 0 so
        # that a response of probability 1 gives a large finite odds, not an infinite one)
        a_w, a_l = chosen_logps.clamp(max=-1e-6), rejected_logps.clamp(max=-1e-6)
        log_odds = (a_w - torch.log1p(-torch.exp(a_w))) - (a_l - torch.log1p(-torch.exp(a_l)))
        losses = -beta * F.logsigmoid(log_odds)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def halves(pair_values: torch.Tensor | None, b: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(chosen, rejected): rows :b and b: of a (2b,) pair tensor; (None, None) for None (no reference)."""
    return (None, None) if pair_values is None else (pair_values[:b], pair_values[b:])


def sequence_logps(model, batch: dict, average: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums (or means, `average`) of the response tokens' log-probs for a (2b, T) pair batch.
    Returns (sequence logps (2b,), per-token logps (2b, T-1), loss mask (2b, T-1))."""
    mask = batch["labels"][:, 1:] != IGNORE_INDEX  # (2b, T-1): the response tokens, the only rows the head runs on
    logps = token_logprobs(model, batch["input_ids"], batch["attention_mask"], target_mask=mask)  # (2b, T-1)
    seq = (logps * mask).sum(-1)
    return (seq / mask.sum(-1) if average else seq), logps, mask


@torch.no_grad()
def reference_logps(ref, pairs, micro_batch_size, pad_id, average, device) -> torch.Tensor:
    """(N, 2) reference log-probs [chosen, rejected] of every pair on `device`, computed once (--precompute-ref); under
    torchrun each process computes every N-th pair and the table is summed over processes."""
    out = torch.zeros(len(pairs), 2, dtype=torch.float64)
    mine = dist.strided(list(range(len(pairs))))
    with dist.unsharded(ref):
        for mb in pair_micro_batches(pairs, mine, micro_batch_size, pad_id) if mine else []:
            seq = sequence_logps(ref, {k: v.to(device) for k, v in mb.items()}, average)[0].double().cpu()
            out[mb["index"]] = seq.view(2, -1).T
    return dist.all_reduce(out).float().to(device)  # on the device of the micro-batches' indices


def pair_metrics(
    prefix, losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, beta, reference=True
) -> dict:
    """Means over the pairs of a step (or of the held-out set). pair_kl_k2: Schulman's k2 = (log pi/pi_ref)^2 / 2
    on the pairs' responses, a non-negative drift measure (a KL estimate only where responses are on-policy); not
    for a reference-free loss (`reference=False`), whose rewards are not log-ratios."""
    logratios = torch.cat([chosen_rewards, rejected_rewards]) / beta
    kl = {f"{prefix}/pair_kl_k2": (0.5 * logratios**2).mean().item()} if reference else {}
    return {
        f"{prefix}/loss": losses.mean().item(),
        f"{prefix}/rewards_chosen": chosen_rewards.mean().item(),
        f"{prefix}/rewards_rejected": rejected_rewards.mean().item(),
        f"{prefix}/rewards_margin": (chosen_rewards - rejected_rewards).mean().item(),
        f"{prefix}/rewards_accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
        f"{prefix}/logps_chosen": chosen_logps.mean().item(),
        f"{prefix}/logps_rejected": rejected_logps.mean().item(),
        **kl,
    }


def main(args: Args) -> None:
    # PLUMBING: check flags and inputs before any compute
    dist.init()  # torchrun: join the other processes (nothing for `python dpo.py`)
    args, ckpt, run_dir = open_run(args, SCRIPT)  # a new run directory, or --resume's run and saved flags
    data_opts = data_options(args)  # --columns, --prompt-template, --dataset-weights: checked now
    eval_reward = eval_reward_fn(args.eval_reward_fn)  # the verifier of eval/accuracy
    rank_rows = dist.local_slice(args.batch_size)  # this process's share of every step
    grad_accum_steps = check_batch_sizes(rank_rows.stop - rank_rows.start, args.micro_batch_size, args.batch_size)
    if args.beta <= 0:
        die(f"--beta must be positive, got {args.beta}")
    if not 0 <= args.label_smoothing < 0.5:
        die(f"--label-smoothing must be in [0, 0.5), got {args.label_smoothing}")
    if args.label_smoothing and args.loss_type not in ("sigmoid", "robust"):
        die("--label-smoothing applies to --loss-type sigmoid and robust only")
    if args.loss_type == "robust" and not args.label_smoothing:
        die("--loss-type robust needs --label-smoothing > 0 (the label-flip rate it corrects for; 0 is plain DPO)")
    reference_free = args.loss_type in REFERENCE_FREE
    if reference_free and args.precompute_ref:
        die(f"--precompute-ref: --loss-type {args.loss_type} uses no reference model")
    if args.loss_type == "orpo" and args.rpo_alpha is not None:
        die("--rpo-alpha: --loss-type orpo has its own NLL term (weight 1, as in the paper)")
    torch.manual_seed(args.seed)
    average = args.loss_type in LENGTH_AVERAGED
    nll_weight = 1.0 if args.loss_type == "orpo" else args.rpo_alpha  # the chosen tokens' NLL term, if any

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
    eval_records = (
        load_prompts(args.eval_prompts, ("prompt", "answer"), data_opts, "--eval-prompts") if args.eval_prompts else []
    )
    eval_budget = prompt_budget(None, args.model, args.eval_max_new_tokens)  # the context minus the answer's room
    eval_records = fit_prompts(eval_records, tokenizer, eval_budget, "--eval-prompts", flag="--eval-max-new-tokens")
    pad_id = tokenizer.pad_token_id
    model = load_model(
        str(ckpt) if ckpt else args.model,
        dtype=args.dtype,
        gradient_checkpointing=args.gradient_checkpointing,
        attn_implementation=args.attn_implementation,
        sharded_load=True,  # torchrun: each process reads only its shards (in dist.wrap)
    )
    model = dist.wrap(model, train=True)  # torchrun: FSDP2 shards, one process: unchanged
    device = next(model.parameters()).device
    # Reference: always the starting model (--model), also when resuming; none for a reference-free loss.
    ref = ref_train = ref_eval = None
    note = f"reference-free ({args.loss_type}): no reference model"
    if not reference_free:
        ref = load_model(
            args.model, dtype=args.dtype, device=device, attn_implementation=args.attn_implementation, sharded_load=True
        )
        ref = dist.wrap(ref.eval().requires_grad_(False), train=False, shard=args.shard_frozen)
        note = "live reference model"
    if args.precompute_ref:
        ref_train = reference_logps(ref, train_pairs, args.micro_batch_size, pad_id, average, device)
        ref_eval = (
            reference_logps(ref, eval_pairs, args.micro_batch_size, pad_id, average, device) if eval_pairs else None
        )
        freed = sum(t.numel() * t.element_size() for t in [*ref.parameters(), *ref.buffers()])
        del ref
        ref = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        note = f"reference log-probs precomputed; reference model freed ({freed / 2**20:.1f} MB of weights)"
    model.train()
    # eval/kl_to_init: against the live reference, else a host copy of the initial model visits for each evaluation
    drift = Drift(args, eval_records, device, args.eval_max_new_tokens, initial=ref, on_accelerator=ref is not None)

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
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}  |  {note}"
        + (f"  |  resumed at step {start_step} from {ckpt}" if ckpt else "")
    )
    tracker.write(train.describe(data_opts))

    def ref_pair_logps(mb, table) -> torch.Tensor | None:
        """(2b,) reference log-probs of a micro-batch: from the precomputed table or a no-grad forward (None for a
        reference-free loss)."""
        if reference_free:
            return None
        if table is not None:
            return table[mb["index"]].T.reshape(-1).to(device)
        with torch.no_grad():
            return sequence_logps(ref, mb, average)[0]

    @torch.no_grad()
    def evaluation() -> dict:
        metrics = {}
        if eval_pairs:
            model.eval()
            parts = []
            mine = dist.strided(list(range(len(eval_pairs))))  # each process scores every N-th pair
            with dist.unsharded(model), dist.unsharded(ref):
                for mb in pair_micro_batches(eval_pairs, mine, args.micro_batch_size, pad_id) if mine else []:
                    mb = {k: v.to(device) for k, v in mb.items()}
                    logps = sequence_logps(model, mb, average)[0].float()
                    ref_logps = ref_pair_logps(mb, ref_eval)
                    b = len(mb["index"])
                    out = dpo_loss(
                        *halves(logps, b),
                        *halves(None if ref_logps is None else ref_logps.float(), b),
                        args.beta,
                        args.loss_type,
                        args.label_smoothing,
                        args.simpo_gamma,
                    )
                    parts.append((*out, logps[:b], logps[b:]))
            local = [torch.cat(p) for p in zip(*parts)] if parts else [torch.zeros(0)] * 5
            cat = [dist.all_gather(t) for t in local]  # every process's pairs
            metrics.update(pair_metrics("eval", *cat, args.beta, reference=not reference_free))
            model.train()
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
        # ALGO LOGIC: the step's pairs depend only on (seed, batch_size, step); each process takes its slice. Each
        # micro-batch's summed loss is divided by the step's pair count over all processes (and the RPO term by the
        # step's chosen-token count, summed over processes), so the accumulated gradient is the full batch's.
        batches = pair_micro_batches(
            train_pairs,
            train.indices(args.batch_size, step, args.seed)[rank_rows],
            args.micro_batch_size,
            pad_id,
        )
        num_chosen_tokens = sum(int((mb["labels"][: len(mb["index"]), 1:] != IGNORE_INDEX).sum()) for mb in batches)
        num_chosen_tokens = int(dist.all_reduce(num_chosen_tokens))
        parts, nll_sum = [], torch.zeros((), dtype=torch.float64, device=device)
        num_tokens = sum(int(mb["attention_mask"].sum()) for mb in batches)  # on the host, before the copy
        for mb in batches:
            mb = {k: v.to(device) for k, v in mb.items()}
            b = len(mb["index"])
            logps, token_logps, mask = sequence_logps(model, mb, average)  # (2b,), (2b, T-1), (2b, T-1)
            ref_logps = ref_pair_logps(mb, ref_train)
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                *halves(logps, b),
                *halves(ref_logps, b),
                args.beta,
                args.loss_type,
                args.label_smoothing,
                args.simpo_gamma,
            )
            loss = losses.sum() / args.batch_size
            if nll_weight is not None:  # RPO's or ORPO's NLL of the chosen responses, per chosen token of the step
                nll = -(token_logps[:b] * mask[:b]).sum()
                loss = loss + nll_weight * nll / num_chosen_tokens
                nll_sum += nll.detach()
            loss.backward()
            parts.append(
                (
                    losses.detach().float(),
                    chosen_rewards.float(),
                    rejected_rewards.float(),
                    logps[:b].detach().float(),
                    logps[b:].detach().float(),
                )
            )
        metrics = pair_metrics(
            "train", *[dist.all_gather(torch.cat(p)) for p in zip(*parts)], args.beta, reference=not reference_free
        )
        num_tokens, nll_sum = dist.all_reduce([num_tokens, float(nll_sum)])  # the step's host sync
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
        if nll_weight is not None:
            metrics["train/nll_chosen"] = nll_sum / num_chosen_tokens
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
