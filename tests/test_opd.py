"""opd.py: the sampled estimator against the exact reverse KL, the chunked divergences (reverse KL, top-k forward KL,
generalized JSD) against naive full-logits ones in fp64, the command line."""

import json
import math
import shutil

import pytest
import torch
from conftest import ROOT, TINY_BASE, run_script

from common.model import load_tokenizer
from opd import ChunkedDivergence, sampled_token_loss


def _exact_reverse_kl(z_s, z_t):
    logp, logq = torch.log_softmax(z_s, -1), torch.log_softmax(z_t, -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def test_sampled_estimator_matches_the_exact_reverse_kl_in_expectation():
    g = torch.Generator().manual_seed(0)
    z_s = (torch.randn(7, generator=g) * 1.5).requires_grad_()
    z_t = torch.randn(7, generator=g) * 1.5
    kl = _exact_reverse_kl(z_s, z_t)
    kl.backward()
    exact_grad = z_s.grad.clone()
    z_s.grad = None
    p = torch.softmax(z_s.detach(), -1)
    samples = torch.multinomial(p, 400_000, replacement=True, generator=g)
    logps = torch.log_softmax(z_s, -1)[samples]
    teacher = torch.log_softmax(z_t, -1)[samples]
    per_token_kl = (logps - teacher).detach()  # the value estimate: -A_t
    se = per_token_kl.std() / len(samples) ** 0.5
    assert abs(per_token_kl.mean() - kl.detach()) < 4 * se
    forward_kl = (torch.softmax(z_t, -1) * (torch.log_softmax(z_t, -1) - torch.log_softmax(z_s.detach(), -1))).sum()
    assert abs(forward_kl - kl.detach()) > 40 * se  # the test can tell reverse from forward KL
    # the gradient of the sampled loss is an unbiased estimate of the reverse KL's gradient
    sampled_token_loss(logps, logps.detach(), teacher, epsilon=0.2).mean().backward()
    assert torch.allclose(z_s.grad, exact_grad, atol=0.02), (z_s.grad, exact_grad)
    assert exact_grad.abs().max() > 0.1


@pytest.mark.parametrize(
    "adv,ratio,expect_loss,grad_zero",
    [
        # A = log pi_T - log pi_old of the sampled token; loss = max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), eps 0.2
        (0.5, 1.1, -0.55, False),  # inside the range: -A rho, d/d logp = -A rho
        (0.5, 1.5, -0.6, True),  # A > 0 above 1 + eps: the clipped value -A * 1.2 is the max, no gradient
        (0.5, 0.5, -0.25, False),  # A > 0 below 1 - eps: the unclipped -A * 0.5 is the max, gradient flows
        (-0.5, 0.5, 0.4, True),  # A < 0 below 1 - eps: clipped at 0.8, no gradient
        (-0.5, 1.5, 0.75, False),  # A < 0 above the range: unclipped (pessimistic), gradient flows
    ],
)
def test_sampled_token_loss_clipping_by_hand(adv, ratio, expect_loss, grad_zero):
    old, eps = -2.0, 0.2
    logps = torch.tensor([[old + math.log(ratio)]], requires_grad=True)
    loss = sampled_token_loss(logps, torch.tensor([[old]]), torch.tensor([[old + adv]]), eps)
    assert loss.item() == pytest.approx(expect_loss, rel=1e-5)
    loss.sum().backward()
    expect_grad = 0.0 if grad_zero else -adv * ratio
    assert logps.grad.item() == pytest.approx(expect_grad, abs=1e-6)


def _naive_divergence(z_s, z_t, objective, beta=0.5, topk=5):
    """The objectives written plainly in probability space over the full (N, V) logits (autograd for gradients)."""
    p, q = torch.softmax(z_s, -1), torch.softmax(z_t, -1)
    if objective == "full":  # KL(p || q)
        return (p * (p / q).log()).sum(-1)
    if objective == "forward-topk":  # KL(q~ || p), q~ = q on the teacher's top-k tokens, renormalized, 0 elsewhere
        top = q.topk(topk, -1).indices  # (N, k): the only terms of the sum (q~ is 0 elsewhere)
        q_top = q.gather(-1, top) / q.gather(-1, top).sum(-1, keepdim=True)
        return (q_top * (q_top / p.gather(-1, top)).log()).sum(-1)
    if beta == 0.0:  # JSD's limits: the forward KL(q || p) ...
        return (q * (q / p).log()).sum(-1)
    if beta == 1.0:  # ... and the reverse KL(p || q)
        return (p * (p / q).log()).sum(-1)
    m = beta * q + (1 - beta) * p
    return beta * (q * (q / m).log()).sum(-1) + (1 - beta) * (p * (p / m).log()).sum(-1)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(
    "objective,beta,topk",
    [("full", 0.5, 5), ("forward-topk", 0.5, 5), ("forward-topk", 0.5, 50), ("jsd", 0.5, 5), ("jsd", 0.1, 5),
     ("jsd", 0.9, 5), ("jsd", 0.0, 5), ("jsd", 1.0, 5)],
)  # fmt: skip
def test_chunked_divergences_match_naive_values_and_gradients(with_bias, objective, beta, topk):
    g = torch.Generator().manual_seed(1)
    N, H, V, T = 37, 16, 50, 0.7
    s_h = torch.randn(N, H, generator=g, dtype=torch.float64).requires_grad_()
    s_w = torch.randn(V, H, generator=g, dtype=torch.float64).requires_grad_()
    s_b = torch.randn(V, generator=g, dtype=torch.float64).requires_grad_() if with_bias else None
    t_h, t_w = torch.randn(N, H, generator=g, dtype=torch.float64), torch.randn(V, H, generator=g, dtype=torch.float64)
    t_b = torch.randn(V, generator=g, dtype=torch.float64) if with_bias else None
    weights = torch.rand(N, generator=g, dtype=torch.float64)  # a non-uniform upstream gradient

    # 8 rows a chunk: does not divide 37
    chunked = ChunkedDivergence.apply(s_h, s_w, s_b, t_h, t_w, t_b, T, 8, objective, beta, topk)
    (chunked * weights).sum().backward()
    grads = [s_h.grad.clone(), s_w.grad.clone()] + ([s_b.grad.clone()] if with_bias else [])
    for x in (s_h, s_w, s_b):
        if x is not None:
            x.grad = None
    z_s = (s_h @ s_w.T + (0 if s_b is None else s_b)) / T
    z_t = (t_h @ t_w.T + (0 if t_b is None else t_b)) / T
    naive = _naive_divergence(z_s, z_t, objective, beta, topk)
    (naive * weights).sum().backward()
    assert (naive > 0).all()
    torch.testing.assert_close(chunked, naive, rtol=1e-9, atol=1e-10)
    for a, b in zip(grads, [s_h.grad, s_w.grad] + ([s_b.grad] if with_bias else [])):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_divergence_special_cases():
    """forward-topk with k = V is the forward KL; jsd is symmetric in (p, q) at beta = 0.5 and bounded by log 2."""
    from opd import divergence

    g = torch.Generator().manual_seed(3)
    logp_s = torch.log_softmax(torch.randn(6, 20, generator=g, dtype=torch.float64) * 2, -1)
    logp_t = torch.log_softmax(torch.randn(6, 20, generator=g, dtype=torch.float64) * 2, -1)
    forward = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    torch.testing.assert_close(divergence(logp_s, logp_t, "forward-topk", topk=20), forward)
    torch.testing.assert_close(divergence(logp_s, logp_t, "jsd", 0.0), forward)
    js = divergence(logp_s, logp_t, "jsd", 0.5)
    torch.testing.assert_close(js, divergence(logp_t, logp_s, "jsd", 0.5))
    assert (js > 0).all() and (js <= math.log(2)).all()
    assert divergence(logp_s, logp_s, "jsd", 0.3).abs().max() < 1e-12


def test_teacher_token_stats_match_the_full_logits(qwen3_dir):
    """The teacher's log-prob of each sampled token and its top-1/top-5 membership, computed tile by tile on the
    completion tokens only, equal the full (B, L, V) softmax over the tokenizer's ids (the head has padding rows)."""
    from common.model import load_model
    from opd import teacher_token_stats

    teacher = load_model(str(qwen3_dir), dtype="float32", device="cpu").eval()
    vocab = len(load_tokenizer(str(qwen3_dir)))
    assert teacher.get_output_embeddings().weight.shape[0] > vocab
    g = torch.Generator().manual_seed(0)
    prompt_ids, completion_ids = (
        torch.randint(0, vocab, (3, 5), generator=g),
        torch.randint(0, vocab, (3, 6), generator=g),
    )
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[1, :2] = 0
    completion_mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0], [1] * 6])
    mask = torch.cat([prompt_mask, completion_mask], 1)

    def teacher_logp():  # (B, L, vocab) the full softmax at the positions predicting the completion tokens
        ids = torch.cat([prompt_ids, completion_ids], 1)
        with torch.no_grad():
            out = teacher(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
        return torch.log_softmax(out.logits[:, 4:-1, :vocab].float() / 0.7, -1)

    completion_ids[:, 0] = teacher_logp()[:, 0].argmax(-1)  # first tokens the teacher's argmax: top-1 not all False
    logp = teacher_logp()
    chosen = logp.gather(-1, completion_ids[..., None])[..., 0]
    rank = (logp > chosen[..., None]).sum(-1)
    got, top1, top5 = teacher_token_stats(teacher, prompt_ids, prompt_mask, completion_ids, completion_mask, 0.7, vocab)
    m = completion_mask.bool()
    torch.testing.assert_close(got[m], chosen[m], rtol=1e-5, atol=1e-5)
    assert torch.equal(top1[m], (rank < 1)[m]) and torch.equal(top5[m], (rank < 5)[m]) and top1[m].any()
    assert not top1[~m].any() and (got[~m] == 0).all()


def test_kl_and_loss_are_zero_when_student_is_teacher():
    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(5, 8, generator=g).requires_grad_(), torch.randn(11, 8, generator=g)
    for objective in ("full", "forward-topk", "jsd"):
        d = ChunkedDivergence.apply(h, w, None, h.detach(), w, None, 1.0, 2, objective, 0.5, 11)
        assert d.abs().max() < 1e-6, objective
    logps = torch.randn(3, 4)
    assert sampled_token_loss(logps, logps, logps, 0.2).abs().max() == 0


def _opd(tmp_path, name, *extra):
    run_script(
        ROOT / "opd.py",
        "--max-steps",
        "2",
        "--prompts-per-step",
        "4",
        "--group-size",
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


@pytest.mark.parametrize("objective", ["sampled", "full", "forward-topk", "jsd"])
def test_cli_every_objective(tmp_path, random_model_dir, objective):
    rows = _opd(
        tmp_path,
        objective,
        "--model",
        random_model_dir,
        "--teacher",
        TINY_BASE,
        "--objective",
        objective,
        "--cold-start-steps",
        "1",
    )
    assert rows[1]["train/phase"] == 0.0 and rows[-1]["train/phase"] == 1.0
    for key in (
        "train/reverse_kl",
        "train/teacher_logp",
        "train/student_logp",
        "train/overlap_top1",
        "train/overlap_top5",
    ):
        assert key in rows[-1], key
    assert rows[-1]["train/reverse_kl"] > 0.1  # a random student is far from tiny-base
    assert 0 <= rows[-1]["train/overlap_top1"] <= rows[-1]["train/overlap_top5"] <= 1
    same = _opd(
        tmp_path,
        objective + "_same",
        "--model",
        TINY_BASE,
        "--teacher",
        TINY_BASE,
        "--objective",
        objective,
        "--max-steps",
        "1",
    )
    assert abs(same[-1]["train/reverse_kl"]) < 1e-5
    if objective == "forward-topk":  # KL(q~ || q) = -log(the top-k's mass) > 0 even for the teacher itself
        assert 0 < same[-1]["train/loss"] < 0.5 and same[-1]["train/divergence"] == pytest.approx(
            same[-1]["train/loss"]
        )
    else:
        assert abs(same[-1]["train/loss"]) < 1e-5


def test_tokenizer_mismatch_stops_before_compute(tmp_path, random_model_dir):
    teacher = tmp_path / "teacher"
    shutil.copytree(random_model_dir, teacher)
    tok = json.loads((teacher / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (teacher / "tokenizer.json").write_text(json.dumps(tok))
    proc = run_script(
        ROOT / "opd.py", "--model", random_model_dir, "--teacher", teacher, "--output-dir", tmp_path, check=False
    )
    assert proc.returncode != 0
    assert "map 2 tokens differently, e.g. 'a'" in proc.stderr.strip().splitlines()[-1]
    assert not any(tmp_path.glob("opd__*"))  # nothing was run


@pytest.mark.slow
def test_default_opd_run_closes_half_the_gap(tmp_path):
    """`python opd.py` with no flags: the student closes >= 50% of the tiny-base -> tiny-teacher accuracy gap."""
    base = json.loads((TINY_BASE / "build_eval.json").read_text())["eval/accuracy"]
    run_script(ROOT / "opd.py", "--output-dir", tmp_path, "--run-name", "opd_default_learns")
    rows = [json.loads(line) for line in (tmp_path / "opd_default_learns" / "metrics.jsonl").open()]
    teacher = rows[0]["eval/teacher_accuracy"]
    assert rows[-1]["eval/accuracy"] >= base + 0.5 * (teacher - base), (base, teacher, rows[-1]["eval/accuracy"])


@pytest.mark.parametrize("objective", ["sampled", "full"])
def test_a_teacher_with_padded_embedding_rows_gives_the_same_kl(tmp_path, objective):
    """Checkpoints of one family often pad their embeddings to different row counts (Qwen2.5-1.5B 151,936 vs 7B
    152,064) with one tokenizer: the KL and the teacher statistics are over the tokenizer's ids, so a teacher padded
    with 28 extra rows (which would otherwise take probability mass) gives exactly what the unpadded one gives."""
    from transformers import AutoModelForCausalLM

    teacher = ROOT / "assets" / "tiny-teacher"
    padded_dir = tmp_path / "padded-teacher"
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    vocab = model.get_output_embeddings().weight.shape[0]
    model.resize_token_embeddings(vocab + 28, mean_resizing=False)
    with torch.no_grad():  # padding rows with large logits: if they were counted, every KL would change a lot
        model.get_output_embeddings().weight[vocab:] = model.get_output_embeddings().weight[:28] * 3
    model.save_pretrained(padded_dir)
    load_tokenizer(str(teacher)).save_pretrained(padded_dir)
    plain = _opd(tmp_path, objective + "_plain", "--teacher", teacher, "--objective", objective, "--max-steps", "1")
    padded = _opd(
        tmp_path, objective + "_padded", "--teacher", padded_dir, "--objective", objective, "--max-steps", "1"
    )
    for key in ("train/reverse_kl", "train/teacher_logp", "train/overlap_top1", "train/overlap_top5", "train/loss"):
        assert padded[-1][key] == pytest.approx(plain[-1][key], rel=1e-4, abs=1e-6), key
