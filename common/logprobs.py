"""Token log-probabilities without materializing the `[tokens, vocab]` logits, and masked statistics.

Shapes: B batch, T sequence, N = rows (tokens), H hidden, V vocab.

`chunked_logprobs` is a custom autograd function: forward and backward each walk over `chunk_size` rows at a
time and keep only per-row scalars (the log-sum-exp) between the passes; backward recomputes each chunk's logits
and accumulates the LM-head weight gradient into one buffer. Peak memory is the weight gradient plus one chunk,
whatever N is. `token_logprobs` runs a transformers causal LM body once and applies its head this way.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_ELEMENTS = 2**23  # logits elements per chunk (32 MiB in fp32); rows = this // V


def _chunk_rows(n_rows: int, vocab: int, chunk_size: int | None) -> int:
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_ELEMENTS // vocab)
    return max(1, min(chunk_size, n_rows))


def _head_logits(h, weight, bias, softcap, temperature):
    """(rows, H) -> tempered fp32 logits (rows, V), and tanh(raw / softcap) (or None) for the backward pass.
    Order as in transformers: Gemma-2 `final_logit_softcapping` on the raw logits, then the sampling temperature."""
    z = h @ weight.t()  # (n, V)
    z = z.to(torch.promote_types(z.dtype, torch.float32))  # bf16/fp16 -> fp32; fp32/fp64 unchanged
    if bias is not None:
        z += bias
    t = None
    if softcap is not None:
        t = torch.tanh(z / softcap)
        z = t * softcap
    if temperature != 1.0:
        z /= temperature
    return z, t


class ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, softcap, chunk_size, with_entropy):
        # hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) long
        n, vocab = hidden.shape[0], weight.shape[0]
        rows = _chunk_rows(n, vocab, chunk_size)
        out_dtype = torch.promote_types(hidden.dtype, torch.float32)
        logps = hidden.new_empty(n, dtype=out_dtype)
        lse = hidden.new_empty(n, dtype=out_dtype)
        entropy = hidden.new_zeros(n if with_entropy else 0, dtype=out_dtype)
        for s in range(0, n, rows):
            z, _ = _head_logits(hidden[s : s + rows], weight, bias, softcap, temperature)
            lse_c = torch.logsumexp(z, dim=-1)  # (n,)
            logps[s : s + rows] = z.gather(-1, targets[s : s + rows, None]).squeeze(-1) - lse_c
            lse[s : s + rows] = lse_c
            if with_entropy:  # H = lse - sum_v p_v z_v; a diagnostic, no gradient
                p = torch.exp(z - lse_c[:, None])
                entropy[s : s + rows] = lse_c - torch.bmm(p[:, None, :], z[:, :, None]).view(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.softcap, ctx.rows = temperature, softcap, rows
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, _grad_entropy):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        temperature, softcap, rows = ctx.temperature, ctx.softcap, ctx.rows
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=acc_dtype) if need_w else None  # one buffer for all chunks
        grad_bias = torch.zeros(weight.shape[0], device=weight.device, dtype=acc_dtype) if need_b else None
        for s in range(0, hidden.shape[0], rows):
            h = hidden[s : s + rows]
            dz, t = _head_logits(h, weight, bias, softcap, temperature)  # recompute this chunk's logits
            # d logp[target] / dz = onehot(target) - softmax(z), times the incoming gradient g of each row
            g = grad_logps[s : s + rows].to(dz.dtype)
            dz.sub_(lse[s : s + rows, None]).exp_().mul_(-g[:, None])  # in place: dz = -g * softmax(z)
            dz.scatter_add_(-1, targets[s : s + rows, None], g[:, None])
            if temperature != 1.0:
                dz /= temperature
            if softcap is not None:
                dz.mul_(1 - t.square())  # d(softcap * tanh(x / softcap)) / dx
            if need_b:
                grad_bias += dz.sum(0)
            dz = dz.to(weight.dtype)
            if need_h:
                grad_hidden[s : s + rows] = dz @ weight
            if need_w:
                if dz.dtype == grad_weight.dtype:
                    grad_weight.addmm_(dz.t(), h)  # accumulate in place: no weight-sized temporary
                else:
                    grad_weight += dz.t() @ h
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def chunked_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    return_entropy: bool = False,
):
    """log softmax(head(hidden) / temperature)[targets], one chunk of rows at a time in forward and backward.

    hidden (..., H), weight (V, H), bias (V,) or None, targets (...) -> logps (...) in fp32 [, entropy (...)].
    `softcap`: Gemma-2-style final logit soft-capping, applied to the raw logits before the temperature.
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
        return_entropy,
    )
    return (logps.view(shape), entropy.view(shape)) if return_entropy else logps.view(shape)


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
    return head.weight, getattr(head, "bias", None), softcap, multiplier


def token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_entropy: bool = False,
):
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) for t = 0..T-2, under `model` at `temperature`.

    input_ids, attention_mask (B, T) -> logps (B, T-1) fp32 [, entropy (B, T-1)]; any padding side: position ids
    are derived from the attention mask (left padding is what generation produces). Values at padded positions
    are meaningless; mask them. The model body runs once; the LM head goes through `chunked_logprobs`.

    Naive equivalent:
        logits = model(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, :-1]
        torch.log_softmax(logits.float() / temperature, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # (B, T)
    out = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    hidden = out.last_hidden_state[:, :-1]  # (B, T-1, H)
    weight, bias, softcap, multiplier = lm_head_params(model)
    if multiplier != 1.0 and softcap is not None:
        raise NotImplementedError("a logit multiplier together with soft-capping")
    return chunked_logprobs(
        hidden,
        weight,
        input_ids[:, 1:],
        bias=bias,
        temperature=temperature / multiplier,
        softcap=softcap,
        chunk_size=chunk_size,
        return_entropy=return_entropy,
    )


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


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is 1. x, mask (...) -> scalar, or (...) without `dim`.
    Naive: `x[mask.bool()].mean()` (for dim=None)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over mask==1. Naive: `x[mask.bool()].var(unbiased=unbiased)`."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp_min(1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over mask==1 (unbiased std); with shift_mean=False the mean is added back.
    Naive: `v = x[mask.bool()]; (x - v.mean()) / sqrt(v.var() + eps)` — values at mask==0 are not meaningful."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean
