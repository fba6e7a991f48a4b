"""The realistic-model tier: every script, two steps, in mixed precision (`--dtype bfloat16`: fp32 master weights,
bf16 compute) on a small random Qwen3-architecture model with a byte-level BPE tokenizer and Qwen3's published chat
template (`<think>` handling, history rewriting) and generation defaults, on data with reasoning in assistant turns.

What the toy world cannot show: the assistant-only masks under a template that rewrites history, a checkpoint stored
in bf16 with embedding rows padded past the tokenizer, tied embeddings under FSDP2 mixed precision, sampling
defaults that must not leak into rollouts, and checkpoints that reload in their own dtype.
"""

import json
import math

import pytest
import torch
from conftest import realistic_records, run_script
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from common.data import IGNORE_INDEX, render_prompt, tokenize_conversation
from common.model import load_tokenizer


def loss_spans(tokenizer, messages) -> list[str]:
    """The decoded runs of tokens that carry a loss."""
    ids, labels = tokenize_conversation(tokenizer, messages)
    spans, run = [], []
    for tok, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            run.append(tok)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    return spans + ([tokenizer.decode(run)] if run else [])


def test_assistant_masks_on_the_qwen3_template_by_hand(qwen3_dir):
    tok = load_tokenizer(str(qwen3_dir))
    one = [
        {"role": "system", "content": "You add numbers."},
        {"role": "user", "content": "What is 34+36?"},
        {"role": "assistant", "content": "<think>\n34+36: units 4+6, tens 3+3.\n</think>\n\n70"},
    ]
    assert loss_spans(tok, one) == ["<think>\n34+36: units 4+6, tens 3+3.\n</think>\n\n70<|im_end|>"]
    two = [
        {"role": "user", "content": "What is 42+41?"},
        {"role": "assistant", "content": "<think>\n42+41: units 2+1, tens 4+4.\n</think>\n\n83"},
        {"role": "user", "content": "And 35+29?"},
        {"role": "assistant", "content": "<think>\n35+29: units 5+9, tens 3+2.\n</think>\n\n64"},
    ]
    text = tok.apply_chat_template(two, tokenize=False)
    # the template drops the first turn's reasoning from the history: only its answer is in the context
    assert "42+41: units" not in text and "<|im_start|>assistant\n83<|im_end|>" in text
    assert loss_spans(tok, two) == ["83<|im_end|>", "<think>\n35+29: units 5+9, tens 3+2.\n</think>\n\n64<|im_end|>"]
    # no reasoning in the last turn: Qwen3 renders an empty think block there, and it is the model's to produce
    plain = [{"role": "user", "content": "What is 1+2?"}, {"role": "assistant", "content": "3"}]
    assert loss_spans(tok, plain) == ["<think>\n\n</think>\n\n3<|im_end|>"]
    # --chat-template-kwargs reaches the prompts: Qwen3's thinking switch
    assert render_prompt(tok, "hi").endswith("<|im_start|>assistant\n")
    no_think = load_tokenizer(str(qwen3_dir), '{"enable_thinking": false}')
    assert render_prompt(no_think, "hi").endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("realistic-data")
    for name, records in realistic_records(32).items():
        (path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


SMALL = ["--max-steps", "2", "--dtype", "bfloat16", "--eval-every", "0", "--eval-batch-size", "8"]
SCRIPTS = {
    "sft": [
        "--dataset",
        "sft",
        "--eval-dataset",
        "sft",
        "--eval-prompts",
        "prompts",
        "--batch-size",
        "4",
        "--micro-batch-size",
        "2",
        "--max-length",
        "128",
        "--eval-max-new-tokens",
        "8",
    ],
    "lora": [
        "--dataset",
        "sft",
        "--eval-dataset",
        "",
        "--eval-prompts",
        "prompts",
        "--batch-size",
        "4",
        "--micro-batch-size",
        "2",
        "--max-length",
        "128",
        "--eval-max-new-tokens",
        "8",
        "--merge",
    ],
    "dpo": [
        "--dataset",
        "prefs",
        "--eval-dataset",
        "prefs",
        "--eval-prompts",
        "prompts",
        "--batch-size",
        "4",
        "--micro-batch-size",
        "2",
        "--max-length",
        "128",
        "--eval-max-new-tokens",
        "8",
    ],
    "reward_model": [
        "--dataset",
        "prefs",
        "--eval-dataset",
        "prefs",
        "--batch-size",
        "4",
        "--micro-batch-size",
        "2",
        "--max-length",
        "128",
    ],
    "grpo": [
        "--dataset",
        "prompts",
        "--eval-prompts",
        "prompts",
        "--prompts-per-step",
        "2",
        "--group-size",
        "2",
        "--max-new-tokens",
        "12",
        "--micro-batch-size",
        "2",
        "--kl-every",
        "1",
        "--reward-fn",
        "tests.cli_rewards:length",  # spread on a random model's completions, so updates are not skipped
    ],
    "ppo": [
        "--dataset",
        "prompts",
        "--eval-prompts",
        "prompts",
        "--prompts-per-step",
        "4",
        "--reward-fn",
        "tiny_world",
        "--max-new-tokens",
        "12",
        "--micro-batch-size",
        "2",
        "--ppo-epochs",
        "1",
    ],
    "opd": [
        "--dataset",
        "prompts",
        "--eval-prompts",
        "prompts",
        "--prompts-per-step",
        "2",
        "--group-size",
        "2",
        "--max-new-tokens",
        "12",
        "--micro-batch-size",
        "2",
        "--objective",
        "full",
        "--teacher",
        "MODEL",
    ],
}
LOSS = {"reward_model": "train/loss", "ppo": "train/pg_loss"}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_every_script_two_mixed_precision_steps_on_a_qwen3_like_model(tmp_path, qwen3_dir, data, script):
    args = [
        str(qwen3_dir) if a == "MODEL" else str(data / f"{a}.jsonl") if a in ("sft", "prefs", "prompts") else a
        for a in SCRIPTS[script]
    ]
    small = SMALL[:-2] if script == "reward_model" else SMALL  # it evaluates no generation
    run_script(f"{script}.py", "--model", qwen3_dir, *small, *args, "--output-dir", tmp_path, "--run-name", "run")
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    trained = [r for r in rows if LOSS.get(script, "train/loss") in r]
    assert len(trained) == 2
    assert all(
        math.isfinite(r[LOSS.get(script, "train/loss")]) and math.isfinite(r["train/grad_norm"]) for r in trained
    )
    if script == "lora":
        final = run / "merged"
        assert (run / "final" / "adapter_model.safetensors").is_file()
    else:
        final = run / "final"
    # the checkpoint is stored in the dtype it came in (bf16) and reloads with plain transformers
    assert {t.dtype for t in load_file(final / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    cls = AutoModelForSequenceClassification if script == "reward_model" else AutoModelForCausalLM
    model = cls.from_pretrained(final)
    out = model(torch.tensor([[5, 9, 17, 23]]))
    assert torch.isfinite(out.logits).all()
    if script == "sft":
        assert "eval/loss" in rows[-1] and "eval/accuracy" in rows[-1]
    if script == "grpo":
        assert "train/kl" in rows[-1]  # the KL probe ran


def test_padded_head_rows_are_neither_sampled_nor_in_the_log_probs(qwen3_dir):
    """The checkpoint's head has 16 rows past the tokenizer's ids. Made to dominate every softmax, they must still
    never be sampled, and the training log-probs must be over the same support as the sampler."""
    from common.generation import generate
    from common.logprobs import completion_logprobs
    from common.model import load_model

    tok = load_tokenizer(str(qwen3_dir))
    model = load_model(str(qwen3_dir), dtype="float32", device="cpu").eval()
    vocab, rows = len(tok), model.get_output_embeddings().weight.shape[0]
    assert rows > vocab
    with torch.no_grad():
        model.get_output_embeddings().weight[vocab:] = 20 * model.get_output_embeddings().weight[: rows - vocab]
    out = generate(model, tok, ["What is 1+2?", "And 3+4?"], n=4, max_new_tokens=8, temperature=1.0, seed=0)
    assert int(out["completion_ids"].max()) < vocab
    parts = [out[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")]
    got = completion_logprobs(model, *parts, 0.7, vocab=vocab)
    ids = torch.cat(parts[::2], 1)
    mask = torch.cat(parts[1::2], 1)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, :-1, :vocab]
    naive = torch.log_softmax(logits.float() / 0.7, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    P = parts[0].shape[1]
    valid = parts[3].bool()
    torch.testing.assert_close(got[valid], naive[:, P - 1 :][valid], rtol=1e-5, atol=1e-5)
