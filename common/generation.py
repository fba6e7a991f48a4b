"""Batched generation from a list of prompts: chat template, left padding, KV cache, stop at EOS.

Returns prompt ids, completion ids, a completion mask (1 up to and including the first EOS, 0 after), whether each
completion was truncated (no EOS within `max_new_tokens`), the decoded text, and (when sampling) the log-prob under
which the sampler drew each token, so the trainer's log-probs can be checked against it. Greedy mode is for evaluation.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import itertools
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


def kv_bytes_per_token(model) -> int:
    """Bytes of KV cache one token takes in `model`: 2 (K and V) x layers x KV heads x head dim x the parameters'
    element size (an upper bound: sliding-window layers keep less, and a cache in a lower compute dtype too)."""
    cfg = model.config.get_text_config(decoder=True)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * next(model.parameters()).element_size()


def generation_token_budget(model, device: torch.device, optimizer, fraction: float = 0.5) -> int:
    """The default of --generation-max-tokens for sampling from `model`: on a GPU, `fraction` of the memory free
    now, less what training will still allocate (gradients of what `optimizer` updates, and AdamW's two moments
    while it holds no state yet, each the size of those parameters; under FSDP the full weights that generation
    gathers beside the shards), divided by the KV bytes per token; the smallest over processes, so every process
    batches alike. The other (1 - fraction) is left to the training phase's activations. Off a GPU: 0 (no bound),
    host memory holds the cache."""
    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)

    def local_bytes(p):  # the process's shard of a DTensor, else the tensor
        return (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()

    trained = sum(local_bytes(p) for group in optimizer.param_groups for p in group["params"])
    states = 1 + (0 if optimizer.state else 2)  # gradients (+ exp_avg, exp_avg_sq before the first step)
    gathered = sum(p.numel() * p.element_size() - local_bytes(p) for p in model.parameters())  # 0 unsharded
    tokens = int(fraction * max(0, free - states * trained - gathered) // kv_bytes_per_token(model))
    return max(1, int(dist.all_reduce(tokens, "min")))


def token_parts(attention_mask: torch.Tensor, max_new_tokens: int, max_tokens: int) -> list[slice]:
    """Split a left-padded batch (b, P) of prompts, in order, into consecutive row ranges whose KV cache,
    rows x (their longest prompt + max_new_tokens) tokens, fits `max_tokens` (0: no bound, one part). A row that
    alone exceeds the bound is a part of its own."""
    n_rows = attention_mask.shape[0]
    if max_tokens <= 0:
        return [slice(0, n_rows)]
    lengths = attention_mask.sum(-1).tolist()  # (host tensor: no device sync)
    parts, start, longest = [], 0, 0
    for i, length in enumerate(lengths):
        longest_with = max(longest, length)
        if i > start and (i - start + 1) * (longest_with + max_new_tokens) > max_tokens:
            parts.append(slice(start, i))
            start, longest_with = i, length
        longest = longest_with
    parts.append(slice(start, n_rows))
    return parts


def trim_left_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the leading columns that are padding in every row: a part of a left-padded batch then equals that part
    tokenized alone."""
    width = int(attention_mask.sum(-1).max())
    return input_ids[:, -width:], attention_mask[:, -width:]


def cache_kwarg(model) -> str | None:
    """The name under which `model`'s forward (and `generate`) take a KV cache: `cache` (transformers >= 5.20),
    `past_key_values` (before); None when the forward cannot return only the last position's logits
    (`logits_to_keep`), which `shared_prefill` needs not to build (U, P, V) logits."""
    params = inspect.signature(model.forward).parameters
    if "logits_to_keep" not in params:
        return None
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def shared_prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, group_sizes: list[int], kwarg: str):
    """The KV cache of each group's prompt but its last token, computed once per group and copied to the group's
    rows. input_ids, attention_mask: (b, P) left-padded, rows of a group consecutive and equal; group_sizes sum to b.
    Returns a transformers Cache holding P - 1 positions for each of the b rows (positions from the mask, as
    `generate` computes them), which `model.generate(input_ids, attention_mask, <kwarg>=cache)` continues from.
    The forward goes through the root module (FSDP's hooks need it) with one position of logits kept."""
    from transformers import DynamicCache

    sizes = torch.tensor(group_sizes, device=input_ids.device)
    first = sizes.cumsum(0) - sizes  # (U,) the first row of each group
    ids, mask = input_ids[first, :-1], attention_mask[first, :-1]  # (U, P-1)
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    position_ids = (mask.long().cumsum(-1) - 1).clamp_min(0)
    model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1,
        **{kwarg: cache},
    )
    cache.reorder_cache(torch.repeat_interleave(torch.arange(len(group_sizes), device=input_ids.device), sizes))
    return cache


def left_padded(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Token id lists -> {"input_ids", "attention_mask"} (b, P), left-padded, as the tokenizer pads prompts."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask}


def context_groups(rows: list[list[int]]) -> torch.Tensor:
    """(b,) group index of each row: consecutive equal token lists form one group (one shared prefill)."""
    index = [0]
    for prev, row in itertools.pairwise(rows):
        index.append(index[-1] + (row != prev))
    return torch.tensor(index)


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
    max_tokens: int = 0,
    share_prefill: bool = True,
    seed: int | None = None,
    seed_key: tuple[int, int, int] | None = None,
    seed_stream: str = "sample",
    first_call: int | None = None,
    prompt_ids: list[list[int]] | None = None,
) -> dict:
    """Sample `n` completions per prompt (prompt-major: rows i*n .. i*n+n-1 belong to prompt i), at most
    `batch_size` rows per `model.generate` call, and (`max_tokens` > 0) at most `max_tokens` tokens of KV cache per
    call, counted as rows x (the call's longest prompt + max_new_tokens): a batch of `batch_size` rows that does
    not fit is split, in order, into parts that do (a single row always runs). The global RNG is left as it was.
    `seed` seeds the whole call once; `seed_key` (run seed, step, round) seeds each `model.generate` call with
    `derive_seed(*seed_key, call=...)`: batch k of process r (every process sampling an equal share) is batch
    r * batches_per_process + k, and its part j gets `call = batch | j << 14` (part 0: the batch's own seed), so a
    call's samples depend only on its rows and its index, and N processes reproduce a one-process run that uses the
    same `batch_size` and `max_tokens`.

    `share_prefill`: the rows of one prompt in a call (a group) share one prefill. The prompt, but its last token,
    goes through the model once per prompt and its KV cache is copied to the group's rows
    (`Cache.reorder_cache`, the cache API beam search uses, so sliding-window and hybrid caches are handled by
    transformers); `model.generate` then starts from that cache and feeds each row's last prompt token itself.
    The sampled tokens and their log-probs are those of the unshared path (same inputs, same RNG draws; the
    prefill's floating-point rounding may differ in the last bits), at 1/n of the prefill's compute.

    A sharded (FSDP) model is gathered once for the whole call (`common.dist.unsharded`): the ranks then generate
    independently, each as long as its own sequences need.

    `prompt_ids`: the prompts as token id lists instead (`prompts` is then ignored): a multi-turn episode's context
    (`common.environments`), continued as it is, never re-rendered; consecutive equal rows share a prefill.
    `seed_stream` names the `derive_seed` stream of `seed_key` (a multi-turn episode's later turns use their own),
    and `first_call` overrides this process's first call index in the global numbering (default: rank x its calls).

    prompts: strings or message lists. Returns dict with
      prompt_ids (B*n, P) left-padded, prompt_mask (B*n, P), completion_ids (B*n, L), completion_mask (B*n, L),
      truncated (B*n,) bool, texts list[str] (decoded completions without special tokens), and when sampling
      sampler_logps (B*n, L) fp32: log pi_sampler of each completion token (softmax(logits / temperature) after
      top-p, over the tokenizer's ids), 0 where completion_mask is 0.
    """
    device = next(model.parameters()).device
    if prompt_ids is None:
        texts = [render_prompt(tokenizer, p) for p in prompts for _ in range(n)]
    else:  # token contexts: row i is prompt i // n, groups of consecutive equal contexts share their prefill
        texts = [ids for ids in prompt_ids for _ in range(n)]
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id
    tokenizer.padding_side = "left"
    rows = []
    if first_call is None:
        first_call = dist.rank() * math.ceil(len(texts) / batch_size)  # this process's calls, in the global numbering
    config = sampling_config(
        greedy=greedy,
        max_new_tokens=max_new_tokens,
        eos_ids=eos_ids,
        pad_id=pad_id,
        padding_rows=range(len(tokenizer), model.get_output_embeddings().weight.shape[0]),  # (global shape if sharded)
    )
    checkpoint_config, model.generation_config = model.generation_config, config  # its values would be merged in
    share_kwarg = cache_kwarg(model) if share_prefill and not model.config.is_encoder_decoder else None
    fork = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    with fork, dist.unsharded(model), _restore(model, "generation_config", checkpoint_config):
        if seed is not None:
            torch.manual_seed(seed)
        for s in range(0, len(texts), batch_size):
            if prompt_ids is None:
                enc = tokenizer(
                    texts[s : s + batch_size],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=not has_chat_template(tokenizer),
                )
                prompt_index = (s + torch.arange(enc["input_ids"].shape[0])) // n  # (b,) which prompt each row is
            else:
                enc = left_padded(texts[s : s + batch_size], pad_id)
                prompt_index = context_groups(texts[s : s + batch_size])
            for part, part_rows in enumerate(token_parts(enc["attention_mask"], max_new_tokens, max_tokens)):
                if seed_key is not None:
                    run_seed, step, round_ = seed_key
                    call = first_call + s // batch_size
                    if call >= 2**14 or part >= 2**6:
                        raise ValueError(
                            f"generate: batch {call} part {part} is past the seed layout's 2**14 batches x 2**6 "
                            "parts: raise --generation-batch-size or --generation-max-tokens"
                        )
                    torch.manual_seed(derive_seed(run_seed, seed_stream, step, round_, call | part << 14))
                ids, mask = trim_left_padding(enc["input_ids"][part_rows], enc["attention_mask"][part_rows])
                ids, mask = ids.to(device), mask.to(device)
                groups = torch.unique_consecutive(prompt_index[part_rows], return_counts=True)[1].tolist()
                recorder = None if greedy else SamplerLogprobs(temperature, top_p)
                hooks = {} if greedy else {"logits_processor": [recorder], "stopping_criteria": [recorder]}
                if share_kwarg and len(groups) < len(ids) and ids.shape[1] > 1:
                    hooks[share_kwarg] = shared_prefill(model, ids, mask, groups, share_kwarg)
                out = model.generate(
                    input_ids=ids, attention_mask=mask, generation_config=config, synced_gpus=False, **hooks
                )  # synced_gpus: see above
                sampled = out[:, ids.shape[1] :]
                logps = recorder.logprobs() if recorder is not None else torch.zeros(sampled.shape, device=device)
                rows.append((ids, mask, sampled, logps))
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
