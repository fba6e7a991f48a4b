"""What several benchmarks share: a model of Qwen3-0.6B's shape with random weights (H=1024, 16 heads x 128, 8 KV
heads, MLP 3072, V=151,936, tied embeddings; `layers` of its 28), and the process's resident memory."""

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


def rss_bytes() -> int:
    """The resident set size now (ru_maxrss gives the peak)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
