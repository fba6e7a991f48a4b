"""How far training has moved the model from where it started, measured the same way in every training script.

    eval/kl_to_init         k3 estimate of KL(pi || pi_init) per completion token: mean of exp(d) - d - 1,
                            d = log pi_init(y_t|.) - log pi(y_t|.), on completions y sampled from the current pi
    eval/kl_to_init_k1      the k1 estimate, mean of -d (unbiased; noisier, and negative on few samples)
    eval/kl_to_init_tokens  how many sampled completion tokens both means are over
    eval/weight_drift       ||theta - theta_init||_F / ||theta_init||_F over every weight of the model

The prompts are a fixed held-out set: the first `--kl-prompts` evaluation prompts of the target skill (the new
task's prompts, where "RL's Razor" (Shenfeld et al. 2025) finds forgetting tracks this KL), `--kl-samples`
completions each, sampled at temperature 1 from a seed that is the same at every evaluation, so the curve moves
with the model and not with the draw. The initial model is not kept on the accelerator: a frozen copy waits in host
memory and visits for the one no-grad forward over the samples (`initial_copy` + `on_device`, as grpo.py's
`--beta 0` KL probe), or, for LoRA, the same model with its adapters switched off.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager

import torch

from common.generation import derive_seed, generate
from common.logprobs import completion_logprobs
from common.model import load_model, offload_to_host, on_device, resolve_dtype


def initial_copy(path: str, dtype: str, attn_implementation: str | None = None) -> torch.nn.Module:
    """The initial model, frozen, in host memory (pinned on a GPU machine), in the compute dtype `dtype`."""
    model = load_model(path, dtype=dtype, device="cpu", attn_implementation=attn_implementation)
    model.eval().requires_grad_(False)
    return offload_to_host(model)


def visiting(initial: torch.nn.Module, device: torch.device) -> Callable[[], ContextManager]:
    """`kl_to_init`'s `initial` for a host copy: its weights on `device` for the duration of one forward pass."""
    return lambda: on_device(initial, device)


def resident(model: torch.nn.Module) -> Callable[[], ContextManager]:
    """`kl_to_init`'s `initial` for a model already on the accelerator (e.g. a reference in the loss)."""
    return lambda: contextlib.nullcontext(model)


def kl_prompts(records: list[dict], target_skill: str, n: int) -> list:
    """The fixed held-out prompts of the KL: the first `n` evaluation records of the target skill (records without a
    skill count as target, as in `evaluate`)."""
    return [r["prompt"] for r in records if r.get("skill", target_skill) == target_skill][:n]


class Drift:
    """eval/kl_to_init and eval/weight_drift of one run, as every script measures them: `Drift(args, eval_records,
    device, max_new_tokens)` takes the fixed prompts (--kl-prompts, --kl-samples) and loads the initial model
    (args.model, also when resuming) into host memory in the compute dtype; a script that already holds the
    initial model passes it as `initial` (`on_accelerator`: it stays where it is), and lora.py passes its own
    `initial` context (adapters off) and `weight_drift`. Calling it on the model gives the metrics ({} when off)."""

    def __init__(
        self,
        args,
        eval_records: list[dict],
        device: torch.device,
        max_new_tokens: int,
        *,
        initial: torch.nn.Module | None = None,
        on_accelerator: bool = False,
        context: Callable[[], ContextManager] | None = None,
        drift_fn: Callable[[torch.nn.Module], float] | None = None,
        max_tokens: int = 0,
    ):
        self.prompts = kl_prompts(eval_records, args.target_skill, args.kl_prompts)
        self.samples, self.max_new_tokens, self.seed = args.kl_samples, max_new_tokens, args.seed
        self.batch_size, self.max_tokens = args.eval_batch_size, max_tokens
        if not self.prompts:
            return
        if context is None:
            if initial is None:
                dtype = str(resolve_dtype(args.dtype, device)).removeprefix("torch.")
                initial = initial_copy(args.model, dtype, args.attn_implementation)
            context = resident(initial) if on_accelerator else visiting(initial, device)
            params = dict(initial.named_parameters())
            drift_fn = drift_fn or (lambda model: weight_drift(model, params))
        self.context, self.drift_fn = context, drift_fn

    def __call__(self, model, tokenizer) -> dict:
        if not self.prompts:
            return {}
        metrics = kl_to_init(
            model,
            tokenizer,
            self.prompts,
            self.context,
            samples=self.samples,
            max_new_tokens=self.max_new_tokens,
            seed=self.seed,
            batch_size=self.batch_size,
            max_tokens=self.max_tokens,
        )
        return {**metrics, "eval/weight_drift": self.drift_fn(model)}


@torch.no_grad()
def kl_to_init(
    policy,
    tokenizer,
    prompts: list,
    initial: Callable[[], ContextManager],
    *,
    samples: int,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 64,
    max_tokens: int = 0,
) -> dict:
    """eval/kl_to_init (k3), eval/kl_to_init_k1 and eval/kl_to_init_tokens of `policy` to the initial model on
    `samples` completions per prompt of `policy` itself at temperature 1 (the distributions themselves, whatever the
    training temperature). `initial()` is a context manager yielding the initial model on the policy's device.
    Under torchrun every process computes it over all the prompts with the same seed, so every process, and any
    process count, gets the one-process value (the cost does not shrink with processes: 256 short completions by
    default). Log-probs over the tokenizer's ids."""
    if not prompts:
        return {}
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    vocab = len(tokenizer)
    out = generate(
        policy,
        tokenizer,
        prompts,
        n=samples,
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        batch_size=batch_size,
        max_tokens=max_tokens,
        seed=derive_seed(seed, "kl_to_init", 0),  # the same draw at every evaluation, on every process
    )
    seqs = [out[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")]
    mask = out["completion_mask"].to(device).float()
    rows = range(0, mask.shape[0], batch_size)

    def logps(model):
        return torch.cat(
            [
                completion_logprobs(model, *(x[r : r + batch_size].to(device) for x in seqs), 1.0, vocab=vocab).float()
                for r in rows
            ]
        )

    policy_logps = logps(policy)  # (N, L)
    with initial() as init:
        init_logps = logps(init)
    policy.train(was_training)
    d = (init_logps - policy_logps) * mask
    k3 = ((torch.exp(d) - d - 1) * mask).sum()
    k1 = (-d).sum()
    k3, k1, n = float(k3), float(k1), float(mask.sum())  # the same on every process: no reduction
    return {
        "eval/kl_to_init": k3 / max(n, 1.0),
        "eval/kl_to_init_k1": k1 / max(n, 1.0),
        "eval/kl_to_init_tokens": n,
    }


@torch.no_grad()
def weight_drift(model, initial_params: dict[str, torch.Tensor]) -> float:
    """||theta - theta_init||_F / ||theta_init||_F over the parameters of `model` named in `initial_params` (the
    initial model's `named_parameters`, wherever they are). Measured in the initial copy's dtype, the compute dtype:
    the weights the forward uses (bf16 master weights' updates smaller than half a bf16 ulp do not show; at the
    start the drift is exactly 0 whatever the master dtype). FSDP-sharded parameters are gathered one at a time
    (every process walks the same parameters in the same order, so every process gets the same value)."""
    diff, base = 0.0, 0.0
    for name, p in model.named_parameters():
        init = initial_params.get(name)
        if init is None:
            continue
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        init = init.full_tensor() if hasattr(init, "full_tensor") else init
        init = init.to(p.device)
        diff += float((p.to(init.dtype).float() - init.float()).pow(2).sum())
        base += float(init.float().pow(2).sum())
    return math.sqrt(diff) / max(math.sqrt(base), 1e-12)
