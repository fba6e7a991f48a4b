"""What several benchmarks share: a model of Qwen3-0.6B's shape with random weights (H=1024, 16 heads x 128, 8 KV
heads, MLP 3072, V=151,936, tied embeddings; `layers` of its 28), a small Qwen3-shaped model for end-to-end script
runs (H=256, 4 layers, 4 heads x 64, MLP 768, tied), and the process's resident memory."""

from __future__ import annotations

import resource


def qwen3_0_6b_shaped(layers: int, seed: int = 0, dtype=None):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    return model if dtype is None else model.to(dtype)


def small_qwen3(vocab_size: int, tokenizer, seed: int = 0):
    """The small Qwen3-shaped model packing.py and vs_trl.py train with the scripts: H=256, 4 layers, 4 heads x 64
    (no grouping), MLP 768, tied embeddings, `vocab_size` head rows, the tokenizer's eos and pad ids, no bos."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config)


def rss_bytes() -> int:
    """The resident set size now (ru_maxrss gives the peak)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
