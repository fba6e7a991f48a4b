"""Batched generation from a list of prompts: chat template, left padding, KV cache, stop at EOS.

Returns prompt ids, completion ids, a completion mask (1 up to and including the first EOS, 0 after), whether each
completion was truncated (no EOS within `max_new_tokens`), the decoded text, and (when sampling) the log-prob under
which the sampler drew each token, so the trainer's log-probs can be checked against it. Greedy mode is for evaluation.
"""

from __future__ import annotations

import contextlib
import hashlib
import math

import torch
from transformers import GenerationConfig, LogitsProcessor, StoppingCriteria, TemperatureLogitsWarper, TopPLogitsWarper

from common import dist
from common.data import has_chat_template, render_prompt


@contextlib.contextmanager
def _restore(obj, name, value):
    try:
        yield
    finally:
        setattr(obj, name, value)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS plus the generation config's (e.g. <|im_end|>)."""
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return sorted(ids)


def completion_mask(completion_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) completion ids -> mask (B, L) with 1 up to and including the first EOS, and truncated (B,) bool."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after_eos).long(), ~is_eos.any(-1)


def sampling_config(*, greedy: bool, max_new_tokens: int, eos_ids, pad_id, padding_rows=()):
    """A fresh generation config holding only what the script sets. A checkpoint's own `generation_config.json`
    (Qwen2.5-Instruct: repetition_penalty 1.05, top_k 20; others: no_repeat_ngram_size, min_new_tokens...) would
    otherwise still apply, so rollouts would come from another distribution than the one the loss computes
    log-probs under (softmax(logits / temperature), top-p only), and greedy evaluation would be penalized too.
    The processors that could still be switched on by a default are set to their no-op values explicitly; temperature
    and top-p stay at 1 here because `SamplerLogprobs`, the last processor, applies them (transformers would append
    its own warpers after it, and the recorded log-probs would not be those of the sampled distribution).
    `padding_rows`: head rows past the tokenizer's ids (padded embeddings), never sampled; the training log-probs
    (`completion_logprobs(..., vocab=len(tokenizer))`) are over the same support."""
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=1.0,
        top_p=1.0,
        top_k=0,  # 0: no top-k (transformers' global default would be 50)
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        suppress_tokens=list(padding_rows) or None,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        use_cache=True,
    )


class SamplerLogprobs(LogitsProcessor, StoppingCriteria):
    """Records log pi_sampler(token) for every sampled token: the log-softmax of the scores `generate` samples from,
    gathered at the token it drew. It is the last logits processor (the generation config's temperature and top-p
    are set to 1 so that transformers appends no warper after it; this object applies them itself, with
    transformers' own warpers, so the distribution is the one transformers would sample) and, as a stopping
    criterion that never stops anything, it sees each token once it is appended. One (B, V) fp32 log-softmax is kept
    between the two calls; what is recorded is (B,) per step, on the device (no host sync)."""

    def __init__(self, temperature: float, top_p: float):
        self.warpers = ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []) + (
            [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
        )
        self.pending = None  # (B, V) log-softmax of the last step's final scores
        self.steps = []  # per generated token: (B,) log-probs of the sampled tokens

    def __call__(self, input_ids, scores):
        if self.pending is None:  # logits processor: scores (B, V) -> warped scores, remembered
            for warper in self.warpers:
                scores = warper(input_ids, scores)
            self.pending = torch.log_softmax(scores.float(), dim=-1)
            return scores
        # stopping criterion: input_ids (B, T) now ends with the token sampled from `pending`
        self.steps.append(self.pending.gather(1, input_ids[:, -1:]).squeeze(1))
        self.pending = None
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def logprobs(self) -> torch.Tensor:
        return torch.stack(self.steps, dim=1)  # (B, L)


def logprob_mismatch(sampler_logps: torch.Tensor, trainer_logps: torch.Tensor, mask: torch.Tensor) -> dict:
    """How far the training forward's log-probs of the sampled tokens are from the sampler's: the mean and max of
    |log pi_sampler - log pi_trainer| over mask == 1 (B, L) on every process. ~1e-6 in fp32 with the same model;
    larger in bf16, with another kernel (vLLM), or with --top-p < 1 (the loss does not renormalize to the nucleus)."""
    diff = torch.where(mask.bool(), (sampler_logps.to(trainer_logps.device) - trainer_logps).abs(), 0.0)  # (B, L)
    return {
        "rollout/logprob_diff_mean": dist.masked_mean(diff, mask),
        "rollout/logprob_diff_max": dist.all_reduce(float(diff.max()), "max"),
    }


def rollout_correction(
    trainer_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor, mode: str, cap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance weights for the sampler/trainer mismatch: the rollouts come from pi_sampler (another kernel, bf16,
    a KV cache, vLLM) while the loss differentiates pi_trainer, so each sampled token's loss term is reweighted by
    rho_t = pi_trainer(y_t) / pi_sampler(y_t) (no gradient through the weight).

      none  w_t = 1
      tis   w_t = min(rho_t, C)                                 truncated IS (Yao et al. 2025, "Your efficient RL
                                                                framework secretly brings you off-policy RL training")
      mis   rho(y) = prod_t rho_t over the sequence's tokens;   sequence-masked IS (Liu et al. 2025, "When speed kills
            w_t = rho(y) if 1/C <= rho(y) <= C, else 0          stability"): a sequence the sampler drew far from the
                                                                trainer's distribution is dropped, the rest reweighted

    trainer_logps, sampler_logps, mask (B, L) -> weights (B, L) (1 where mask is 0) and `masked` (B, L) bool: the
    tokens whose weight the cap changed (tis: rho_t > C; mis: every token of a dropped sequence). With identical
    log-probs every weight is exactly 1. The sequence ratio stays in log space (a product of 4k ratios overflows)."""
    m = mask.bool()
    log_rho = torch.where(m, trainer_logps.detach().float() - sampler_logps.to(trainer_logps.device).float(), 0.0)
    if mode == "none":
        return torch.ones_like(log_rho), torch.zeros_like(m)
    if mode == "tis":
        masked = m & (log_rho > math.log(cap))
        return torch.exp(log_rho).clamp(max=cap), masked
    if mode == "mis":
        seq_log_rho = log_rho.sum(1, keepdim=True)  # (B, 1)
        keep = seq_log_rho.abs() <= math.log(cap)
        weights = torch.where(keep, torch.exp(seq_log_rho.clamp(max=math.log(cap))), 0.0).expand_as(log_rho)
        return torch.where(m, weights, 1.0), m & ~keep
    raise ValueError(f"unknown importance-sampling correction {mode!r}")


def correction_metrics(trainer_logps, sampler_logps, mask, mode: str, cap: float) -> dict:
    """The step's rho_t = pi_trainer / pi_sampler over the sampled tokens of every process (mean, min, max) and the
    fraction of those tokens whose weight the correction changed (`rollout_correction`'s `masked`)."""
    _, masked = rollout_correction(trainer_logps, sampler_logps, mask, mode, cap)
    m = mask.bool()
    rho = torch.exp(trainer_logps.float() - sampler_logps.to(trainer_logps.device).float())
    big = torch.finfo(torch.float32).max
    return {
        "rollout/is_ratio_mean": dist.masked_mean(torch.where(m, rho, 0.0), mask),
        "rollout/is_ratio_min": dist.all_reduce(float(torch.where(m, rho, big).min()), "min"),
        "rollout/is_ratio_max": dist.all_reduce(float(torch.where(m, rho, 0.0).max()), "max"),
        "rollout/is_masked_frac": dist.masked_mean(masked.float(), mask),
    }


def derive_seed(seed: int, stream: str, step: int, round_: int = 0, call: int = 0) -> int:
    """The one place every per-step seed of a run comes from: `stream` names what is seeded ("sample": a generate
    call, "minibatch": a PPO/GRPO epoch's shuffle), `step` the optimizer step, `round_` GRPO's resampling round or
    the epoch, `call` the generate call's global index within the step (process r's k-th call is
    r * calls_per_process + k, so N processes use the seeds one process does).

    Within a run (fixed `seed` and `stream`) the map is injective: (step, round, call) is packed into disjoint bit
    fields (32 + 8 + 20 bits) and XORed with a 64-bit value hashed from (stream, seed), so no two calls share a seed
    (an additive scheme such as `seed + 101 * step + call` collides as soon as a step makes 101 calls)."""
    for value, bits, name in ((step, 32, "step"), (round_, 8, "round"), (call, 20, "call")):
        if not 0 <= value < 2**bits:
            raise ValueError(f"derive_seed: {name} {value} is outside [0, 2**{bits})")
    offset = int.from_bytes(hashlib.sha256(f"cleanpost:{stream}:{seed}".encode()).digest()[:8], "little")
    return offset ^ ((step << 28) | (round_ << 20) | call)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list,
    *,
    n: int = 1,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    batch_size: int = 64,
    seed: int | None = None,
    seed_key: tuple[int, int, int] | None = None,
) -> dict:
    """Sample `n` completions per prompt (prompt-major: rows i*n .. i*n+n-1 belong to prompt i), `batch_size` rows
    per `model.generate` call; the global RNG is left as it was. `seed` seeds the whole call once; `seed_key`
    (run seed, step, round) seeds each `model.generate` call with `derive_seed(*seed_key, call=its global index)`:
    call k of process r (every process sampling an equal share) is call r * calls_per_process + k, so a batch's
    samples depend only on its rows and its index, and N processes reproduce a one-process run that uses the same
    `batch_size`.

    A sharded (FSDP) model is gathered once for the whole call (`common.dist.unsharded`): the ranks then generate
    independently, each as long as its own sequences need.

    prompts: strings or message lists. Returns dict with
      prompt_ids (B*n, P) left-padded, prompt_mask (B*n, P), completion_ids (B*n, L), completion_mask (B*n, L),
      truncated (B*n,) bool, texts list[str] (decoded completions without special tokens), and when sampling
      sampler_logps (B*n, L) fp32: log pi_sampler of each completion token (softmax(logits / temperature) after
      top-p, over the tokenizer's ids), 0 where completion_mask is 0.
    """
    device = next(model.parameters()).device
    texts = [render_prompt(tokenizer, p) for p in prompts for _ in range(n)]
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id
    tokenizer.padding_side = "left"
    rows = []
    first_call = dist.rank() * math.ceil(len(texts) / batch_size)  # this process's calls, in the global numbering
    config = sampling_config(
        greedy=greedy,
        max_new_tokens=max_new_tokens,
        eos_ids=eos_ids,
        pad_id=pad_id,
        padding_rows=range(len(tokenizer), model.get_output_embeddings().weight.shape[0]),  # (global shape if sharded)
    )
    checkpoint_config, model.generation_config = model.generation_config, config  # its values would be merged in
    fork = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    with fork, dist.unsharded(model), _restore(model, "generation_config", checkpoint_config):
        if seed is not None:
            torch.manual_seed(seed)
        for s in range(0, len(texts), batch_size):
            if seed_key is not None:
                run_seed, step, round_ = seed_key
                torch.manual_seed(derive_seed(run_seed, "sample", step, round_, first_call + s // batch_size))
            enc = tokenizer(
                texts[s : s + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=not has_chat_template(tokenizer),
            ).to(device)
            recorder = None if greedy else SamplerLogprobs(temperature, top_p)
            hooks = {} if greedy else {"logits_processor": [recorder], "stopping_criteria": [recorder]}
            out = model.generate(**enc, generation_config=config, synced_gpus=False, **hooks)  # synced: see above
            sampled = out[:, enc["input_ids"].shape[1] :]
            logps = recorder.logprobs() if recorder is not None else torch.zeros(sampled.shape, device=sampled.device)
            rows.append((enc["input_ids"], enc["attention_mask"], sampled, logps))
    P = max(r[0].shape[1] for r in rows)
    L = max(r[2].shape[1] for r in rows)

    def left_pad(x, width, value):
        return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

    def right_pad(x, width, value):
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

    prompt_ids = torch.cat([left_pad(r[0], P, pad_id) for r in rows])
    prompt_mask = torch.cat([left_pad(r[1], P, 0) for r in rows])
    completion_ids = torch.cat([right_pad(r[2], L, pad_id) for r in rows])
    mask, truncated = completion_mask(completion_ids, eos_ids)
    completion_ids = completion_ids.masked_fill(mask == 0, pad_id)
    decoded = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    out = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": mask,
        "truncated": truncated,
        "texts": decoded,
    }
    if not greedy:  # after EOS the rows were padded (their recorded values are meaningless, maybe -inf): 0
        out["sampler_logps"] = torch.cat([right_pad(r[3], L, 0.0) for r in rows]).masked_fill(mask == 0, 0.0)
    return out
