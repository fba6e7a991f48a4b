"""Token log-probabilities without materializing the `[tokens, vocab]` logits, and masked statistics.

Shapes: B batch, T sequence, N = rows (tokens), H hidden, V vocab.

`chunked_logprobs` is a custom autograd function that tiles the LM head over blocks of rows and, inside each block,
over slices of the vocabulary, with an online log-sum-exp (the flash-attention trick applied to the softmax over V).
Between forward and backward it keeps only one scalar a row (the log-sum-exp); backward recomputes each tile's logits
and writes the weight gradient slice by slice into one buffer. Peak memory is the weight gradient plus one tile,
whatever N is; each weight slice is read once per row block, so the matmuls stay large and fast.
`token_logprobs` runs a transformers causal LM body once and applies its head this way.
"""

from __future__ import annotations

import math

import torch

from common import dist

DEFAULT_ROWS = 4096  # rows per block
DEFAULT_TILE_ELEMENTS = 2**23  # logits elements per tile (32 MiB in fp32): vocab slice = this // rows


def _tiles(n_rows: int, vocab: int, chunk_size: int | None, vocab_chunk_size: int | None) -> tuple[int, int]:
    rows = max(1, min(chunk_size or DEFAULT_ROWS, n_rows))
    return rows, max(1, min(vocab_chunk_size or max(128, DEFAULT_TILE_ELEMENTS // rows), vocab))


def logits_fp32(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """h (n, H) @ weight (v, H).T with an fp32 (or wider) result that bf16/fp16 inputs are not rounded into: the
    products are accumulated in fp32 either way, but a bf16 result keeps 8 bits of each logit (at |z| ~ 10 an error
    of ~0.03), which moved log p by 0.016 nats on average (0.045 at p99) at Qwen3's vocabulary. On CUDA the GEMM
    writes fp32 directly (`torch.mm(..., out_dtype=torch.float32)`, the bf16 kernel's speed); elsewhere the
    inputs are upcast first (one weight slice at a time)."""
    if h.dtype in (torch.float32, torch.float64):
        z = h @ weight.t()
    elif h.device.type == "cuda" and _MM_OUT_DTYPE:
        z = torch.mm(h, weight.t(), out_dtype=torch.float32)
    else:
        z = h.float() @ weight.float().t()
    return z if z.dtype in (torch.float32, torch.float64) else z.float()  # (an autocast region computes in bf16)


_MM_OUT_DTYPE = "dtype" in getattr(torch.ops.aten.mm, "overloads", list)()  # aten::mm.dtype, torch >= 2.8


def _head_logits(h, weight, bias, softcap, temperature):
    """(rows, H) -> tempered fp32 logits (rows, v), and tanh(raw / softcap) (or None) for the backward pass.
    Order as in transformers: Gemma-2 `final_logit_softcapping` on the raw logits, then the sampling temperature."""
    z = logits_fp32(h, weight)  # (n, v) fp32 (fp64 for fp64 inputs)
    if bias is not None:
        z += bias
    t = None
    if softcap is not None:
        t = torch.tanh(z / softcap)
        z = t * softcap
    if temperature != 1.0:
        z /= temperature
    return z, t


def _slice(bias, v0, v1):
    return None if bias is None else bias[v0:v1]


class ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, softcap, chunk_size, vocab_chunk_size, with_entropy):
        # hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) long
        n, vocab = hidden.shape[0], weight.shape[0]
        rows, cols = _tiles(n, vocab, chunk_size, vocab_chunk_size)
        out_dtype = torch.promote_types(hidden.dtype, torch.float32)
        logps = hidden.new_empty(n, dtype=out_dtype)
        lse = hidden.new_empty(n, dtype=out_dtype)
        entropy = hidden.new_zeros(n if with_entropy else 0, dtype=out_dtype)
        for r0 in range(0, n, rows):
            h, tgt = hidden[r0 : r0 + rows], targets[r0 : r0 + rows]
            m = h.new_full((h.shape[0],), -float("inf"), dtype=out_dtype)  # running max
            sumexp = h.new_zeros(h.shape[0], dtype=out_dtype)  # running sum of exp(z - m)
            sum_pz = h.new_zeros(h.shape[0], dtype=out_dtype)  # running sum of exp(z - m) * z (entropy)
            target_logit = h.new_zeros(h.shape[0], dtype=out_dtype)
            for v0 in range(0, vocab, cols):
                z, _ = _head_logits(h, weight[v0 : v0 + cols], _slice(bias, v0, v0 + cols), softcap, temperature)
                new_m = torch.maximum(m, z.max(-1).values)
                rescale = torch.exp(m - new_m)
                e = (z - new_m[:, None]).exp_()  # exp(z - m), in place: the only other tile-sized buffer
                sumexp = sumexp * rescale + e.sum(-1)
                if with_entropy:
                    sum_pz = sum_pz * rescale + torch.bmm(e[:, None, :], z[:, :, None]).view(-1)
                m = new_m
                inside = (tgt >= v0) & (tgt < v0 + z.shape[1])
                picked = z.gather(-1, (tgt - v0).clamp(0, z.shape[1] - 1)[:, None]).squeeze(-1)
                target_logit = torch.where(inside, picked, target_logit)
            lse_r = m + sumexp.log()
            lse[r0 : r0 + rows] = lse_r
            logps[r0 : r0 + rows] = target_logit - lse_r
            if with_entropy:  # H = lse - E_p[z]; a diagnostic, no gradient
                entropy[r0 : r0 + rows] = lse_r - sum_pz / sumexp
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.softcap, ctx.tiles = temperature, softcap, (rows, cols)
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, _grad_entropy):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        temperature, softcap, (rows, cols) = ctx.temperature, ctx.softcap, ctx.tiles
        n, vocab = hidden.shape[0], weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros_like(weight, dtype=acc_dtype) if need_w else None  # one buffer for all tiles
        grad_bias = torch.zeros(vocab, device=weight.device, dtype=acc_dtype) if need_b else None
        for r0 in range(0, n, rows):
            h, tgt = hidden[r0 : r0 + rows], targets[r0 : r0 + rows]
            g = grad_logps[r0 : r0 + rows].to(lse.dtype)
            grad_h = torch.zeros(h.shape, dtype=acc_dtype, device=h.device) if need_h else None
            for v0 in range(0, vocab, cols):
                w = weight[v0 : v0 + cols]
                dz, t = _head_logits(h, w, _slice(bias, v0, v0 + cols), softcap, temperature)  # recompute
                # d logp[target] / dz = onehot(target) - softmax(z), times the incoming gradient g of each row
                dz.sub_(lse[r0 : r0 + rows, None]).exp_().mul_(-g[:, None])  # in place: dz = -g * softmax(z)
                inside = (tgt >= v0) & (tgt < v0 + dz.shape[1])
                dz.scatter_add_(-1, (tgt - v0).clamp(0, dz.shape[1] - 1)[:, None], (g * inside)[:, None])
                if temperature != 1.0:
                    dz /= temperature
                if softcap is not None:
                    dz.mul_(1 - t.square())  # d(softcap * tanh(x / softcap)) / dx
                if need_b:
                    grad_bias[v0 : v0 + cols] += dz.sum(0)
                dz = dz.to(weight.dtype)
                if need_h:
                    grad_h.addmm_(dz, w) if dz.dtype == acc_dtype else grad_h.add_(dz @ w)
                if need_w:  # each slice of the weight gradient is written here and nowhere else
                    gw = grad_weight[v0 : v0 + cols]
                    gw.addmm_(dz.t(), h) if dz.dtype == acc_dtype else gw.add_(dz.t() @ h)
            if need_h:
                grad_hidden[r0 : r0 + rows] = grad_h
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def chunked_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    return_entropy: bool = False,
):
    """log softmax(head(hidden) / temperature)[targets], tile by tile (`chunk_size` rows a block) in forward and
    backward, so no (N, V) tensor exists.

    hidden (..., H), weight (V, H), bias (V,) or None, targets (...) -> logps (...) in fp32 [, entropy (...)].
    `softcap`: Gemma-2-style final logit soft-capping, applied to the raw logits before the temperature.
    `chunk_size` rows a block (default 4096) and `vocab_chunk_size` vocabulary entries a tile (default: 2**23 logits
    a tile) bound the memory; they do not change the result beyond float rounding.
    Entropy of the tempered distribution comes from the same pass and carries no gradient.

    Naive equivalent (materializes (..., V) logits several times over):
        logits = hidden @ weight.T + bias
        if softcap: logits = softcap * tanh(logits / softcap)
        logps = torch.log_softmax(logits.float() / temperature, -1).gather(-1, targets[..., None]).squeeze(-1)
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    shape = targets.shape
    logps, entropy = ChunkedLogprobs.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        bias,
        targets.reshape(-1),
        float(temperature),
        softcap,
        chunk_size,
        vocab_chunk_size,
        return_entropy,
    )
    return (logps.view(shape), entropy.view(shape)) if return_entropy else logps.view(shape)


@torch.no_grad()
def chunked_logprobs_and_rank(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's log-prob and its rank (how many vocabulary entries have a strictly larger logit; 0 = the
    argmax), tile by tile as `chunked_logprobs` (no (N, V) tensor; no gradient). Two passes over the vocabulary:
    the online log-sum-exp and the target's logit (picked from its tile), then the count against that same value,
    so the target never outranks itself.

    hidden (..., H), weight (V, H), targets (...) -> logps (...) fp32, rank (...) long.
    Naive equivalent:
        logp = torch.log_softmax(head(hidden) / temperature, -1)          # (..., V)
        chosen = logp.gather(-1, targets[..., None])[..., 0]
        rank = (logp > chosen[..., None]).sum(-1)
    """
    shape = targets.shape
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    n, vocab = hidden.shape[0], weight.shape[0]
    rows, cols = _tiles(n, vocab, chunk_size, vocab_chunk_size)
    out_dtype = torch.promote_types(hidden.dtype, torch.float32)
    logps = hidden.new_empty(n, dtype=out_dtype)
    rank = torch.zeros(n, dtype=torch.long, device=hidden.device)
    for r0 in range(0, n, rows):
        h, tgt = hidden[r0 : r0 + rows], targets[r0 : r0 + rows]
        m = h.new_full((h.shape[0],), -float("inf"), dtype=out_dtype)
        sumexp = h.new_zeros(h.shape[0], dtype=out_dtype)
        target_logit = h.new_zeros(h.shape[0], dtype=out_dtype)
        for v0 in range(0, vocab, cols):
            z, _ = _head_logits(h, weight[v0 : v0 + cols], _slice(bias, v0, v0 + cols), softcap, temperature)
            new_m = torch.maximum(m, z.max(-1).values)
            sumexp = sumexp * torch.exp(m - new_m) + (z - new_m[:, None]).exp_().sum(-1)
            m = new_m
            inside = (tgt >= v0) & (tgt < v0 + z.shape[1])
            picked = z.gather(-1, (tgt - v0).clamp(0, z.shape[1] - 1)[:, None]).squeeze(-1)
            target_logit = torch.where(inside, picked, target_logit)
        logps[r0 : r0 + rows] = target_logit - (m + sumexp.log())
        for v0 in range(0, vocab, cols):  # the same tiles again: rank against the target's logit as computed
            z, _ = _head_logits(h, weight[v0 : v0 + cols], _slice(bias, v0, v0 + cols), softcap, temperature)
            rank[r0 : r0 + rows] += (z > target_logit[:, None]).sum(-1)
    return logps.view(shape), rank.view(shape)


def lm_head_params(model) -> tuple[torch.Tensor, torch.Tensor | None, float | None, float]:
    """(weight, bias, softcap, logit_multiplier) of a transformers causal LM's output layer, read from the model and
    its config so that `chunked_logprobs` reproduces `model(...).logits` exactly: tied embeddings share the weight,
    a head bias is used if present, Gemma-2 soft-capping from `final_logit_softcapping`, Cohere's `logit_scale` and
    Granite's `logits_scaling` as a multiplier."""
    head = model.get_output_embeddings()
    cfg = model.config
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    softcap = getattr(cfg, "final_logit_softcapping", None) or None
    multiplier = 1.0
    if getattr(cfg, "logit_scale", None):
        multiplier *= float(cfg.logit_scale)
    if getattr(cfg, "logits_scaling", None):
        multiplier /= float(cfg.logits_scaling)
    if getattr(cfg, "lm_head_multiplier", None):  # Falcon-H1
        multiplier *= float(cfg.lm_head_multiplier)
    return head.weight, getattr(head, "bias", None), softcap, multiplier


@torch.no_grad()
def check_fused_head(model, name: str, tokens: int = 16) -> float:
    """Stop with one line naming the architecture when `token_logprobs` (the model body + our fused head, see
    `lm_head_params`) does not reproduce the model's own logits: an architecture that scales or transforms its
    logits in a way we do not know would otherwise train on wrong log-probs silently. One forward of `tokens`
    tokens; tolerance: mean |difference| 1e-3 nats in fp32, 0.05 in bf16/fp16 (the model's own logits are rounded
    to the compute dtype there). Returns the mean difference."""
    from common import die

    was_training = model.training
    model.eval()
    vocab = model.get_output_embeddings().weight.shape[0]
    device = model.get_output_embeddings().weight.device
    ids = (torch.arange(tokens, device=device)[None, :] * 7919 + 13) % vocab  # (1, T) spread over the vocabulary
    mask = torch.ones_like(ids)
    arch = type(model).__name__
    try:
        with torch.no_grad():
            fused = token_logprobs(model, ids, mask)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    except Exception as e:  # noqa: BLE001 -- any failure here means the fused path does not fit this model
        die(f"{name} ({arch}): the fused log-prob head cannot run on this architecture ({type(e).__name__}: {e})")
    finally:
        model.train(was_training)
    naive = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    diff = float((fused - naive).abs().mean())
    tolerance = 1e-3 if logits.dtype in (torch.float32, torch.float64) else 0.05
    if not diff <= tolerance:
        die(
            f"{name} ({arch}): the fused log-prob head differs from the model's own logits by {diff:.3g} nats a "
            f"token (tolerance {tolerance}); this architecture transforms its logits in a way common/logprobs.py "
            "does not reproduce (see lm_head_params)"
        )
    return diff


def token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_entropy: bool = False,
    vocab: int | None = None,
    target_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
):
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) for t = 0..T-2, under `model` at `temperature`, the softmax
    over the first `vocab` rows of the head (the tokenizer's ids: checkpoints pad their embeddings past them, e.g.
    Qwen3's 151,936 rows for 151,669 tokens, and `common.generation` samples from the same support) or all rows.

    input_ids, attention_mask (B, T) -> logps (B, T-1) fp32 [, entropy (B, T-1)]; any padding side: position ids
    are derived from the attention mask (left padding is what generation produces). Values at padded positions
    are meaningless; mask them. The model body runs once; the LM head goes through `chunked_logprobs` (inside the
    model's forward hooks when it is FSDP-sharded, see `common.dist.root_forward`).
    `target_mask` (B, T-1): the positions whose log-prob is needed (completion tokens, SFT loss tokens); the head
    runs on those rows only (their hidden states are gathered first: one host sync for their count) and the other
    positions are 0. With a 1k-token prompt and a 512-token completion that is a third of the head's work.
    `position_ids` (B, T): packed rows (`common.data.packed_micro_batches`), the positions restarting at each
    example; the body then gets no attention mask, and transformers attends within each example only.

    Naive equivalent:
        logits = model(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, :-1]
        torch.log_softmax(logits.float() / temperature, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    """
    return dist.root_forward(
        model,
        _token_logprobs,
        input_ids,
        attention_mask,
        temperature=temperature,
        chunk_size=chunk_size,
        return_entropy=return_entropy,
        vocab=vocab,
        target_mask=target_mask,
        position_ids=position_ids,
    )


def _token_logprobs(
    model, input_ids, attention_mask, *, temperature, chunk_size, return_entropy, vocab, target_mask, position_ids
):
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # (B, T)
    else:  # packed: the example boundaries are in the positions (transformers' packed-sequence masking)
        attention_mask = None
    out = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    hidden = out.last_hidden_state[:, :-1]  # (B, T-1, H)
    targets = input_ids[:, 1:]  # (B, T-1)
    weight, bias, softcap, multiplier = lm_head_params(model)
    if vocab is not None:  # (V, H) -> (vocab, H): padding rows are no tokens
        weight, bias = weight[:vocab], None if bias is None else bias[:vocab]
    if multiplier != 1.0 and softcap is not None:
        raise NotImplementedError("a logit multiplier together with soft-capping")
    rows = None
    if target_mask is not None:  # only the rows that need a log-prob go through the head
        rows, (hidden, targets) = gather_rows(target_mask, hidden, targets)  # (N,), (N, H), (N,)
    out = chunked_logprobs(
        hidden,
        weight,
        targets,
        bias=bias,
        temperature=temperature / multiplier,
        softcap=softcap,
        chunk_size=chunk_size,
        return_entropy=return_entropy,
    )
    if rows is None:
        return out
    if return_entropy:  # (N,) -> (B, T-1), 0 where no log-prob was asked for
        return tuple(scatter_rows(o, rows, target_mask.shape) for o in out)
    return scatter_rows(out, rows, target_mask.shape)


def gather_rows(mask: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The positions where `mask` (B, T) is set, and each tensor (B, T, ...) at those positions only (N, ...): what
    the LM head runs on (one host sync, for N). `scatter_rows` puts per-row results back."""
    rows = mask.reshape(-1).nonzero().squeeze(-1)  # (N,)
    return rows, [t.reshape(-1, *t.shape[mask.dim() :]).index_select(0, rows) for t in tensors]


def scatter_rows(x: torch.Tensor, rows: torch.Tensor, shape, fill=0) -> torch.Tensor:
    """(N,) values at `rows` of `gather_rows` -> `shape` (B, T), `fill` elsewhere (differentiable in x)."""
    return x.new_full((math.prod(shape),), fill).index_copy(0, rows, x).view(shape)


def completion_logprobs(
    model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature, action_mask=None, **kw
):
    """log pi(completion tokens | prompt, earlier completion tokens) at `temperature`: (B, L) [, entropy (B, L)].

    prompt_ids/prompt_mask (B, P) left-padded, completion_ids/completion_mask (B, L) right-padded, as
    `common.generation.generate` returns them; one forward over the concatenation (B, P+L), the LM head only on the
    completion tokens (`target_mask`), so 0 where completion_mask is 0. Pass `vocab=len(tokenizer)` (see
    `token_logprobs`) so the log-probs are those of the distribution `generate` sampled from.
    `action_mask` (B, L): a multi-turn episode's sampled tokens (`common.environments`); completion_mask then
    covers the whole episode after the prompt (tool results too, which are context), and the head runs, and
    log-probs are nonzero, on the action tokens only."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, P+L)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    P = prompt_ids.shape[1]
    targets = completion_mask if action_mask is None else action_mask
    target_mask = torch.cat([torch.zeros_like(prompt_mask[:, 1:]), targets], dim=1).bool()  # (B, P+L-1)
    out = token_logprobs(model, input_ids, attention_mask, temperature=temperature, target_mask=target_mask, **kw)
    if isinstance(out, tuple):
        return tuple(o[:, P - 1 :] for o in out)
    return out[:, P - 1 :]


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[index] row by row, without a full (..., V) log-softmax tensor.

    logits (..., V), index (...) -> (...). Naive: `torch.log_softmax(logits, -1).gather(-1, index[..., None])[..., 0]`.
    """
    out = []
    for lg, ix in zip(logits.reshape(-1, logits.shape[-1]).split(1024), index.reshape(-1).split(1024)):
        out.append(lg.gather(-1, ix[:, None]).squeeze(-1).float() - torch.logsumexp(lg.float(), dim=-1))
    return torch.cat(out).view(index.shape)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Entropy of softmax(logits) per row, chunked. logits (..., V) -> (...).
    Naive: `-(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)`."""
    flat = logits.reshape(-1, logits.shape[-1])
    out = []
    for lg in flat.split(chunk_size):
        lg = lg.float()
        logp = torch.log_softmax(lg, -1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out).view(logits.shape[:-1])
