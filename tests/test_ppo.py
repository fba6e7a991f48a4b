"""ppo.py's pure functions against plain loops and hand-computed values; the command line."""

import json

import pytest
import torch
from conftest import ROOT, run_script
from transformers import AutoModelForSequenceClassification

from common.model import load_model, load_tokenizer, save_model
from ppo import (
    adaptive_kl_coef,
    apply_stop_token,
    gae,
    kl_penalized_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    token_values,
)


def test_gae_matches_a_plain_reverse_loop_per_sequence():
    torch.manual_seed(0)
    lengths = [5, 1, 3, 0, 7]
    L = 7
    mask = torch.tensor([[1.0] * n + [0.0] * (L - n) for n in lengths])
    rewards, values = torch.randn(len(lengths), L), torch.randn(len(lengths), L)  # garbage on padding on purpose
    for gamma, lam in [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0)]:
        advantages, returns = gae(rewards, values, mask, gamma, lam)
        for i, n in enumerate(lengths):
            # the textbook recursion over the n real tokens only, V after the last one = 0
            expected = [0.0] * n
            running = 0.0
            for t in reversed(range(n)):
                next_value = values[i, t + 1].item() if t + 1 < n else 0.0
                delta = rewards[i, t].item() + gamma * next_value - values[i, t].item()
                running = delta + gamma * lam * running
                expected[t] = running
            assert advantages[i, :n].tolist() == pytest.approx(expected, abs=1e-5)
            assert returns[i, :n].tolist() == pytest.approx(
                [a + values[i, t].item() for t, a in enumerate(expected)], abs=1e-5
            )
            assert advantages[i, n:].abs().sum() == 0 and returns[i, n:].abs().sum() == 0


def test_gae_with_lambda_one_and_no_discount_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, 1.5]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), 1.0, 1.0)
    assert advantages[0].tolist() == pytest.approx([1.5, 1.0, 0.5])
    assert returns[0].tolist() == pytest.approx([2.0, 2.0, 2.0])


def test_kl_penalized_rewards_layout():
    logps = torch.tensor([[-1.0, -2.0, -0.5, -9.0], [-1.0, -9.0, -9.0, -9.0]])
    ref_logps = torch.tensor([[-1.5, -1.0, -0.5, 0.0], [-0.5, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    rewards, non_score = kl_penalized_rewards(logps, ref_logps, mask, torch.tensor([3.0, -2.0]), kl_coef=0.1)
    # k1 penalty -0.1 * (logp - ref) on real tokens; the score on the last real token; nothing on padding
    assert non_score.flatten().tolist() == pytest.approx([-0.05, 0.1, 0.0, 0.0, 0.05, 0.0, 0.0, 0.0])
    assert rewards.flatten().tolist() == pytest.approx([-0.05, 0.1, 3.0, 0.0, 0.05 - 2.0, 0.0, 0.0, 0.0])


@pytest.mark.parametrize(
    "adv, ratio, expect_loss, clipped",
    [
        (1.0, 1.1, -1.1, False),  # inside the range
        (1.0, 1.5, -1.2, True),  # positive advantage, ratio above 1 + eps: capped
        (1.0, 0.5, -0.5, False),  # positive advantage, ratio below 1 - eps: not capped (pessimistic bound)
        (-1.0, 0.5, 0.8, True),  # negative advantage, ratio below 1 - eps: capped
        (-1.0, 1.5, 1.5, False),  # negative advantage, ratio above: not capped
    ],
)
def test_policy_clipping_cases(adv, ratio, expect_loss, clipped):
    old = torch.zeros(1, 1)
    logps = torch.log(torch.tensor([[ratio]])).requires_grad_()
    loss, is_clipped = ppo_policy_loss(logps, old, torch.tensor([[adv]]), 0.2)
    assert loss.item() == pytest.approx(expect_loss, abs=1e-6)
    assert bool(is_clipped) is clipped
    loss.sum().backward()
    assert (logps.grad.abs().item() == 0) is clipped  # the clipped branch carries no gradient


def test_value_clipping_cases():
    old = torch.tensor([1.0, 1.0, 1.0])
    values = torch.tensor([1.1, 2.0, 2.0], requires_grad=True)
    returns = torch.tensor([3.0, 3.0, 0.0])
    loss, clipped = ppo_value_loss(values, old, returns, 0.2)
    # 1: inside the clip: 0.5 * (1.1 - 3)^2; 2: moved past 1.2 towards the return: the clipped error (1.2 - 3)^2 is
    # larger, so it is used (no gradient); 3: moved away from the return: the unclipped error is larger and used
    assert loss.tolist() == pytest.approx([0.5 * 1.9**2, 0.5 * 1.8**2, 0.5 * 2.0**2])
    assert clipped.tolist() == [False, True, False]
    loss.sum().backward()
    assert values.grad[1] == 0 and values.grad[0] != 0 and values.grad[2] != 0


def test_adaptive_kl_controller_by_hand():
    assert adaptive_kl_coef(0.1, kl=6.0, target=5.0, horizon=1000, n_samples=100) == pytest.approx(0.1 * 1.02)
    assert adaptive_kl_coef(0.1, kl=50.0, target=5.0, horizon=1000, n_samples=100) == pytest.approx(0.1 * 1.02)
    assert adaptive_kl_coef(0.1, kl=0.0, target=5.0, horizon=1000, n_samples=100) == pytest.approx(0.1 * 0.98)


def test_stop_token_truncation():
    ids = torch.tensor([[5, 7, 9, 2], [5, 5, 5, 5], [7, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])
    new_mask, stopped = apply_stop_token(ids, mask, stop_id=7)
    assert new_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert stopped.tolist() == [True, False, True]


@pytest.fixture(scope="module")
def random_rm_dir(random_model_dir, tmp_path_factory):
    torch.manual_seed(3)
    rm = load_model(
        str(random_model_dir),
        dtype="float32",
        device="cpu",
        model_class=AutoModelForSequenceClassification,
        num_labels=1,
    )
    tok = load_tokenizer(str(random_model_dir))
    rm.config.pad_token_id = tok.pad_token_id
    return save_model(rm, tok, tmp_path_factory.mktemp("rm") / "rm")


def test_value_model_from_a_reward_model_and_from_the_policy(random_model_dir, random_rm_dir):
    rm = AutoModelForSequenceClassification.from_pretrained(random_rm_dir)
    value = load_model(
        str(random_rm_dir), dtype="float32", device="cpu", model_class=AutoModelForSequenceClassification, num_labels=1
    )
    for k, v in rm.state_dict().items():
        assert torch.equal(v, value.state_dict()[k]), k
    # token_values reads the head on the hidden state before each completion token: the value of the last one equals
    # the reward model's own score of the sequence without that token
    prompt_ids, completion_ids = torch.tensor([[11, 12, 13]]), torch.tensor([[14, 15]])
    ones = torch.ones_like
    values = token_values(value, prompt_ids, ones(prompt_ids), completion_ids, ones(completion_ids))
    with torch.no_grad():
        direct = rm(torch.tensor([[11, 12, 13, 14]])).logits[0, 0]
    assert values[0, -1].item() == pytest.approx(direct.item(), abs=1e-5)


def _ppo(tmp_path, name, *extra):
    run_script(
        ROOT / "ppo.py",
        "--max-steps",
        "2",
        "--prompts-per-step",
        "8",
        "--micro-batch-size",
        "4",
        "--num-minibatches",
        "2",
        "--ppo-epochs",
        "2",
        "--eval-prompts",
        "",
        "--output-dir",
        tmp_path,
        "--run-name",
        name,
        *extra,
    )
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]


def test_cli_with_a_reward_model_and_with_a_reward_function(tmp_path, random_model_dir, random_rm_dir):
    rows = _ppo(
        tmp_path,
        "rm",
        "--model",
        random_model_dir,
        "--reward-model",
        random_rm_dir,
        "--target-kl",
        "1.0",
        "--missing-eos-penalty",
        "1.0",
    )
    for key in (
        "rollout/score_mean",
        "rollout/reward_mean",
        "train/kl",
        "train/non_score_reward",
        "train/pg_loss",
        "train/vf_loss",
        "train/clip_frac",
        "train/vf_clip_frac",
        "train/approx_kl",
        "train/entropy",
        "train/value_mean",
        "train/returns_mean",
        "train/explained_variance",
    ):
        assert key in rows[-1], key
    assert rows[-1]["train/kl_coef"] != rows[1]["train/kl_coef"]  # the adaptive controller moved
    rows = _ppo(tmp_path, "fn", "--reward-fn", "tiny_world")
    assert "rollout/reward/tiny_world" in rows[-1] and 0 <= rows[-1]["rollout/score_mean"] <= 1
    assert (tmp_path / "fn" / "final" / "model.safetensors").is_file()
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "fn" / "value_model").config.num_labels == 1


@pytest.mark.slow
def test_default_ppo_run_learns(tmp_path):
    """`python ppo.py` with no flags: held-out target accuracy (the verifier's, not the reward model's) +10 points."""
    base = json.loads((ROOT / "assets" / "tiny-base" / "build_eval.json").read_text())["eval/accuracy"]
    run_script(ROOT / "ppo.py", "--output-dir", tmp_path, "--run-name", "ppo_default_learns")
    rows = [json.loads(line) for line in (tmp_path / "ppo_default_learns" / "metrics.jsonl").open()]
    assert rows[-1]["eval/accuracy"] >= base + 0.10, (base, rows[-1]["eval/accuracy"])


def test_masked_moments_and_whiten_match_plain_definitions():
    """What ppo.py runs (reward whitening, advantage whitening, explained variance) against the definitions on the
    kept entries, picked by hand."""
    from ppo import masked_moments, whiten

    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1]])
    kept = torch.tensor([1.0, 2.0, 3.0, 4.0, -7.0, 9.0])  # by hand
    mean, var = masked_moments(x, mask)
    assert mean == pytest.approx(kept.mean().item()) and var == pytest.approx(kept.var().item())  # unbiased
    assert mean == pytest.approx(2.0) and var == pytest.approx(sum((v - 2.0) ** 2 for v in kept.tolist()) / 5)
    w = whiten(x, mask, eps=0.0)
    torch.testing.assert_close(w[mask.bool()], (kept - kept.mean()) / kept.std())
    w2 = whiten(x, mask, shift_mean=False, eps=0.0)
    torch.testing.assert_close(w2[mask.bool()], (kept - kept.mean()) / kept.std() + kept.mean())


def test_cli_stop_token_missing_eos_penalty_and_whitened_rewards(tmp_path):
    """Four runs that sample the same step-1 rollouts (same seed, same initial policy), on tiny-base with a 3-token
    budget so that the 3-digit answers are cut: the flags' effect on step 1, where the policy is the reference (so
    the KL penalty is exactly 0 and the reward is the score)."""
    flags = ("--reward-fn", "tiny_world", "--max-new-tokens", "3")
    first = {}
    for name, extra in (
        ("base", ()),
        ("penalty", ("--missing-eos-penalty", "0.5")),
        ("stop", ("--stop-token", "1")),
        ("whiten", ("--whiten-rewards",)),
    ):
        first[name] = next(r for r in _ppo(tmp_path, name, *flags, *extra) if "rollout/score_mean" in r)
    base, penalty, stop, whiten = first["base"], first["penalty"], first["stop"], first["whiten"]
    assert 0 < base["rollout/no_eos_frac"] < 1 and base["rollout/reward_mean"] == pytest.approx(
        base["rollout/score_mean"]
    )
    # --missing-eos-penalty: the same scores, minus 0.5 for each completion that did not end
    assert penalty["rollout/score_mean"] == base["rollout/score_mean"]
    expected = base["rollout/score_mean"] - 0.5 * base["rollout/no_eos_frac"]
    assert penalty["rollout/reward_mean"] == pytest.approx(expected, abs=1e-6)
    # --stop-token 1: completions end at their first "1" (kept), which every 1xx answer starts with
    assert stop["rollout/completion_len"] < base["rollout/completion_len"]
    assert stop["rollout/no_eos_frac"] < base["rollout/no_eos_frac"]
    # --whiten-rewards: the same rollouts and scores, other per-token rewards, so other returns and value targets
    assert whiten["rollout/score_mean"] == base["rollout/score_mean"]
    assert whiten["train/returns_mean"] != pytest.approx(base["train/returns_mean"], abs=1e-3)
