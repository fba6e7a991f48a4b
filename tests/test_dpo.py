import json
import math

import pytest
import torch
from conftest import ROOT, TINY_BASE, run_script

from common.data import IGNORE_INDEX, load_preference_dataset, pair_micro_batches
from common.model import load_model
from dpo import dpo_loss, sequence_logps


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_dpo_sigmoid_loss_closed_form(label_smoothing):
    # policy: chosen -1, rejected -3; reference: -2 and -2.5; beta 0.5
    # h = (-1 - -2) - (-3 - -2.5) = 1 + 0.5 = 1.5
    beta, h = 0.5, 1.5
    expected = -(1 - label_smoothing) * _log_sigmoid(beta * h) - label_smoothing * _log_sigmoid(-beta * h)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        torch.tensor([-1.0]),
        torch.tensor([-3.0]),
        torch.tensor([-2.0]),
        torch.tensor([-2.5]),
        beta,
        "sigmoid",
        label_smoothing,
    )
    assert losses.item() == pytest.approx(expected, abs=1e-6)
    assert chosen_rewards.item() == pytest.approx(0.5 * 1.0)
    assert rejected_rewards.item() == pytest.approx(0.5 * -0.5)


def test_dpo_sigmoid_by_hand_number():
    # beta 1, h = 2: -log sigmoid(2) = log(1 + e^-2) = 0.126928
    losses, _, _ = dpo_loss(torch.tensor([0.0]), torch.tensor([-2.0]), torch.tensor([0.0]), torch.tensor([0.0]), 1.0)
    assert losses.item() == pytest.approx(0.126928, abs=1e-6)


def test_ipo_loss_closed_form():
    # IPO eq. 17: (h - 1/(2 tau))^2; tau 0.25 -> target margin 2; h = 3 -> loss 1; h = 0 -> 4
    losses, _, _ = dpo_loss(
        torch.tensor([1.0, 0.0]), torch.tensor([-2.0, 0.0]), torch.zeros(2), torch.zeros(2), 0.25, "ipo"
    )
    assert losses.tolist() == pytest.approx([1.0, 4.0])


# The loss family on one pair written out by hand: policy log-probs chosen -1, rejected -3; reference -2 and -2.5,
# so r_w = 1, r_l = -0.5, h = 1.5 (reference-free losses read the policy's numbers as length-averaged log-probs).
R_W, R_L, H = 1.0, -0.5, 1.5


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize(
    "loss_type, beta, eps, expected",
    [
        # rDPO (Chowdhury et al. 2024, eq. 7): [(1 - e) l(bh) - e l(-bh)] / (1 - 2e), l(z) = -log sigmoid(z)
        ("robust", 0.5, 0.2, ((1 - 0.2) * -_log_sigmoid(0.75) - 0.2 * -_log_sigmoid(-0.75)) / (1 - 0.4)),
        ("hinge", 0.5, 0.0, 1 - 0.5 * 1.5),  # SLiC: max(0, 1 - beta h) = 0.25
        ("hinge", 2.0, 0.0, 0.0),  # beta h = 3 > 1: no loss
        # APO-zero: (1 - sigmoid(beta r_w)) + sigmoid(beta r_l)
        ("apo-zero", 0.5, 0.0, (1 - _sigmoid(0.5)) + _sigmoid(-0.25)),
        # SPPO-hard: (r_w - 1/(2 beta))^2 + (r_l + 1/(2 beta))^2, beta 0.5: (1 - 1)^2 + (-0.5 + 1)^2
        ("sppo-hard", 0.5, 0.0, 0.25),
    ],
)
def test_reference_based_losses_by_hand(loss_type, beta, eps, expected):
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5]), beta, loss_type, eps
    )
    assert losses.item() == pytest.approx(expected, abs=1e-6)
    assert (chosen_rewards.item(), rejected_rewards.item()) == pytest.approx((beta * R_W, beta * R_L))


def test_robust_dpo_is_unbiased_under_label_noise():
    """rDPO's defining property: with labels flipped with probability eps, its expected loss is the clean DPO loss."""
    eps, beta = 0.2, 0.5
    args = (torch.tensor([-2.0]), torch.tensor([-2.5]), beta, "robust", eps)
    right = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), *args)[0]  # the pair as labelled
    flipped = dpo_loss(
        torch.tensor([-3.0]), torch.tensor([-1.0]), torch.tensor([-2.5]), torch.tensor([-2.0]), *args[2:]
    )[0]
    clean = -_log_sigmoid(beta * H)
    assert ((1 - eps) * right + eps * flipped).item() == pytest.approx(clean, abs=1e-6)


def test_simpo_by_hand():
    # SimPO eq. 6: -log sigmoid(beta (a_w - a_l) - gamma); a_w -1, a_l -3, beta 2, gamma 1: -log sigmoid(3)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), None, None, 2.0, "simpo", simpo_gamma=1.0
    )
    assert losses.item() == pytest.approx(-_log_sigmoid(3.0), abs=1e-6)
    assert (chosen_rewards.item(), rejected_rewards.item()) == pytest.approx((-2.0, -6.0))  # beta * a


def test_orpo_by_hand():
    # ORPO eq. 6-7: odds(y) = p / (1 - p), p = exp(a); L_OR = -log sigmoid(log(odds_w / odds_l)), times lambda = beta
    a_w, a_l, lam = -0.5, -1.5, 0.1
    p_w, p_l = math.exp(a_w), math.exp(a_l)
    log_odds_ratio = math.log((p_w / (1 - p_w)) / (p_l / (1 - p_l)))
    losses, _, _ = dpo_loss(torch.tensor([a_w]), torch.tensor([a_l]), None, None, lam, "orpo")
    assert losses.item() == pytest.approx(-lam * _log_sigmoid(log_odds_ratio), abs=1e-6)
    # a response of probability 1 gives a finite loss and gradient
    x = torch.tensor([0.0], requires_grad=True)
    loss = dpo_loss(x, torch.tensor([-1.0]), None, None, lam, "orpo")[0]
    loss.backward()
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()


def _pairs_file(path, n=6):
    rows = [
        {"prompt": f"What is {10 + i}+{20 + i}?", "chosen": str(30 + 2 * i), "rejected": str(31 + 2 * i)}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_loss_is_ln2_and_rewards_zero_at_initialization(random_model_dir, chat_tokenizer, tmp_path):
    pairs = load_preference_dataset(_pairs_file(tmp_path / "p.jsonl"), chat_tokenizer, 256)
    policy = load_model(str(random_model_dir), dtype="float32", device="cpu")
    ref = load_model(str(random_model_dir), dtype="float32", device="cpu")
    (mb,) = pair_micro_batches(pairs, list(range(len(pairs))), 8, chat_tokenizer.pad_token_id)
    logps = sequence_logps(policy, mb, average=False)[0]
    with torch.no_grad():
        ref_logps = sequence_logps(ref, mb, average=False)[0]
    b = len(pairs)
    losses, chosen_rewards, rejected_rewards = dpo_loss(logps[:b], logps[b:], ref_logps[:b], ref_logps[b:], 0.1)
    assert losses.detach().numpy() == pytest.approx([math.log(2)] * b, abs=1e-6)
    assert chosen_rewards.abs().max() < 1e-6 and rejected_rewards.abs().max() < 1e-6
    losses.mean().backward()  # the gradient at init is not zero: DPO moves the policy from the first step
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())


def test_sequence_logps_sum_and_mean_match_a_naive_forward(random_model_dir, chat_tokenizer, tmp_path):
    pairs = load_preference_dataset(_pairs_file(tmp_path / "p.jsonl"), chat_tokenizer, 256)
    model = load_model(str(random_model_dir), dtype="float32", device="cpu")
    (mb,) = pair_micro_batches(pairs, [0, 3], 8, chat_tokenizer.pad_token_id)
    with torch.no_grad():
        summed = sequence_logps(model, mb, average=False)[0]
        mean = sequence_logps(model, mb, average=True)[0]
    # naive: each sequence alone (no padding), log_softmax of the full logits, summed over the response's labels
    side_of_row = [("chosen", 0), ("chosen", 3), ("rejected", 0), ("rejected", 3)]
    for row, (side, i) in enumerate(side_of_row):
        ids = torch.tensor([pairs[i][f"{side}_ids"]])
        labels = torch.tensor(pairs[i][f"{side}_labels"])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1], -1)
        keep = labels[1:] != IGNORE_INDEX
        token_logps = logp[torch.arange(len(keep)), ids[0, 1:]][keep]
        assert summed[row].item() == pytest.approx(token_logps.sum().item(), abs=1e-5)
        assert mean[row].item() == pytest.approx(token_logps.mean().item(), abs=1e-5)


def test_preference_labels_cover_only_the_final_response(chat_tokenizer, tmp_path):
    path = tmp_path / "multi.jsonl"
    prompt = [
        {"role": "user", "content": "What is 1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "And 2+2?"},
    ]
    path.write_text(json.dumps({"prompt": prompt, "chosen": [{"role": "assistant", "content": "4"}], "rejected": "5"}))
    (pair,) = load_preference_dataset(path, chat_tokenizer, 256)
    for side, answer in (("chosen", "4"), ("rejected", "5")):
        trained = [t for t, y in zip(pair[f"{side}_ids"], pair[f"{side}_labels"]) if y != IGNORE_INDEX]
        assert chat_tokenizer.decode(trained) == answer + "<|im_end|>"  # not the earlier assistant turn "2"
    # both sides share the prompt tokens up to the response
    start = [
        next(k for k, y in enumerate(pair[f"{side}_labels"]) if y != IGNORE_INDEX) for side in ("chosen", "rejected")
    ]
    assert start[0] == start[1] and pair["chosen_ids"][: start[0]] == pair["rejected_ids"][: start[0]]


def test_pair_micro_batches_layout(chat_tokenizer, tmp_path):
    pairs = load_preference_dataset(_pairs_file(tmp_path / "p.jsonl"), chat_tokenizer, 256)
    batches = pair_micro_batches(pairs, [4, 1, 2], 2, chat_tokenizer.pad_token_id)
    assert [len(b["index"]) for b in batches] == [2, 1]
    seen = []
    for b in batches:
        n = len(b["index"])
        assert b["input_ids"].shape[0] == 2 * n
        for row, i in enumerate(b["index"].tolist()):
            for side, offset in (("chosen", 0), ("rejected", n)):
                ids = pairs[i][f"{side}_ids"]
                assert b["input_ids"][row + offset, : len(ids)].tolist() == ids
        seen += b["index"].tolist()
    assert sorted(seen) == [1, 2, 4]


def test_bad_preference_data(tmp_path):
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    proc = run_script(ROOT / "dpo.py", "--dataset", missing, "--output-dir", tmp_path, check=False)
    assert proc.returncode != 0
    assert f"{missing}:2: missing field 'rejected'" in proc.stderr.strip().splitlines()[-1]

    same = tmp_path / "same.jsonl"
    rows = [{"prompt": "What is 1+2?", "chosen": "3", "rejected": "4"}] * 3 + [
        {"prompt": "What is 1+2?", "chosen": "3", "rejected": "3"}
    ] * 2
    same.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_script(
        ROOT / "dpo.py",
        "--dataset",
        same,
        "--eval-dataset",
        "",
        "--eval-prompts",
        "",
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--micro-batch-size",
        "2",
        "--output-dir",
        tmp_path,
    )
    assert f"warning: {same}: dropped 2 of 5 pairs whose chosen and rejected are identical" in proc.stdout


def _dpo_run(tmp_path, model_dir, name, *extra):
    data = _pairs_file(tmp_path / "train.jsonl", n=8)
    run_script(
        ROOT / "dpo.py",
        "--model",
        model_dir,
        "--dataset",
        data,
        "--eval-dataset",
        data,
        "--eval-prompts",
        "",
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "--micro-batch-size",
        "4",
        "--learning-rate",
        "1e-2",
        "--warmup-steps",
        "0",
        "--output-dir",
        tmp_path,
        "--run-name",
        name,
        *extra,
    )
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]
    weights = load_model(str(tmp_path / name / "final"), dtype="float32", device="cpu").state_dict()
    return rows, weights


def test_cli_precompute_ref_and_micro_batches_give_the_same_run(tmp_path, random_model_dir):
    live, w_live = _dpo_run(tmp_path, random_model_dir, "live")
    pre, w_pre = _dpo_run(tmp_path, random_model_dir, "pre", "--precompute-ref")
    micro, w_micro = _dpo_run(tmp_path, random_model_dir, "micro", "--micro-batch-size", "1")
    train = [r for r in live if "train/loss" in r]
    assert len(train) == 3 and train[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert train[-1]["train/rewards_margin"] > 0  # lr 1e-2 on 4 pairs: the margin opens
    for other, w_other in ((pre, w_pre), (micro, w_micro)):
        for a, b in zip(live, other):
            for k in ("train/loss", "train/rewards_margin", "eval/loss", "eval/rewards_accuracy"):
                if k in a:
                    assert b[k] == pytest.approx(a[k], abs=1e-5), k
        # 3 AdamW steps of lr 1e-2 move weights by ~3e-2; float reassociation differences stay 300x below that
        assert max((w_live[k] - w_other[k]).abs().max().item() for k in w_live) < 1e-4


def test_cli_rpo_is_normalized_per_step_and_changes_the_update(tmp_path, random_model_dir):
    _, plain = _dpo_run(tmp_path, random_model_dir, "plain")
    rows, rpo = _dpo_run(tmp_path, random_model_dir, "rpo", "--rpo-alpha", "1.0")
    _, rpo_micro = _dpo_run(tmp_path, random_model_dir, "rpo_micro", "--rpo-alpha", "1.0", "--micro-batch-size", "1")
    assert all("train/nll_chosen" in r for r in rows if "train/loss" in r)
    assert max((rpo[k] - rpo_micro[k]).abs().max().item() for k in rpo) < 1e-4
    assert max((rpo[k] - plain[k]).abs().max().item() for k in rpo) > 1e-4


def _naive_first_step(model_dir, pairs, beta, loss_type, eps, rpo_alpha):
    """The step-1 objective written out plainly: each sequence alone, full log_softmax, the reference equal to the
    policy (h = 0 in value, not in gradient). Returns (DPO loss, chosen token-mean NLL, gradient norm)."""
    model = load_model(str(model_dir), dtype="float32", device="cpu")
    sides = {}
    for side in ("chosen", "rejected"):
        sums, counts = [], []
        for pair in pairs:
            ids = torch.tensor([pair[f"{side}_ids"]])
            keep = torch.tensor(pair[f"{side}_labels"])[1:] != IGNORE_INDEX
            logp = torch.log_softmax(model(ids).logits[0, :-1], -1)
            token_logps = logp[torch.arange(len(keep)), ids[0, 1:]][keep]
            sums.append(token_logps.sum())
            counts.append(len(token_logps))
        sides[side] = (torch.stack(sums), torch.tensor(counts, dtype=torch.float32))
    (chosen, n_chosen), (rejected, n_rejected) = sides["chosen"], sides["rejected"]
    if loss_type in ("ipo", "simpo", "orpo"):  # log-probs averaged over the response's tokens
        chosen_s, rejected_s = chosen / n_chosen, rejected / n_rejected
    else:
        chosen_s, rejected_s = chosen, rejected
    h = (chosen_s - chosen_s.detach()) - (rejected_s - rejected_s.detach())
    logsigmoid = torch.nn.functional.logsigmoid
    if loss_type == "simpo":  # no reference: -log sigmoid(beta (a_w - a_l) - gamma), gamma 0.5
        losses = -logsigmoid(beta * (chosen_s - rejected_s) - 0.5)
    elif loss_type == "orpo":  # no reference: -lambda log sigmoid(log odds_w - log odds_l), odds = p / (1 - p)
        p_w, p_l = chosen_s.exp(), rejected_s.exp()
        losses = -beta * logsigmoid(torch.log(p_w / (1 - p_w)) - torch.log(p_l / (1 - p_l)))
        rpo_alpha = 1.0  # and the chosen tokens' NLL, weight 1
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - eps) * torch.nn.functional.logsigmoid(beta * h) - eps * torch.nn.functional.logsigmoid(-beta * h)
    nll = -chosen.sum() / n_chosen.sum()
    total = losses.mean() + (rpo_alpha * nll if rpo_alpha else 0.0)
    grads = torch.autograd.grad(total, [p for p in model.parameters() if p.requires_grad])
    return losses.mean().item(), nll.item(), torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()


@pytest.mark.parametrize(
    "loss_type,eps,rpo_alpha",
    [("sigmoid", 0.0, None), ("sigmoid", 0.25, None), ("ipo", 0.0, None), ("sigmoid", 0.0, 0.5)],
    ids=["dpo", "label_smoothing", "ipo", "rpo"],
)
def test_cli_first_step_matches_the_objective_written_out(
    tmp_path, random_model_dir, chat_tokenizer, loss_type, eps, rpo_alpha
):
    """`dpo.py --loss-type/--label-smoothing/--rpo-alpha`: step 1's logged loss, NLL and (pre-clip) gradient norm
    equal the objective computed by hand on the same 8 pairs (the whole data set is the batch). At h = 0 the label
    smoothing scales the DPO gradient by exactly (1 - 2 eps), so a flag that is read but not applied fails here."""
    data = _pairs_file(tmp_path / "train.jsonl", n=8)
    extra = ["--loss-type", loss_type, "--label-smoothing", str(eps), "--beta", "0.1"]
    if rpo_alpha:
        extra += ["--rpo-alpha", str(rpo_alpha)]
    run_script(
        ROOT / "dpo.py", "--model", random_model_dir, "--dataset", data, "--eval-dataset", data, "--eval-prompts", "", "--max-steps", "1",
        "--batch-size", "8", "--micro-batch-size", "4", "--dtype", "float32", "--output-dir", tmp_path,
        "--run-name", "run", *extra,
    )  # fmt: skip
    step1 = [r for r in (json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()) if "train/loss" in r]
    loss, nll, grad_norm = _naive_first_step(
        random_model_dir, load_preference_dataset(data, chat_tokenizer, 1024), 0.1, loss_type, eps, rpo_alpha
    )
    assert step1[0]["train/loss"] == pytest.approx(loss, rel=1e-5)  # ln 2 (DPO), 25 = (1 / (2 * 0.1))^2 (IPO)
    assert step1[0]["train/loss"] == pytest.approx(25.0 if loss_type == "ipo" else math.log(2), rel=1e-5)
    assert step1[0]["train/grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
    if rpo_alpha:
        assert step1[0]["train/nll_chosen"] == pytest.approx(nll, rel=1e-5)


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_cli_reference_free_first_step_matches_the_objective_written_out(
    tmp_path, random_model_dir, chat_tokenizer, loss_type
):
    """SimPO and ORPO through the command line: no reference model is loaded (the banner says so) and step 1's
    loss, NLL and gradient norm equal the objective written out on the length-averaged log-probs."""
    data = _pairs_file(tmp_path / "train.jsonl", n=8)
    proc = run_script(
        ROOT / "dpo.py", "--model", random_model_dir, "--dataset", data, "--eval-dataset", data, "--eval-prompts", "",
        "--max-steps", "1", "--batch-size", "8", "--micro-batch-size", "4", "--dtype", "float32",
        "--output-dir", tmp_path, "--run-name", "run", "--loss-type", loss_type, "--beta", "2.0",
    )  # fmt: skip
    assert f"reference-free ({loss_type}): no reference model" in proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    step1 = next(r for r in rows if "train/loss" in r)
    assert not any("pair_kl_k2" in k for r in rows for k in r)  # no reference, no log-ratio drift
    loss, nll, grad_norm = _naive_first_step(
        random_model_dir, load_preference_dataset(data, chat_tokenizer, 1024), 2.0, loss_type, 0.0, None
    )
    assert step1["train/loss"] == pytest.approx(loss, rel=1e-5)
    assert step1["train/grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
    if loss_type == "orpo":
        assert step1["train/nll_chosen"] == pytest.approx(nll, rel=1e-5)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--loss-type", "simpo", "--precompute-ref"], "--precompute-ref: --loss-type simpo uses no reference model"),
        (["--loss-type", "orpo", "--rpo-alpha", "1"], "--rpo-alpha: --loss-type orpo has its own NLL term"),
        (["--loss-type", "robust"], "--loss-type robust needs --label-smoothing > 0"),
        (["--loss-type", "hinge", "--label-smoothing", "0.1"], "--label-smoothing applies to --loss-type sigmoid"),
    ],
)
def test_loss_family_flag_errors(flags, message):
    proc = run_script(ROOT / "dpo.py", *flags, check=False)
    assert proc.returncode != 0 and message in proc.stderr + proc.stdout


@pytest.mark.slow
def test_default_dpo_run_learns(tmp_path):
    """`python dpo.py` with no flags: held-out preference accuracy >= 90%, target accuracy +10 points."""
    base = json.loads((TINY_BASE / "build_eval.json").read_text())["eval/accuracy"]
    proc = run_script(ROOT / "dpo.py", "--output-dir", tmp_path, "--run-name", "dpo_default_learns")
    rows = [json.loads(line) for line in (tmp_path / "dpo_default_learns" / "metrics.jsonl").open()]
    final = rows[-1]
    assert final["eval/rewards_accuracy"] >= 0.9, proc.stdout[-2000:]
    assert final["eval/accuracy"] >= base + 0.10, (base, final["eval/accuracy"])
