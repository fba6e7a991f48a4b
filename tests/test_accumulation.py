"""Gradient accumulation normalized by the loss tokens of the whole step: (batch 8, micro 8|2|1) give the gradient of
one big batch, and that equals the gradient of transformers' own token-mean loss on the batch."""

import pytest
import torch

import sft
from common.data import collate, count_loss_tokens, micro_batches, step_indices
from common.logprobs import token_logprobs
from common.model import load_model


def step_gradient(model, examples, indices, micro, pad_id):
    model.zero_grad()
    batches = micro_batches(examples, indices, micro, pad_id)
    n = count_loss_tokens(batches)
    total = 0.0
    for mb in batches:
        loss, nll = sft.sft_loss(token_logprobs(model, mb["input_ids"], mb["attention_mask"]), mb["labels"], n)
        loss.backward()
        total += nll.item()
    return {k: p.grad.clone() for k, p in model.named_parameters()}, total / n


@pytest.fixture(scope="module")
def setup(random_model_dir):
    model = load_model(str(random_model_dir), dtype="float32", device="cpu")
    g = torch.Generator().manual_seed(0)
    examples = []
    for i in range(24):  # varied lengths and varied numbers of loss tokens per example
        n = int(torch.randint(6, 30, (1,), generator=g))
        ids = torch.randint(4, 99, (n,), generator=g).tolist()
        start = int(torch.randint(2, n - 2, (1,), generator=g))
        examples.append({"input_ids": ids, "labels": [-100] * start + ids[start:]})
    return model, examples


def test_accumulated_gradient_equals_full_batch(setup):
    model, examples = setup
    indices = step_indices(len(examples), 8, step=1, seed=0)
    ref_grads, ref_loss = step_gradient(model, examples, indices, 8, pad_id=0)
    # independent reference: transformers' token-mean cross-entropy over the whole batch in one forward
    batch = collate([examples[i] for i in indices], pad_token_id=0)
    model.zero_grad()
    hf_loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    hf_loss.backward()
    assert abs(hf_loss.item() - ref_loss) < 1e-5
    for k, p in model.named_parameters():
        torch.testing.assert_close(ref_grads[k], p.grad, rtol=1e-4, atol=1e-6)
    for micro in (2, 1):
        grads, loss = step_gradient(model, examples, indices, micro, pad_id=0)
        assert abs(loss - ref_loss) < 1e-5
        for k in grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-7, msg=f"micro {micro}: {k}")


def test_per_micro_batch_mean_would_differ(setup):
    """The check above can fail: averaging per-micro-batch means (the common bug) gives another gradient."""
    model, examples = setup
    indices = step_indices(len(examples), 8, step=1, seed=0)
    ref_grads, _ = step_gradient(model, examples, indices, 8, pad_id=0)
    model.zero_grad()
    for mb in micro_batches(examples, indices, 2, 0):
        n = count_loss_tokens([mb])
        (sft.sft_loss(token_logprobs(model, mb["input_ids"], mb["attention_mask"]), mb["labels"], n)[0] / 4).backward()
    diff = max((p.grad - ref_grads[k]).abs().max().item() for k, p in model.named_parameters())
    assert diff > 1e-4


def test_lr_schedule():
    assert sft.lr_lambda(0, 10, 100, "cosine") == pytest.approx(1 / 11)
    assert sft.lr_lambda(10, 10, 100, "cosine") == pytest.approx(1.0)
    assert sft.lr_lambda(55, 10, 100, "cosine") == pytest.approx(0.5)
    assert sft.lr_lambda(100, 10, 100, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert sft.lr_lambda(55, 10, 100, "linear") == pytest.approx(0.5)
    assert sft.lr_lambda(90, 10, 100, "constant") == 1.0
