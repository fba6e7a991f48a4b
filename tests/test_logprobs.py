"""chunked_logprobs / token_logprobs against naive full-logits computations (values and gradients), and the
masked statistics against their plain definitions."""

import pytest
import torch
import transformers

from common.logprobs import (
    chunked_logprobs,
    completion_logprobs,
    entropy_from_logits,
    selective_log_softmax,
    token_logprobs,
)


def naive_logprobs(hidden, weight, targets, bias=None, temperature=1.0, softcap=None):
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, targets[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def assert_rel_close(a, b, rtol=1e-5):
    scale = b.abs().max().clamp_min(1e-6)
    assert (a - b).abs().max() / scale <= rtol, f"max rel err {((a - b).abs().max() / scale).item():.3g}"


@pytest.mark.parametrize(
    "n,h,v,temperature,chunk,vchunk,use_bias,softcap",
    [
        (37, 16, 50, 1.0, 8, 7, False, None),  # neither chunk divides its dimension
        (64, 32, 97, 0.7, 10, 32, True, None),
        (5, 8, 300, 1.3, 3, 41, False, 30.0),  # soft-capping (Gemma-2)
        (100, 24, 61, 2.0, None, None, True, 5.0),  # default tiling
        (13, 16, 40, 1.0, 1000, 1000, False, None),  # one tile larger than the whole problem
        (9, 8, 33, 0.5, 4, 1, True, None),  # one vocabulary entry a tile
    ],
)
def test_chunked_matches_naive_values_and_grads(n, h, v, temperature, chunk, vchunk, use_bias, softcap):
    g = torch.Generator().manual_seed(n * v)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = (torch.randn(v, h, generator=g) * 0.3).requires_grad_()
    bias = (torch.randn(v, generator=g) * 0.1).requires_grad_() if use_bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    upstream = torch.randn(n, generator=g)  # an arbitrary downstream loss: sum(upstream * logps)

    logps, entropy = chunked_logprobs(
        hidden,
        weight,
        targets,
        bias=bias,
        temperature=temperature,
        softcap=softcap,
        chunk_size=chunk,
        vocab_chunk_size=vchunk,
        return_entropy=True,
    )
    ref, ref_entropy = naive_logprobs(hidden, weight, targets, bias, temperature, softcap)
    assert_rel_close(logps, ref)
    assert_rel_close(entropy, ref_entropy)
    params = [hidden, weight] + ([bias] if use_bias else [])
    grads = torch.autograd.grad((upstream * logps).sum(), params)
    ref_grads = torch.autograd.grad((upstream * ref).sum(), params)
    for got, want in zip(grads, ref_grads):
        assert_rel_close(got, want)


def test_chunked_exact_in_float64_and_batched_shapes():
    hidden = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 40, (3, 7))
    logps = chunked_logprobs(hidden, weight, targets, temperature=0.9, chunk_size=4, vocab_chunk_size=9)
    ref, _ = naive_logprobs(hidden, weight, targets, temperature=0.9)
    assert logps.shape == (3, 7)
    torch.testing.assert_close(logps, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(logps.sum(), weight)[0], torch.autograd.grad(ref.sum(), weight)[0])


def test_chunked_rejects_nonpositive_temperature():
    with pytest.raises(ValueError, match="temperature"):
        chunked_logprobs(torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long), temperature=0.0)


def _tiny(cls_name, **cfg):
    config_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    config = config_cls(**cfg)
    return getattr(transformers, cls_name)(config).eval()


MODELS = {
    "llama-tied": lambda: _tiny(
        "LlamaForCausalLM",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "gemma2-softcap": lambda: _tiny(
        "Gemma2ForCausalLM",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=2.0,
        attn_implementation="eager",
    ),
    "phi-head-bias": lambda: _tiny(
        "PhiForCausalLM",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    ),
    "falcon-h1-multiplier": lambda: _tiny(
        "FalconH1ForCausalLM",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        mamba_d_ssm=32,
        mamba_n_heads=4,
        mamba_d_head=8,
        mamba_d_state=8,
        mamba_n_groups=1,
        mamba_chunk_size=8,
        lm_head_multiplier=0.3,
    ),
    "qwen3-tied": lambda: _tiny(
        "Qwen3ForCausalLM",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=True,
    ),
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4)
    ).eval(),
}


def _naive_token_logprobs(model, input_ids, attention_mask, temperature):
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, :-1]
    logp = torch.log_softmax(logits.float() / temperature, -1)
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


@pytest.mark.parametrize("name", list(MODELS))
def test_token_logprobs_matches_model_logits(name):
    model = MODELS[name]()
    if name == "phi-head-bias":
        assert model.lm_head.bias is not None
        torch.nn.init.normal_(model.lm_head.bias, std=0.5)  # make the bias matter
    input_ids = torch.randint(0, 64, (3, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding
    attention_mask[2, -2:] = 0  # right padding
    for temperature in (1.0, 0.6):
        got = token_logprobs(model, input_ids, attention_mask, temperature=temperature, chunk_size=5)
        want = _naive_token_logprobs(model, input_ids, attention_mask, temperature)
        valid = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
        torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)
    # gradients w.r.t. every parameter agree as well (tied embeddings receive both contributions)
    weights = torch.randn(valid.shape) * valid
    got_grads = torch.autograd.grad(
        (token_logprobs(model, input_ids, attention_mask, chunk_size=4) * weights).sum(),
        list(model.parameters()),
        allow_unused=True,
    )
    want_grads = torch.autograd.grad(
        (_naive_token_logprobs(model, input_ids, attention_mask, 1.0) * weights).sum(),
        list(model.parameters()),
        allow_unused=True,
    )
    for (pname, _), a, b in zip(model.named_parameters(), got_grads, want_grads):
        if b is None:
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=f"{name}: gradient of {pname}")


def test_left_padding_gives_the_same_logprobs_as_no_padding():
    model = MODELS["llama-tied"]()
    ids = torch.randint(0, 64, (1, 8))
    alone = token_logprobs(model, ids, torch.ones_like(ids))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones_like(ids)], dim=1)
    torch.testing.assert_close(token_logprobs(model, padded, mask)[:, 4:], alone, rtol=1e-5, atol=1e-5)


def test_selective_log_softmax_and_entropy():
    logits = torch.randn(3, 5, 11)
    index = torch.randint(0, 11, (3, 5))
    want = torch.log_softmax(logits, -1).gather(-1, index[..., None])[..., 0]
    torch.testing.assert_close(selective_log_softmax(logits, index), want)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size=4), -(p * p.log()).sum(-1))
    uniform = torch.zeros(2, 8)
    torch.testing.assert_close(entropy_from_logits(uniform), torch.full((2,), torch.log(torch.tensor(8.0)).item()))


def test_bf16_path_matches_fp32_reference_loosely():
    """The mixed-precision branch (bf16 weights, fp32 accumulation) that CUDA runs use, exercised on CPU."""
    g = torch.Generator().manual_seed(1)
    hidden32 = torch.randn(40, 32, generator=g)
    weight32 = torch.randn(300, 32, generator=g) * 0.2
    targets = torch.randint(0, 300, (40,), generator=g)
    hidden = hidden32.bfloat16().requires_grad_()
    weight = weight32.bfloat16().requires_grad_()
    logps = chunked_logprobs(hidden, weight, targets, temperature=0.8, chunk_size=16, vocab_chunk_size=100)
    assert logps.dtype == torch.float32
    ref, _ = naive_logprobs(
        hidden.float().detach().requires_grad_(), weight.float().detach().requires_grad_(), targets, temperature=0.8
    )
    torch.testing.assert_close(logps, ref.detach(), rtol=2e-2, atol=2e-2)
    logps.sum().backward()
    h_ref = hidden.float().detach().requires_grad_()
    w_ref = weight.float().detach().requires_grad_()
    naive_logprobs(h_ref, w_ref, targets, temperature=0.8)[0].sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(hidden.grad.float(), h_ref.grad, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(weight.grad.float(), w_ref.grad, rtol=3e-2, atol=3e-2)


def test_load_time_head_check_names_an_architecture_whose_logits_we_do_not_reproduce(tmp_path):
    """Every load of a causal LM compares the fused head with the model's own logits; a transform we do not know
    (here: a Llama whose config claims a Cohere-style logit_scale its forward does not apply) stops the run."""
    from common.logprobs import check_fused_head

    model = MODELS["llama-tied"]()
    assert check_fused_head(model, "tiny") < 1e-5
    model.config.logit_scale = 3.0
    with pytest.raises(SystemExit, match=r"tiny \(LlamaForCausalLM\): the fused log-prob head differs"):
        check_fused_head(model, "tiny")


def test_bf16_logits_are_not_rounded_to_bf16():
    """bf16 hidden states and head: the log-probs equal the fp64 computation from the same bf16 values within
    fp32 noise; rounding the logits to bf16 first (what `h @ W.T` in bf16 returns) is off by ~1e-2 nats."""
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(64, 64, generator=g) * 2).bfloat16()
    weight = (torch.randn(4096, 64, generator=g) * 0.5).bfloat16()  # logits of a few units: bf16 keeps ~2 digits
    targets = torch.randint(0, 4096, (64,), generator=g)
    exact = torch.log_softmax(hidden.double() @ weight.double().t(), -1).gather(-1, targets[:, None]).squeeze(-1)
    rounded = torch.log_softmax((hidden @ weight.t()).float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    ours = chunked_logprobs(hidden, weight, targets, chunk_size=16, vocab_chunk_size=1000)
    assert (rounded.double() - exact).abs().mean() > 3e-3  # the error the fix removes is visible at this scale
    assert (ours.double() - exact).abs().max() < 1e-4


def test_fp32_logits_stay_on_the_inputs_device():
    from common.logprobs import logits_fp32

    for dtype in (torch.bfloat16, torch.float32):
        z = logits_fp32(torch.empty(3, 8, device="meta", dtype=dtype), torch.empty(5, 8, device="meta", dtype=dtype))
        assert z.device.type == "meta" and z.dtype == torch.float32 and z.shape == (3, 5)


def test_target_mask_runs_the_head_on_those_rows_only(monkeypatch):
    """token_logprobs(..., target_mask=m): the log-probs (and entropies) at m equal the full computation, 0
    elsewhere, the gradient of every parameter is the same, and the head sees m.sum() rows."""
    import common.logprobs as lp

    model = MODELS["llama-tied"]()
    input_ids = torch.randint(0, 64, (3, 10))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    target_mask = torch.zeros(3, 9, dtype=torch.bool)
    target_mask[0, 4:] = True
    target_mask[1, 6:8] = True  # row 2: nothing asked
    rows_seen = []
    real = lp.chunked_logprobs
    monkeypatch.setattr(
        lp, "chunked_logprobs", lambda h, *a, **k: rows_seen.append(h.numel() // h.shape[-1]) or real(h, *a, **k)
    )
    full, full_entropy = token_logprobs(model, input_ids, attention_mask, return_entropy=True)
    got, entropy = token_logprobs(model, input_ids, attention_mask, return_entropy=True, target_mask=target_mask)
    assert rows_seen == [27, 7]
    torch.testing.assert_close(got[target_mask], full[target_mask], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(entropy[target_mask], full_entropy[target_mask], rtol=1e-6, atol=1e-6)
    assert (got[~target_mask] == 0).all() and (entropy[~target_mask] == 0).all()
    weights = torch.randn(3, 9)
    want = torch.autograd.grad(
        (token_logprobs(model, input_ids, attention_mask) * weights * target_mask).sum(), list(model.parameters())
    )
    have = torch.autograd.grad(
        (token_logprobs(model, input_ids, attention_mask, target_mask=target_mask) * weights).sum(),
        list(model.parameters()),
    )
    for (name, _), a, b in zip(model.named_parameters(), have, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_completion_logprobs_runs_the_head_on_completion_tokens_only(monkeypatch):
    import common.logprobs as lp

    model = MODELS["llama-tied"]()
    prompt_ids = torch.randint(0, 64, (2, 6))
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[0, :2] = 0
    completion_ids = torch.randint(0, 64, (2, 4))
    completion_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    rows_seen = []
    real = lp.chunked_logprobs
    monkeypatch.setattr(
        lp, "chunked_logprobs", lambda h, *a, **k: rows_seen.append(h.numel() // h.shape[-1]) or real(h, *a, **k)
    )
    got = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, 0.7)
    assert rows_seen == [6] and got.shape == (2, 4)
    ids, mask = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
    want = _naive_token_logprobs(model, ids, mask, 0.7)[:, 5:]
    torch.testing.assert_close(got[completion_mask.bool()], want[completion_mask.bool()], rtol=1e-5, atol=1e-5)
    assert (got[completion_mask == 0] == 0).all()


@pytest.mark.parametrize("use_bias,softcap,temperature", [(False, None, 1.0), (True, None, 0.7), (False, 3.0, 1.3)])
def test_chunked_logprobs_and_rank_match_the_full_softmax(use_bias, softcap, temperature):
    from common.logprobs import chunked_logprobs_and_rank

    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(2, 19, 16, generator=g), torch.randn(300, 16, generator=g)
    bias = torch.randn(300, generator=g) if use_bias else None
    targets = torch.randint(0, 300, (2, 19), generator=g)
    targets[0, :3] = (hidden[0, :3] @ weight.T + (0 if bias is None else bias)).argmax(-1)  # some rank-0 targets
    logits = hidden @ weight.T + (0 if bias is None else bias)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp = torch.log_softmax(logits / temperature, -1)
    chosen = logp.gather(-1, targets[..., None])[..., 0]
    want_rank = (logp > chosen[..., None]).sum(-1)
    got, rank = chunked_logprobs_and_rank(
        hidden, weight, targets, bias=bias, softcap=softcap, temperature=temperature, chunk_size=7, vocab_chunk_size=64
    )
    torch.testing.assert_close(got, chosen, rtol=1e-5, atol=1e-5)
    assert torch.equal(rank, want_rank) and (rank[0, :3] == 0).all() and rank.max() > 5
