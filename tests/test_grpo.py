"""grpo.py's pure functions against hand-computed values and brute-force loops; rewards; the command line."""

import json
import math

import pytest
import torch
from conftest import ROOT, TINY_BASE, run_script
from transformers import AutoModelForCausalLM

import grpo
from common import rewards
from common.rewards import (
    compute_rewards,
    extract_final_answer,
    hand_math_reward,
    load_reward_fn,
    math_reward,
    normalize_number,
)


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


def test_rloo_advantages_by_hand():
    """A_i = r_i - mean of the other G - 1 rewards of the group (the paper's leave-one-out baseline, written out)."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 1.0, 1.0])
    expect = []
    for g in range(2):
        group = rewards[4 * g : 4 * g + 4].tolist()
        expect += [r - (sum(group) - r) / 3 for r in group]
    torch.testing.assert_close(grpo.rloo_advantages(rewards, 4, "none"), torch.tensor(expect))
    torch.testing.assert_close(
        grpo.rloo_advantages(rewards[:4], 4, "none"), torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3])
    )
    # scaled by the group std like GRPO's: G/(G-1) times the group-mean advantage
    torch.testing.assert_close(
        grpo.rloo_advantages(rewards, 4, "group"), grpo.group_advantages(rewards, 4, "group") * 4 / 3
    )


def test_reinforce_pp_advantages_by_hand():
    """(r - mu) / sigma with mu, sigma over every completion token of the batch (each reward counted len times)."""
    rewards, lengths = torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([1, 3, 2, 2])
    tokens = [r for r, n in zip(rewards.tolist(), lengths.tolist()) for _ in range(n)]  # 1, 0, 0, 0, 0, 0, 1, 1
    mu = sum(tokens) / len(tokens)  # 3/8
    sigma = math.sqrt(sum((t - mu) ** 2 for t in tokens) / len(tokens))
    expect = torch.tensor([(r - mu) / sigma for r in rewards.tolist()])
    torch.testing.assert_close(grpo.reinforce_pp_advantages(rewards, lengths, eps=0.0), expect)
    # a zero-spread group still gets an advantage: no group statistics
    two = grpo.reinforce_pp_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.ones(4), eps=0.0)
    torch.testing.assert_close(two, torch.tensor([1.0, 1.0, -1.0, -1.0]))
    # another process's completions enter mu and sigma through batch_*
    part = grpo.reinforce_pp_advantages(rewards[:2], lengths[:2], eps=0.0, batch_rewards=rewards, batch_lengths=lengths)
    torch.testing.assert_close(part, expect[:2])


def test_overlong_penalty_by_hand():
    """DAPO eq. 13 with L = 10, buffer 4: 0 up to 6 tokens, then -(len - 6) / 4 * penalty, -penalty at 10."""
    lengths = torch.tensor([1, 6, 7, 8, 10])
    torch.testing.assert_close(
        grpo.overlong_penalty(lengths, 10, 4, 0.5), torch.tensor([0.0, 0.0, -0.125, -0.25, -0.5])
    )


def test_gspo_sequence_ratio_loss_and_gradient_by_hand():
    """GSPO eq. 5-7: s_i = exp(mean_t (logp - old)); loss_i = -min(s_i A_i, clip(s_i, 1 - e, 1 + e_h) A_i), on
    each of the sequence's tokens; its gradient w.r.t. token t's logp is -A_i s_i / |y_i| while unclipped."""
    old = torch.zeros(2, 3)
    delta = torch.tensor([[0.01, -0.002, 0.0], [0.3, 0.1, 0.5]])  # row 0: 2 tokens (mask), row 1: 3 tokens
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    logps = (old + delta).requires_grad_()
    adv = torch.tensor([1.5, -2.0])
    loss, low, high = grpo.grpo_token_loss(logps, old, adv, 0.2, 0.28, mask=mask, level="sequence")
    s0, s1 = math.exp((0.01 - 0.002) / 2), math.exp((0.3 + 0.1 + 0.5) / 3)  # 1.004 inside; 1.35 above 1.28
    # row 1: A < 0 and s above the range: min picks the unclipped s A (pessimistic), gradient flows
    torch.testing.assert_close(loss[0], torch.full((3,), -1.5 * s0))
    torch.testing.assert_close(loss[1], torch.full((3,), 2.0 * s1))
    assert not low.any() and not high.any()
    (loss * mask).sum().backward()  # each token of row i carries loss_i: sum = |y_i| loss_i
    grad = logps.grad
    # d(|y| * loss_i)/d logp_t = -A s_i (mean's 1/|y| cancels the |y| copies); zero on the masked token
    torch.testing.assert_close(grad[0], torch.tensor([-1.5 * s0, -1.5 * s0, 0.0]))
    torch.testing.assert_close(grad[1], torch.full((3,), 2.0 * s1))
    # a positive advantage above 1 + eps_high: the whole sequence is clipped, no gradient to any of its tokens
    logps2 = delta.clone().requires_grad_()
    loss2, _, high2 = grpo.grpo_token_loss(
        logps2, old, torch.tensor([1.0, 1.0]), 0.2, 0.28, mask=mask, level="sequence"
    )
    assert high2[1].all() and not high2[0].any()
    (loss2 * mask).sum().backward()
    assert torch.equal(logps2.grad[1], torch.zeros(3))


def test_cispo_keeps_the_gradient_of_clipped_tokens():
    """MiniMax-M1 eq. 4: loss_t = -sg(min(rho_t, cap)) A log pi_t, gradient -min(rho, cap) A on every token. Where
    GRPO's clip zeroes a token's gradient (A > 0, rho > 1 + eps_high), CISPO's is scaled, not dropped."""
    old = torch.zeros(1, 3)
    rho = torch.tensor([[0.5, 1.5, 7.0]])
    logps = rho.log().requires_grad_()
    loss, low, high = grpo.grpo_token_loss(logps, old, torch.tensor([2.0]), None, None, loss_type="cispo")
    torch.testing.assert_close(loss, -torch.tensor([[0.5, 1.5, 5.0]]) * 2.0 * rho.log())
    loss.sum().backward()
    torch.testing.assert_close(logps.grad, -torch.tensor([[0.5, 1.5, 5.0]]) * 2.0)
    assert high.tolist() == [[False, False, True]] and not low.any()
    grpo_logps = rho.log().requires_grad_()
    g_loss, _, _ = grpo.grpo_token_loss(grpo_logps, old, torch.tensor([2.0]), 0.2, 0.28)
    g_loss.sum().backward()
    assert grpo_logps.grad[0, 1] == 0 and grpo_logps.grad[0, 2] == 0  # GRPO drops them


def test_algorithm_defaults_resolve_and_refuse():
    base = grpo.Args()
    assert grpo.algorithm_defaults(base) == {
        "epsilon": 0.2, "epsilon_high": 0.28, "loss_agg": "token-mean", "scale_rewards": "group"
    }  # fmt: skip
    gspo = grpo.algorithm_defaults(grpo.Args(importance_sampling_level="sequence", advantage="rloo"))
    assert gspo == {"epsilon": 3e-4, "epsilon_high": 4e-4, "loss_agg": "seq-mean-token-mean", "scale_rewards": "none"}
    assert grpo.algorithm_defaults(grpo.Args(loss_type="cispo", loss_agg="token-mean", scale_rewards="batch")) == {}
    for bad, says in [
        ({"loss_type": "cispo", "epsilon": 0.1}, "--cispo-max-weight"),
        ({"advantage": "reinforce++", "scale_rewards": "group"}, "reinforce++"),
        ({"overlong_buffer": 8}, "--overlong-buffer 8"),
        ({"overlong_penalty": -1.0}, "--overlong-penalty"),
    ]:
        with pytest.raises(SystemExit, match=says):
            grpo.algorithm_defaults(grpo.Args(**bad))


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
def test_math_reward(completion, answer, expected, monkeypatch):
    assert math_reward([None], [completion], [answer]) == [expected]  # math-verify ([dev] installs it)
    assert hand_math_reward([None], [completion], [answer]) == [expected]
    monkeypatch.setattr(rewards, "_math_verify", lambda: None)  # not installed: the hand-written parser
    assert math_reward([None], [completion], [answer]) == [expected]


# (reference answer, completion, right verdict, math-verify's verdict, the hand-written parser's verdict): what each
# checker says, asserted, so a change of either shows here. docs/grpo.md summarizes the table.
MATH_PAIRS = [
    ("#### 42", "so the answer is #### 42", 1, 1, 1),
    ("#### 1,234", "#### 1234", 1, 1, 1),  # thousands separator
    ("-3", "\\boxed{-3.0}", 1, 1, 1),
    ("1/2", "\\boxed{0.5}", 1, 1, 1),
    ("42", "I think 41. No wait, \\boxed{42}", 1, 1, 1),  # the last boxed answer counts
    ("12", "The total is 12 apples.", 1, 1, 1),  # no marker: the last number
    ("5", "\\boxed{5 \\text{ cm}}", 1, 1, 1),  # units
    ("5 \\text{ cm}", "\\boxed{5}", 1, 1, 1),
    ("x=3", "\\boxed{3}", 1, 1, 1),
    ("\\$12", "\\boxed{12}", 1, 1, 1),  # a currency sign in the reference
    ("\\frac{3}{4}", "\\boxed{0.75}", 1, 1, 0),  # a LaTeX fraction as the reference, unboxed
    ("\\frac{3}{4}", "\\boxed{\\frac{6}{8}}", 1, 1, 0),  # an unreduced fraction
    ("\\frac{3}{4}", "\\boxed{3/4}", 1, 1, 0),
    ("\\dfrac{1}{2}", "The answer is \\boxed{\\frac12}", 1, 1, 0),  # brace-less \\frac12
    ("\\sqrt{2}/2", "\\boxed{\\frac{\\sqrt{2}}{2}}", 1, 1, 0),  # radicals
    ("\\frac{\\sqrt{3}}{3}", "\\boxed{\\frac{1}{\\sqrt{3}}}", 1, 1, 0),  # a rationalized denominator
    ("2\\pi", "\\boxed{2\\pi}", 1, 1, 0),  # constants
    ("x^2+2x+1", "\\boxed{(x+1)^2}", 1, 1, 0),  # equivalent expressions
    ("\\{1, 2, 3\\}", "\\boxed{\\{3, 2, 1\\}}", 1, 1, 0),  # sets, in any order
    ("(1, 2)", "\\boxed{(1,2)}", 1, 1, 0),  # an interval (or a pair)
    ("[0, 1)", "\\boxed{[0,1)}", 1, 1, 0),
    ("10\\%", "\\boxed{10\\%}", 1, 1, 0),  # percentages
    ("10\\%", "\\boxed{0.1}", 1, 1, 0),
    ("3", "\\boxed{x = 3}", 1, 1, 0),  # an equation's right-hand side
    ("2^{10}", "\\boxed{1024}", 1, 1, 0),  # a power, evaluated
    ("\\binom{5}{2}", "\\boxed{10}", 1, 1, 0),
    ("\\infty", "\\boxed{\\infty}", 1, 1, 0),
    ("\\text{(B)}", "\\boxed{B}", 1, 1, 0),  # a multiple-choice letter
    ("e^{i\\pi}", "\\boxed{-1}", 1, 0, 0),  # both miss Euler's identity
    ("42", "\\boxed{43}", 0, 0, 0),
    ("2\\pi", "\\boxed{6.283}", 0, 0, 0),  # a rounded value is not the exact answer
    ("\\frac{1}{3}", "\\boxed{0.333}", 0, 0, 0),
]


@pytest.mark.parametrize("answer,completion,right,by_math_verify,by_hand", MATH_PAIRS)
def test_math_verify_against_the_hand_written_parser(answer, completion, right, by_math_verify, by_hand):
    assert math_reward([None], [completion], [answer]) == [float(by_math_verify)]
    assert hand_math_reward([None], [completion], [answer]) == [float(by_hand)]


def test_math_verify_is_right_wherever_the_two_disagree():
    disagree = [p for p in MATH_PAIRS if p[3] != p[4]]
    assert len(disagree) >= 15 and all(p[3] == p[2] for p in disagree)


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


@pytest.mark.parametrize(
    "variant",
    [
        ("--importance-sampling-level", "sequence", "--advantage", "reinforce++", "--overlong-buffer", "4"),
        ("--loss-type", "cispo", "--advantage", "rloo", "--cispo-max-weight", "1.05"),
    ],
    ids=["gspo-reinforce++-overlong", "cispo-rloo"],
)
def test_variants_end_to_end_and_micro_batch_invariant(tmp_path, variant):
    """The variants through the real command line: resolved defaults saved, their metrics logged, and the update
    independent of --micro-batch-size (the GSPO ratio and the REINFORCE++ statistics are per sequence / per batch)."""
    a = _grpo(tmp_path, "mb16", "--micro-batch-size", "16", "--num-iterations", "2", *variant)
    b = _grpo(tmp_path, "mb4", "--micro-batch-size", "4", "--num-iterations", "2", *variant)
    saved = json.loads((tmp_path / "mb16" / "args.json").read_text())
    if "sequence" in variant:
        assert (saved["epsilon"], saved["epsilon_high"], saved["loss_agg"]) == (3e-4, 4e-4, "seq-mean-token-mean")
        assert saved["scale_rewards"] == "none" and "rollout/overlong_penalty" in a[-1]
        assert a[-1]["rollout/overlong_penalty"] <= 0
    else:
        assert saved["epsilon"] is None and saved["scale_rewards"] == "none"
        assert "rollout/overlong_penalty" not in a[-1]
    for ra, rb in zip(a[1:], b[1:]):
        assert rb["rollout/reward_mean"] == ra["rollout/reward_mean"]
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


def test_a_reward_function_failing_mid_run_is_the_last_line(tmp_path):
    """The error comes after the progress bar (die closes the run's tracker first), and no checkpoint is written."""
    proc = run_script("grpo.py", "--reward-fn", "tests.cli_rewards:fails_later", "--max-steps", "2", "--eval-prompts",
                      "", "--kl-every", "0", "--output-dir", tmp_path, "--run-name", "r", check=False)  # fmt: skip
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "error: reward function 'tests.cli_rewards:fails_later' raised KeyError: 'grader offline'", last
    assert not (tmp_path / "r" / "final").exists()
