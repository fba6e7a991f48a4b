"""Batched generation: the completion mask after EOS, shapes and ordering, greedy and seeded sampling."""

import math

import pytest
import torch

from common.generation import completion_mask, generate
from common.model import load_model, load_tokenizer


def test_completion_mask_by_hand():
    eos = 2
    ids = torch.tensor([[5, 6, 2, 0, 0], [5, 2, 2, 7, 0], [5, 6, 7, 8, 9], [2, 5, 5, 5, 5]])
    mask, truncated = completion_mask(ids, [eos])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert truncated.tolist() == [False, False, True, False]
    mask, _ = completion_mask(torch.tensor([[5, 9, 3]]), [3, 9])  # several end ids: the first of any
    assert mask.tolist() == [[1, 1, 0]]


def test_generate_shapes_ordering_and_determinism(random_model_dir):
    model = load_model(str(random_model_dir), dtype="float32", device="cpu").eval()
    tok = load_tokenizer(str(random_model_dir))
    prompts = ["What is 1+2?", "Reverse: abcdef"]
    out = generate(model, tok, prompts, n=3, max_new_tokens=6, temperature=1.0, seed=0)
    assert out["prompt_ids"].shape[0] == out["completion_ids"].shape[0] == 6 and len(out["texts"]) == 6
    assert out["completion_ids"].shape == out["completion_mask"].shape and out["completion_ids"].shape[1] <= 6
    # left padding: the shorter prompt's rows start with padding, the last column is real for every row
    assert out["prompt_mask"][:, -1].all() and not out["prompt_mask"][:3, 0].all()
    again = generate(model, tok, prompts, n=3, max_new_tokens=6, temperature=1.0, seed=0)
    assert torch.equal(out["completion_ids"], again["completion_ids"])
    g1 = generate(model, tok, prompts, greedy=True, max_new_tokens=6)
    g2 = generate(model, tok, prompts[::-1], greedy=True, max_new_tokens=6, batch_size=1)
    assert g1["texts"] == g2["texts"][::-1]  # greedy is independent of batching and padding
    # padding after the first EOS, and decoded text matches the masked ids
    for ids, m, text in zip(out["completion_ids"], out["completion_mask"], out["texts"]):
        assert (ids[m == 0] == tok.pad_token_id).all()
        assert tok.decode(ids[m == 1], skip_special_tokens=True) == text


def test_a_checkpoints_generation_config_does_not_change_what_is_sampled(tmp_path):
    """Sampling must use only what the script sets (temperature, top-p), not the checkpoint's generation_config.json,
    or rollouts come from another distribution than the one the loss assumes."""
    import json
    import shutil

    from conftest import TINY_BASE

    copy = tmp_path / "tiny-base-with-defaults"
    shutil.copytree(TINY_BASE, copy)
    config = json.loads((copy / "generation_config.json").read_text())
    config.update(repetition_penalty=1.5, top_k=3, no_repeat_ngram_size=1, temperature=0.3, min_new_tokens=4)
    (copy / "generation_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(str(TINY_BASE))
    prompts = ["What is 47+38?", "Reverse: abcde", "Uppercase: hello", "Which is larger, 3 or 9?"]
    outputs = {}
    for name, path in (("plain", TINY_BASE), ("defaults", copy)):
        model = load_model(str(path), dtype="float32", device="cpu").eval()
        sampled = generate(model, tokenizer, prompts, n=4, max_new_tokens=8, temperature=1.0, seed=3)
        greedy = generate(model, tokenizer, prompts, max_new_tokens=8, greedy=True)
        outputs[name] = (sampled["completion_ids"], greedy["completion_ids"])
        assert model.generation_config.repetition_penalty == (1.5 if name == "defaults" else None)  # restored
    torch.testing.assert_close(outputs["defaults"][0], outputs["plain"][0], rtol=0, atol=0)
    torch.testing.assert_close(outputs["defaults"][1], outputs["plain"][1], rtol=0, atol=0)
    # the copy's settings do change transformers' own sampling (so the comparison above has teeth)
    model = load_model(str(copy), dtype="float32", device="cpu").eval()
    enc = tokenizer(
        [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    torch.manual_seed(0)
    raw = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    plain = load_model(str(TINY_BASE), dtype="float32", device="cpu").eval()
    ref = plain.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert not torch.equal(raw, ref)


def _full_logprobs(model, out, temperature):
    """log softmax(logits / T) of every completion position from one plain forward (the reference, no chunking)."""
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    attn = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits.float()
    P = out["prompt_ids"].shape[1]
    return torch.log_softmax(logits[:, P - 1 : -1] / temperature, -1)  # (B, L, V)


def test_sampler_logprobs_are_the_sampled_distribution(random_model_dir):
    """`sampler_logps` = log of the probability the sampler drew each token with: at temperature 0.7 it equals
    log softmax(logits / 0.7) of a plain forward; with top-p 0.8 it equals that renormalized over the nucleus
    (the smallest set of most likely tokens whose mass reaches 0.8), written out here; 0 after EOS. The samples are
    the ones transformers' own sampler draws with the same settings and seed."""
    model = load_model(str(random_model_dir), dtype="float32", device="cpu").eval()
    tok = load_tokenizer(str(random_model_dir))
    prompts = ["What is 1+2?", "Reverse: abcdef", "Uppercase: hi"]
    out = generate(model, tok, prompts, n=4, max_new_tokens=8, temperature=0.7, seed=0)
    mask = out["completion_mask"].bool()
    ref = _full_logprobs(model, out, 0.7).gather(-1, out["completion_ids"][..., None]).squeeze(-1)
    torch.testing.assert_close(out["sampler_logps"][mask], ref[mask], atol=1e-5, rtol=0)
    assert (out["sampler_logps"][~mask] == 0).all() and (out["sampler_logps"][mask] < 0).all()

    top = generate(model, tok, prompts, n=4, max_new_tokens=8, temperature=0.7, top_p=0.8, seed=1)
    logp = _full_logprobs(model, top, 0.7)  # (B, L, V)
    nucleus_logps = torch.zeros_like(top["sampler_logps"])
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if not top["completion_mask"][b, t]:
                continue
            probs = logp[b, t].exp()
            kept, mass = set(), 0.0
            for i in probs.argsort(descending=True).tolist():  # most likely first, until the mass reaches 0.8
                kept.add(i)
                mass += probs[i].item()
                if mass >= 0.8:
                    break
            token = top["completion_ids"][b, t].item()
            assert token in kept  # never sampled outside the nucleus
            nucleus_logps[b, t] = math.log(probs[token].item() / sum(probs[i].item() for i in kept))
    torch.testing.assert_close(top["sampler_logps"], nucleus_logps, atol=1e-5, rtol=0)

    # the same tokens transformers' own temperature sampler draws (the recorder changes no probability)
    enc = tok(
        [
            tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
            for _ in range(4)
        ],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    torch.manual_seed(0)
    plain = model.generate(
        **enc, max_new_tokens=8, do_sample=True, temperature=0.7, top_k=0, top_p=1.0, pad_token_id=tok.pad_token_id
    )[:, enc["input_ids"].shape[1] :]
    assert torch.equal(plain[mask[:, : plain.shape[1]]], out["completion_ids"][mask])
    assert "sampler_logps" not in generate(model, tok, prompts, greedy=True, max_new_tokens=4)


def test_rollout_correction_by_hand():
    """Importance weights rho = pi_trainer / pi_sampler per token, written out on hand-picked probabilities."""
    from common.generation import correction_metrics, rollout_correction

    trainer = torch.tensor([[0.5, 0.2, 0.9], [0.9, 0.9, 0.7], [0.3, 0.8, 0.1]]).log()
    sampler = torch.tensor([[0.25, 0.4, 0.9], [0.3, 0.3, 0.7], [0.6, 1.0, 1.0]]).log()
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])  # masked positions count for nothing
    # rho: row 0 (2, 0.5, 1), product 1; row 1 (3, 3), product 9; row 2 (0.5), product 0.5
    w, masked = rollout_correction(trainer, sampler, mask, "tis", 1.5)
    torch.testing.assert_close(w, torch.tensor([[1.5, 0.5, 1.0], [1.5, 1.5, 1.0], [0.5, 1.0, 1.0]]))
    assert masked.tolist() == [[True, False, False], [True, True, False], [False, False, False]]
    w, masked = rollout_correction(trainer, sampler, mask, "mis", 2.5)  # keep sequences with product in [0.4, 2.5]
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 1.0], [0.5, 1.0, 1.0]]))
    assert masked.tolist() == [[False, False, False], [True, True, False], [False, False, False]]
    w, _ = rollout_correction(trainer, sampler, mask, "mis", 1.9)  # 0.5 < 1/1.9: row 2 is dropped too
    assert w[2, 0] == 0 and w[0].tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert torch.equal(rollout_correction(trainer, sampler, mask, "none", 2.0)[0], torch.ones(3, 3))
    # identical sampler and trainer: every mode is exactly the identity
    for mode in ("none", "tis", "mis"):
        w, masked = rollout_correction(trainer, trainer.clone(), mask, mode, 2.0)
        assert torch.equal(w, torch.ones(3, 3)) and not masked.any()
    # a 4096-token sequence whose product overflows fp32 is dropped, not NaN
    long_w, _ = rollout_correction(torch.zeros(1, 4096), torch.full((1, 4096), -0.1), torch.ones(1, 4096), "mis", 2.0)
    assert torch.equal(long_w, torch.zeros(1, 4096))
    stats = correction_metrics(trainer, sampler, mask, "tis", 1.5)
    assert stats["rollout/is_ratio_mean"] == pytest.approx((2 + 0.5 + 1 + 3 + 3 + 0.5) / 6)
    assert stats["rollout/is_ratio_min"] == pytest.approx(0.5) and stats["rollout/is_ratio_max"] == pytest.approx(3)
    assert stats["rollout/is_masked_frac"] == pytest.approx(3 / 6)


def test_token_parts_by_hand():
    from common.generation import token_parts

    lengths = [3, 5, 2, 4]  # left-padded to 5
    mask = torch.tensor([[0] * (5 - n) + [1] * n for n in lengths])
    # max_new 2, budget 14: rows 0-1 cost 2 x (5 + 2) = 14; adding row 2 costs 3 x 7 = 21 > 14; rows 2-3: 2 x 6 = 12
    assert token_parts(mask, 2, 14) == [slice(0, 2), slice(2, 4)]
    assert token_parts(mask, 2, 0) == [slice(0, 4)]  # no bound: one call
    assert token_parts(mask, 2, 10**6) == [slice(0, 4)]
    assert token_parts(mask, 2, 1) == [slice(i, i + 1) for i in range(4)]  # a row above the bound runs alone
    assert token_parts(mask, 2, 13) == [slice(0, 1), slice(1, 2), slice(2, 4)]  # 2 x 7 = 14 > 13


def test_kv_bytes_per_token_by_hand(qwen3_dir):
    from common.generation import kv_bytes_per_token

    model = load_model(str(qwen3_dir), dtype="float32", device="cpu")
    # 2 (K, V) x 2 layers x 2 KV heads x head_dim 16 x 4 bytes
    assert kv_bytes_per_token(model) == 2 * 2 * 2 * 16 * 4 == 512
    assert kv_bytes_per_token(model.to(torch.bfloat16)) == 256


def test_generation_token_budget_from_free_memory(qwen3_dir, monkeypatch):
    """On a GPU: half of (free - gradients - AdamW moments not yet allocated) over KV bytes per token; on a CPU, none."""
    from common.generation import generation_token_budget

    model = load_model(str(qwen3_dir), dtype="float32", device="cpu")
    optimizer = torch.optim.AdamW(model.parameters())
    assert generation_token_budget(model, torch.device("cpu"), optimizer) == 0
    params = sum(p.numel() for p in model.parameters()) * 4  # fp32 bytes of what AdamW updates
    free = 10 * 2**20
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
    expected = int(0.5 * (free - 3 * params) // 512)  # gradients + exp_avg + exp_avg_sq, 512 B/token
    assert generation_token_budget(model, torch.device("cuda"), optimizer) == expected
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()  # the moments exist now: only the gradients are still to come
    assert generation_token_budget(model, torch.device("cuda"), optimizer) == int(0.5 * (free - params) // 512)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (params, 2 * params))
    assert generation_token_budget(model, torch.device("cuda"), optimizer) == 1  # nothing left: one row at a time


def _gemma3_like(tokenizer_dir, path):
    """A tiny Gemma-3 text model (sliding-window and global layers): its cache mixes two layer kinds."""
    import shutil

    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = load_tokenizer(str(tokenizer_dir))
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, path / name)
    return path


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_shared_prefill_samples_and_logprobs_unchanged(arch, random_model_dir, qwen3_dir, tmp_path):
    """A group's prompt prefilled once and its cache copied to the group gives the same samples and sampler
    log-probs as prefilling every row, including a group split between two calls (batch_size 5, n 4) and a
    sliding-window cache (Gemma-3, prompts longer than the window)."""
    path = {"llama": random_model_dir, "qwen3": qwen3_dir}.get(arch) or _gemma3_like(random_model_dir, tmp_path / "g")
    model = load_model(str(path), dtype="float32", device="cpu").eval()
    tok = load_tokenizer(str(path))
    prompts = ["What is 1+2?", "Reverse: abcdef", "Uppercase: hello there"]
    kw = {"n": 4, "max_new_tokens": 8, "temperature": 0.7, "top_p": 0.9, "batch_size": 5, "seed_key": (1, 3, 0)}
    embedded = []  # tokens through the embedding per forward
    hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: embedded.append(i[0].numel()))
    shared = generate(model, tok, prompts, share_prefill=True, **kw)
    shared_tokens, embedded[:] = sum(embedded), []
    plain = generate(model, tok, prompts, share_prefill=False, **kw)
    plain_tokens = sum(embedded)
    hook.remove()
    assert torch.equal(shared["completion_ids"], plain["completion_ids"])
    assert torch.equal(shared["completion_mask"], plain["completion_mask"])
    assert torch.equal(shared["prompt_ids"], plain["prompt_ids"])
    torch.testing.assert_close(shared["sampler_logps"], plain["sampler_logps"], atol=1e-5, rtol=0)
    # the prefill ran once per (call, prompt): rows 0-4 | 5-9 | 10-11 hold prompts 0,0,0,0,1 | 1,1,1,2,2 | 2,2, so
    # a call of B rows and U prompts of width P embeds U x (P - 1) + B tokens where the plain path embeds B x P
    # (the decoding steps are the same: the same samples)
    from common.data import has_chat_template, render_prompt

    lengths = [
        len(tok(render_prompt(tok, p), add_special_tokens=not has_chat_template(tok))["input_ids"]) for p in prompts
    ]
    saved = 0
    for rows in (range(5), range(5, 10), range(10, 12)):
        width = max(lengths[r // 4] for r in rows)
        saved += (len(rows) - len({r // 4 for r in rows})) * (width - 1)
    assert plain_tokens - shared_tokens == saved > 0


def test_token_budget_bounds_every_call_and_keeps_greedy_and_unsplit_sampling(random_model_dir, monkeypatch):
    model = load_model(str(random_model_dir), dtype="float32", device="cpu").eval()
    tok = load_tokenizer(str(random_model_dir))
    prompts = ["What is 1+2?", "Reverse: abcdef", "Uppercase: hello there", "Which is larger, 3 or 9?"]
    calls = []
    real_generate = model.generate

    def recording_generate(input_ids, **kw):
        calls.append(tuple(input_ids.shape))
        return real_generate(input_ids=input_ids, **kw)

    monkeypatch.setattr(model, "generate", recording_generate)
    kw = {"n": 2, "max_new_tokens": 6, "temperature": 1.0, "batch_size": 8, "seed_key": (0, 1, 0)}
    free = generate(model, tok, prompts, **kw)
    assert calls == [(8, calls[0][1])]
    P = calls[0][1]
    calls.clear()
    roomy = generate(model, tok, prompts, max_tokens=8 * (P + 6), **kw)  # fits: one call, the same samples
    assert len(calls) == 1 and torch.equal(roomy["completion_ids"], free["completion_ids"])
    calls.clear()
    budget = 3 * (P + 6)
    tight = generate(model, tok, prompts, max_tokens=budget, **kw)
    assert len(calls) >= 3 and sum(rows for rows, _ in calls) == 8
    assert all(rows * (width + 6) <= budget for rows, width in calls)  # every call within the bound
    assert tight["completion_ids"].shape[0] == 8 and torch.isfinite(tight["sampler_logps"]).all()
    again = generate(model, tok, prompts, max_tokens=budget, **kw)
    assert torch.equal(again["completion_ids"], tight["completion_ids"])  # seeded per part: reproducible
    greedy_free = generate(model, tok, prompts, greedy=True, max_new_tokens=6)
    greedy_tight = generate(model, tok, prompts, greedy=True, max_new_tokens=6, max_tokens=P + 6)
    assert greedy_free["texts"] == greedy_tight["texts"]
