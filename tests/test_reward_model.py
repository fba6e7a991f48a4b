import json
import math

import pytest
import torch
from conftest import ROOT, run_script
from transformers import AutoModelForSequenceClassification

from common.data import collate
from common.model import last_token_scores, load_model
from reward_model import pair_metrics, reward_loss


def test_bradley_terry_loss_by_hand():
    # r_w = 2, r_l = 0.5, margin 0.5: -log sigmoid(1) = log(1 + e^-1) = 0.313262; centring 0.01 * 2.5^2 = 0.0625
    chosen, rejected = torch.tensor([2.0]), torch.tensor([0.5])
    assert reward_loss(chosen, rejected, torch.tensor([0.5]), 0.0).item() == pytest.approx(0.313262, abs=1e-6)
    assert reward_loss(chosen, rejected, torch.tensor([0.5]), 0.01).item() == pytest.approx(0.375762, abs=1e-6)
    # no margin, equal scores: ln 2
    assert reward_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), 0.0).item() == pytest.approx(math.log(2))


def test_accuracy_and_margin():
    chosen, rejected = torch.tensor([1.0, 0.0, 3.0, -1.0]), torch.tensor([0.0, 0.5, 1.0, -1.0])
    m = pair_metrics("eval", reward_loss(chosen, rejected, torch.zeros(4), 0.0), chosen, rejected)
    assert m["eval/accuracy"] == pytest.approx(2 / 4)  # a tie is not a win
    assert m["eval/margin"] == pytest.approx((1 - 0.5 + 2 + 0) / 4)


def _reward_model(model_dir, pad_id):
    model = load_model(
        str(model_dir), dtype="float32", device="cpu", model_class=AutoModelForSequenceClassification, num_labels=1
    )
    model.config.pad_token_id = pad_id
    return model.eval()


def test_last_token_scores_ignore_padding_side(random_model_dir, chat_tokenizer):
    torch.manual_seed(0)
    model = _reward_model(random_model_dir, chat_tokenizer.pad_token_id)
    seqs = [chat_tokenizer("What is 12+34?")["input_ids"], chat_tokenizer("Reverse: abc")["input_ids"][:5]]
    right = collate([{"input_ids": s, "labels": s} for s in seqs], chat_tokenizer.pad_token_id)
    width = right["input_ids"].shape[1]
    left_ids = torch.full_like(right["input_ids"], chat_tokenizer.pad_token_id)
    left_mask = torch.zeros_like(right["attention_mask"])
    for i, s in enumerate(seqs):
        left_ids[i, width - len(s) :] = torch.tensor(s)
        left_mask[i, width - len(s) :] = 1
    with torch.no_grad():
        r_right = last_token_scores(model, right["input_ids"], right["attention_mask"])
        r_left = last_token_scores(model, left_ids, left_mask)
        alone = torch.stack([model(torch.tensor([s])).logits[0, 0] for s in seqs])  # no padding at all
        hf_right = model(right["input_ids"], attention_mask=right["attention_mask"]).logits[:, 0]
    assert torch.allclose(r_right, alone, atol=1e-5) and torch.allclose(r_left, alone, atol=1e-5)
    assert torch.allclose(hf_right, alone, atol=1e-5)  # transformers' own pooling agrees (pad id in the config)


def test_cli_end_to_end_and_checkpoint_loads(tmp_path, random_model_dir, chat_tokenizer):
    rows = [
        {"prompt": f"What is {10 + i}+{20 + i}?", "chosen": str(30 + 2 * i), "rejected": str(31 + 2 * i)}
        for i in range(8)
    ]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(name, *extra):
        return run_script(
            ROOT / "reward_model.py",
            "--model",
            random_model_dir,
            "--dataset",
            data,
            "--eval-dataset",
            data,
            "--max-steps",
            "4",
            "--batch-size",
            "4",
            "--micro-batch-size",
            "4",
            "--learning-rate",
            "1e-2",
            "--output-dir",
            tmp_path,
            "--run-name",
            name,
            *extra,
        )

    run("a")
    run("b", "--micro-batch-size", "1", "--center-rewards-coef", "0.0")
    metrics = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").open()]
    assert "eval/accuracy" in metrics[0] and metrics[1]["train/loss"] == pytest.approx(math.log(2), abs=0.05)
    assert metrics[-1]["train/loss"] < metrics[1]["train/loss"]
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "a" / "final").eval()
    other = AutoModelForSequenceClassification.from_pretrained(tmp_path / "b" / "final").eval()
    assert loaded.config.num_labels == 1 and loaded.config.pad_token_id == chat_tokenizer.pad_token_id
    for k, v in loaded.state_dict().items():  # micro-batch size does not change the update
        assert torch.allclose(v, other.state_dict()[k], atol=1e-5), k
    ids = [chat_tokenizer(r["prompt"])["input_ids"] for r in rows[:3]]
    batch = collate([{"input_ids": x, "labels": x} for x in ids], chat_tokenizer.pad_token_id)
    with torch.no_grad():
        ours = last_token_scores(loaded, batch["input_ids"], batch["attention_mask"])
        theirs = loaded(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.slow
def test_default_reward_model_run_learns(tmp_path):
    """`python reward_model.py` with no flags learns: held-out pair accuracy from 0.395 to >= 0.92. The default run
    ends at 0.952 (140 of 147) with AVX-512 kernels and at 0.932 (137 of 147) with AVX2 ones (docs/reward_model.md): the last few
    pairs of the held-out set flip with float rounding, so the bound leaves room for the CPU CI happens to get."""
    run_script(ROOT / "reward_model.py", "--output-dir", tmp_path, "--run-name", "rm_default_learns")
    rows = [json.loads(line) for line in (tmp_path / "rm_default_learns" / "metrics.jsonl").open()]
    assert rows[0]["eval/accuracy"] < 0.5 and rows[-1]["eval/accuracy"] >= 0.92
