"""Device discipline without a GPU: the pure functions of every script run on `meta` tensors.

A binary op between a stray CPU tensor (a `torch.arange` or `torch.tensor` made without `device=`) and a meta tensor
raises, exactly where a CPU and a CUDA tensor would meet on a GPU, so these tests catch that class of crash here.
"""

import pytest
import torch

META = torch.device("meta")


def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device=META)


def test_a_stray_cpu_tensor_meets_meta_and_raises():
    """The premise: this is what the tests below would hit (the old `apply_stop_token` did exactly this)."""
    with pytest.raises((RuntimeError, NotImplementedError)):
        _ = torch.arange(5)[None, :] <= meta(3, 1, dtype=torch.long)


def test_ppo_functions_stay_on_the_device_of_their_inputs():
    from ppo import apply_stop_token, gae, kl_penalized_rewards, ppo_policy_loss, ppo_value_loss

    B, L = 4, 6
    ids, mask = meta(B, L, dtype=torch.long), meta(B, L, dtype=torch.long)
    new_mask, stopped = apply_stop_token(ids, mask, stop_id=7)
    assert new_mask.device == META and stopped.device == META
    logps, ref_logps, values = meta(B, L), meta(B, L), meta(B, L)
    rewards, non_score = kl_penalized_rewards(logps, ref_logps, mask, meta(B), kl_coef=0.1)
    assert rewards.device == META and non_score.device == META
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    assert advantages.device == META and returns.device == META
    assert ppo_policy_loss(logps, ref_logps, advantages, 0.2)[0].device == META
    assert ppo_value_loss(values, values, returns, 0.2)[0].device == META


def test_grpo_functions_stay_on_the_device_of_their_inputs():
    from grpo import (
        aggregation_weights,
        group_advantages,
        grpo_token_loss,
        k3_kl,
        overlong_penalty,
        reinforce_pp_advantages,
        rloo_advantages,
    )

    B, G, L = 2, 4, 5
    advantages = group_advantages(meta(B * G), G, "group")
    assert advantages.device == META
    assert group_advantages(meta(B * G), G, "batch", batch_rewards=meta(2 * B * G)).device == META
    loss, low, high = grpo_token_loss(meta(B * G, L), meta(B * G, L), advantages, 0.2, 0.28, meta(B * G, L), 0.04)
    assert loss.device == low.device == high.device == META
    for kw in ({"level": "sequence", "mask": meta(B * G, L)}, {"loss_type": "cispo"}):
        out = grpo_token_loss(meta(B * G, L), meta(B * G, L), advantages, 0.2, 0.28, **kw)
        assert all(x.device == META and x.shape == (B * G, L) for x in out)
    assert rloo_advantages(meta(B * G), G, "group").device == META
    assert (
        reinforce_pp_advantages(meta(B * G), meta(B * G), batch_rewards=meta(16), batch_lengths=meta(16)).device == META
    )
    assert overlong_penalty(meta(B * G), 8, 4, 1.0).device == META
    assert k3_kl(meta(3), meta(3)).device == META
    mask = meta(B * G, L)
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        assert aggregation_weights(mask, agg, L, num_tokens=17.0, num_seqs=B * G).device == META


def test_dpo_opd_and_common_functions_stay_on_the_device_of_their_inputs():
    from common.generation import completion_mask
    from common.logprobs import chunked_logprobs
    from dpo import dpo_loss
    from opd import sampled_token_loss

    for loss_type in ("sigmoid", "ipo"):
        out = dpo_loss(meta(3), meta(3), meta(3), meta(3), 0.1, loss_type, 0.0)
        assert all(t.device == META for t in out)
    assert sampled_token_loss(meta(2, 3), meta(2, 3), meta(2, 3), 0.2).device == META
    mask, truncated = completion_mask(meta(2, 5, dtype=torch.long), [2, 9])
    assert mask.device == truncated.device == META
    logps = chunked_logprobs(meta(6, 8), meta(50, 8), meta(6, dtype=torch.long), chunk_size=4, vocab_chunk_size=16)
    assert logps.device == META
