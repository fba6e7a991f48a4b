"""grpo.py's pure functions against hand-computed values and brute-force loops; rewards; the command line."""

import json
import math

import pytest
import torch
from conftest import ROOT, TINY_BASE, run_script
from transformers import AutoModelForCausalLM

import grpo
from common.rewards import compute_rewards, extract_final_answer, load_reward_fn, math_reward, normalize_number


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = grpo.group_advantages(rewards, 4, "group", eps=0.0 + 1e-12)
    std = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    torch.testing.assert_close(adv[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / std)
    assert torch.equal(adv[4:], torch.zeros(4))  # a zero-spread group: 0, not NaN
    torch.testing.assert_close(
        grpo.group_advantages(rewards, 4, "none"), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    )
    batch_std = rewards.std().item()
    torch.testing.assert_close(
        grpo.group_advantages(rewards, 4, "batch", eps=0.0),
        torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / batch_std,
    )


def test_k3_is_nonnegative_and_zero_at_equality():
    a, b = torch.randn(1000), torch.randn(1000)
    assert (grpo.k3_kl(a, b) >= 0).all()
    assert torch.equal(grpo.k3_kl(a, a), torch.zeros(1000))
    # by hand: d = ref - logp = log 2 -> 2 - log 2 - 1
    assert grpo.k3_kl(torch.tensor([0.0]), torch.tensor([math.log(2)])).item() == pytest.approx(1 - math.log(2))


@pytest.mark.parametrize(
    "adv,ratio,expect_loss,clip_low,clip_high,grad_zero",
    [
        (2.0, 1.1, -2.2, False, False, False),  # inside the range: -ratio * A
        (2.0, 1.5, -2.56, False, True, True),  # A > 0 above 1 + eps_high: clipped at 1.28
        (2.0, 0.5, -1.0, False, False, False),  # A > 0 below 1 - eps: min picks the unclipped, gradient flows
        (-2.0, 0.5, 1.6, True, False, True),  # A < 0 below 1 - eps: clipped at 0.8
        (-2.0, 1.5, 3.0, False, False, False),  # A < 0 above the range: unclipped (pessimistic), gradient flows
    ],
)
def test_clipping_cases(adv, ratio, expect_loss, clip_low, clip_high, grad_zero):
    logps = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, low, high = grpo.grpo_token_loss(logps, torch.zeros(1, 1), torch.tensor([adv]), 0.2, 0.28)
    assert loss.item() == pytest.approx(expect_loss, rel=1e-5)
    assert bool(low) == clip_low and bool(high) == clip_high
    loss.sum().backward()
    assert (logps.grad.abs().item() == 0) == grad_zero


def test_beta_k3_term_by_hand():
    """loss_t = -rho_t A + beta * k3_t with k3 = exp(d) - d - 1, d = log pi_ref - log pi (Schulman's estimator,
    DeepSeekMath eq. 4). At rho = 1 (old = current): d loss / d logp = -A + beta * (1 - exp(d))."""
    beta, adv, logp, ref = 0.04, 0.5, -1.0, -1.5
    d = ref - logp
    logps = torch.tensor([[logp]], requires_grad=True)
    loss, _, _ = grpo.grpo_token_loss(
        logps, torch.tensor([[logp]]), torch.tensor([adv]), 0.2, 0.28, torch.tensor([[ref]]), beta
    )
    assert loss.item() == pytest.approx(-adv + beta * (math.exp(d) - d - 1), rel=1e-6)
    loss.sum().backward()
    assert logps.grad.item() == pytest.approx(-adv + beta * (1 - math.exp(d)), rel=1e-6)
    # beta 0: the reference is not read at all
    plain, _, _ = grpo.grpo_token_loss(logps, torch.tensor([[logp]]), torch.tensor([adv]), 0.2, 0.28)
    assert plain.item() == pytest.approx(-adv)


def brute_force_loss(tok_loss, mask, agg, max_new_tokens):
    per_seq = []
    total, count = 0.0, 0
    for i in range(tok_loss.shape[0]):
        s = sum(tok_loss[i, t].item() for t in range(tok_loss.shape[1]) if mask[i, t])
        n = int(mask[i].sum())
        per_seq.append((s, n))
        total, count = total + s, count + n
    if agg == "token-mean":
        return total / count
    if agg == "seq-mean-token-mean":
        return sum(s / n for s, n in per_seq) / len(per_seq)
    return sum(s for s, _ in per_seq) / (max_new_tokens * len(per_seq))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregations_match_brute_force_and_are_micro_batch_invariant(agg):
    g = torch.Generator().manual_seed(0)
    B, L = 8, 6
    mask = torch.zeros(B, L)
    for i, n in enumerate([6, 1, 3, 4, 2, 6, 5, 1]):
        mask[i, :n] = 1
    logps = torch.randn(B, L, generator=g).requires_grad_()
    old = logps.detach() + 0.1 * torch.randn(B, L, generator=g)
    adv = torch.randn(B, generator=g)
    tok_loss, _, _ = grpo.grpo_token_loss(logps, old, adv, 0.2, 0.28)
    w = grpo.aggregation_weights(mask, agg, max_new_tokens=L)
    full = (tok_loss * w).sum()
    assert full.item() == pytest.approx(brute_force_loss(tok_loss.detach(), mask, agg, L), rel=1e-6)
    (full_grad,) = torch.autograd.grad(full, logps)
    for micro in (1, 3):  # micro-batches (3 does not divide 8) with the weights of the whole batch
        acc = torch.zeros_like(logps)
        for m0 in range(0, B, micro):
            part = logps[m0 : m0 + micro]
            t, _, _ = grpo.grpo_token_loss(part, old[m0 : m0 + micro], adv[m0 : m0 + micro], 0.2, 0.28)
            acc[m0 : m0 + micro] += torch.autograd.grad((t * w[m0 : m0 + micro]).sum(), part)[0]
        torch.testing.assert_close(acc, full_grad)


@pytest.mark.parametrize(
    "completion,answer,expected",
    [
        ("so x = 12 and the answer is #### 1,234", "Natalia sold... #### 1234", 1.0),  # GSM8K reference, commas
        ("The final answer is \\boxed{-5}", "#### -5", 1.0),  # negative, boxed
        ("\\boxed{\\frac{3}{4}}", "0.75", 1.0),  # simple fraction
        ("#### 42.0", "42", 1.0),  # trailing .0
        ("We get 7 apples, then 9.", "#### 9", 1.0),  # last number
        ("I do not know", "#### 9", 0.0),  # no answer
        ("\\boxed{41}", "#### 42", 0.0),
    ],
)
def test_math_reward(completion, answer, expected):
    assert math_reward([None], [completion], [answer]) == [expected]


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("The answer is \\boxed{7}.", 1.0),  # a boxed answer
        ("\\boxed{\\frac{1}{2}}", 1.0),  # nested braces balance
        ("\\boxed{7", 0.0),  # unbalanced: no final answer is marked
        ("work...\n#### 42", 1.0),  # a GSM8K final-answer line
        ("####", 0.0),  # the marker with nothing after it
        ("#### \n", 0.0),  # only whitespace after it
        ("The answer is 42.", 0.0),  # an answer, but not marked
        ("boxed{7}", 0.0),  # no backslash: not LaTeX's \\boxed
        ("", 0.0),
    ],
)
def test_format_reward_by_hand(completion, expected):
    assert load_reward_fn("format")(["q"], [completion], [""]) == [expected]


def test_answer_extraction_and_normalization():
    assert extract_final_answer("a \\boxed{x^{2}} b") == "x^{2}"
    assert extract_final_answer("nothing here") is None
    assert normalize_number("$1,000") == 1000 and normalize_number("-3.50") == normalize_number("-7/2")
    assert normalize_number("abc") is None


def test_reward_plugin_and_bad_reward_functions(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(prompts, completions, answers):\n    return [float(len(c)) for c in completions]\n"
        "def boom(prompts, completions, answers):\n    raise RuntimeError('kaput')\n"
        "def short(prompts, completions, answers):\n    return [1.0]\n"
        "def nan(prompts, completions, answers):\n    return [float('nan')] * len(completions)\n"
    )
    monkeypatch.chdir(tmp_path)
    fn = load_reward_fn("my_rewards:length")
    total, per_fn = compute_rewards(
        ["my_rewards:length", "tiny_world"],
        [fn, load_reward_fn("tiny_world")],
        [0.5, 2.0],
        ["p", "p"],
        ["12", "abc"],
        ["12", "12"],
    )
    assert total == [0.5 * 2 + 2.0, 0.5 * 3] and per_fn["length"] == [2.0, 3.0]
    for name, message in [
        ("boom", "raised RuntimeError: kaput"),
        ("short", "returned 1 values for 2"),
        ("nan", "returned a non-finite value"),
    ]:
        spec = f"my_rewards:{name}"
        with pytest.raises(SystemExit, match=f"reward function '{spec}' {message}"):
            compute_rewards([spec], [load_reward_fn(spec)], [1.0], ["p", "p"], ["a", "b"], ["a", "b"])
    with pytest.raises(SystemExit, match="has no function 'missing'"):
        load_reward_fn("my_rewards:missing")
    with pytest.raises(SystemExit, match="not a built-in"):
        load_reward_fn("nonsense")


def _grpo(tmp_path, name, *extra):
    run_script(
        "grpo.py",
        "--max-steps",
        "2",
        "--prompts-per-step",
        "4",
        "--group-size",
        "4",
        "--eval-prompts",
        "",
        "--kl-every",
        "1",
        "--output-dir",
        tmp_path,
        "--run-name",
        name,
        *extra,
    )
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]


def test_cli_end_to_end_and_micro_batch_invariance(tmp_path):
    a = _grpo(tmp_path, "mb16", "--micro-batch-size", "16", "--num-iterations", "2")
    b = _grpo(tmp_path, "mb4", "--micro-batch-size", "4", "--num-iterations", "2")
    for key in (
        "rollout/reward_mean",
        "rollout/reward_std",
        "rollout/completion_len",
        "rollout/truncated_frac",
        "rollout/zero_std_frac",
        "train/loss",
        "train/kl",
        "train/clip_frac_low",
        "train/clip_frac_high",
        "train/entropy",
        "train/grad_norm",
        "perf/gen_tokens_per_s",
        "perf/train_tokens_per_s",
        "perf/gen_share",
    ):
        assert key in a[-1], key
    assert [r["rollout/reward_mean"] for r in a[1:]] == [r["rollout/reward_mean"] for r in b[1:]]  # same rollouts
    for ra, rb in zip(a[1:], b[1:]):
        assert rb["train/loss"] == pytest.approx(ra["train/loss"], rel=1e-4, abs=1e-6)
    wa = AutoModelForCausalLM.from_pretrained(tmp_path / "mb16" / "final").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(tmp_path / "mb4" / "final").state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_default_grpo_run_learns(tmp_path):
    """`python grpo.py` with no flags: held-out target accuracy +15 points over tiny-base, general skills kept."""
    base = json.loads((TINY_BASE / "build_eval.json").read_text())
    run_script(ROOT / "grpo.py", "--output-dir", tmp_path, "--run-name", "grpo_default_learns")
    rows = [json.loads(line) for line in (tmp_path / "grpo_default_learns" / "metrics.jsonl").open()]
    final = rows[-1]
    assert final["eval/accuracy"] >= base["eval/accuracy"] + 0.15, (base["eval/accuracy"], final["eval/accuracy"])
    assert final["eval/general_accuracy"] >= base["eval/general_accuracy"] - 0.10
    assert "train/kl" in final and final["train/kl"] > 0


def test_no_update_when_every_advantage_is_zero(tmp_path):
    """The format reward is 0 for every tiny-world answer: every group has zero spread, so the gradient is exactly 0
    and the update is skipped (AdamW's momentum would otherwise still move the weights)."""
    rows = _grpo(tmp_path, "flat", "--reward-fn", "format")
    assert all(r["rollout/zero_std_frac"] == 1.0 and r["train/skipped_updates"] == 1 for r in rows[1:])
    assert all("train/loss" not in r for r in rows[1:])
    before = AutoModelForCausalLM.from_pretrained(TINY_BASE).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "flat" / "final").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_mask_truncated_drops_truncated_completions_from_the_loss(tmp_path):
    """--max-new-tokens 1 cuts every completion (tiny-base never ends on its first token): with --mask-truncated no
    token is left in the loss, so every update is skipped and the weights stay; without it the same rollouts (same
    rewards, spread in every group) give a non-zero gradient."""
    flags = ("--max-new-tokens", "1", "--reward-fn", "tests.cli_rewards:alternating", "--beta", "0")
    kept = _grpo(tmp_path, "kept", *flags)
    masked = _grpo(tmp_path, "masked", *flags, "--mask-truncated")
    for a, b in zip(kept[1:], masked[1:]):
        assert a["rollout/truncated_frac"] == b["rollout/truncated_frac"] == 1.0
        assert a["train/skipped_updates"] == 0 and a["train/grad_norm"] > 0
        assert b["train/skipped_updates"] == 1 and "train/loss" not in b
    before = AutoModelForCausalLM.from_pretrained(TINY_BASE).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "masked" / "final").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
