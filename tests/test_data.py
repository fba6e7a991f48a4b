"""Tokenization and loss masks, batching, and the bad-input messages of common.data."""

import copy
import json

import pytest

from common.data import (
    IGNORE_INDEX,
    check_batch_sizes,
    load_sft_dataset,
    micro_batches,
    read_jsonl,
    step_indices,
    tokenize_conversation,
    tokenize_sft_record,
)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 47+38?"},
    {"role": "assistant", "content": "85"},
    {"role": "user", "content": "Reverse: abc"},
    {"role": "assistant", "content": "cba"},
]


def labeled_text(tokenizer, labels):
    """The loss-bearing tokens of each contiguous labeled run, decoded."""
    runs, current = [], []
    for x in labels:
        if x == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(x)
    if current:
        runs.append(current)
    return [tokenizer.decode(r) for r in runs]


def test_multi_turn_mask_covers_every_assistant_turn_and_nothing_else(chat_tokenizer):
    ids, labels = tokenize_conversation(chat_tokenizer, CONVERSATION)
    assert labeled_text(chat_tokenizer, labels) == ["85<|im_end|>", "cba<|im_end|>"]  # by hand
    assert [x for x in labels if x != IGNORE_INDEX] == [i for i, x in zip(ids, labels) if x != IGNORE_INDEX]
    # independent reference: the template's own {% generation %} markers
    ref = chat_tokenizer.apply_chat_template(
        CONVERSATION, tokenize=True, return_assistant_tokens_mask=True, return_dict=True
    )
    assert ids == ref["input_ids"]
    assert [int(x != IGNORE_INDEX) for x in labels] == ref["assistant_masks"]


def test_weight_zero_assistant_turns_are_context_not_loss(chat_tokenizer):
    """OpenAI's fine-tuning format: an assistant message with "weight": 0 is in the input but not in the loss."""
    conversation = [dict(m) for m in CONVERSATION]
    conversation[2]["weight"] = 0
    ids, labels = tokenize_conversation(chat_tokenizer, conversation)
    assert labeled_text(chat_tokenizer, labels) == ["cba<|im_end|>"]
    assert ids == tokenize_conversation(chat_tokenizer, CONVERSATION)[0]  # the same tokens, one turn fewer trained
    for bad in ({"role": "assistant", "content": "x", "weight": 0.5}, {"role": "user", "content": "x", "weight": 0}):
        with pytest.raises(SystemExit, match=r"f.jsonl:3: field 'messages\[1\]\.weight' must be 0 or 1"):
            tokenize_sft_record(chat_tokenizer, {"messages": [CONVERSATION[1], bad, CONVERSATION[2]], "_line": 3},
                                "f.jsonl")  # fmt: skip


QWEN3_LIKE = (  # renders an empty <think> block only on assistant turns after the last user message
    "{%- set ns = namespace(last=0) %}{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last = loop.index0 %}"
    "{%- endif %}{%- endfor %}{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' }}"
    "{%- if m.role == 'assistant' and loop.index0 > ns.last %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{{- m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_template_that_rewrites_history_falls_back_to_content_spans(chat_tokenizer):
    tok = copy.deepcopy(chat_tokenizer)
    tok.chat_template = QWEN3_LIKE
    conversation = CONVERSATION[1:]
    text = tok.apply_chat_template(conversation, tokenize=False)
    assert text.count("<think>") == 1  # history turns lose the block: not prefix-stable
    _, labels = tokenize_conversation(tok, conversation)
    assert labeled_text(tok, labels) == ["85<|im_end|>", "cba<|im_end|>"]


def test_record_shapes(chat_tokenizer):
    _, labels = tokenize_sft_record(chat_tokenizer, {"prompt": "What is 1+2?", "completion": "3"}, "f.jsonl")
    assert labeled_text(chat_tokenizer, labels) == ["3<|im_end|>"]
    ids, labels = tokenize_sft_record(chat_tokenizer, {"text": "hello"}, "f.jsonl")
    assert labels == ids and chat_tokenizer.decode(ids) == "hello<|im_end|>"


def test_truncation_and_dropping_are_counted(chat_tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [
        {"prompt": "What is 1+2?", "completion": "3"},  # 40 tokens, fits
        {"prompt": "x" * 50, "completion": "long answer"},  # prompt alone exceeds 40: no loss tokens, dropped
        {"prompt": "hi", "completion": "y" * 60},
    ]  # truncated, keeps some loss tokens
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = []
    examples = load_sft_dataset(path, chat_tokenizer, max_length=40, log=lines.append)
    assert len(examples) == 2 and all(len(e["input_ids"]) <= 40 for e in examples)
    assert any("truncated 2 of 3" in line for line in lines)
    assert any("dropped 1 of 3" in line for line in lines)


def test_step_data_depends_only_on_seed_and_batch_size(chat_tokenizer):
    examples = [{"input_ids": [1] * (i % 7 + 2), "labels": [1] * (i % 7 + 2)} for i in range(50)]
    for step in range(12):  # crosses epoch boundaries (6 whole batches of 8 per epoch)
        idx = step_indices(50, 8, step, seed=3)
        assert len(idx) == 8 and len(set(idx)) == 8
        for micro in (8, 2, 1):
            mbs = micro_batches(examples, idx, micro, pad_token_id=0)
            assert len(mbs) == 8 // micro
            lengths = sorted(int(m) for b in mbs for m in b["attention_mask"].sum(1))
            assert lengths == sorted(len(examples[i]["input_ids"]) for i in idx)
    epoch0 = [i for s in range(6) for i in step_indices(50, 8, s, seed=3)]
    assert len(set(epoch0)) == 48  # an epoch visits distinct examples
    assert step_indices(50, 8, 0, seed=3) != step_indices(50, 8, 0, seed=4)


def test_batch_size_must_divide():
    assert check_batch_sizes(8, 2) == 4 and check_batch_sizes(16, 64) == 1  # a larger micro-batch: one piece
    with pytest.raises(SystemExit, match=r"--batch-size 8 is not divisible by --micro-batch-size 3"):
        check_batch_sizes(8, 3)
    # under torchrun the error names the flag as typed, not this process's share of it
    with pytest.raises(
        SystemExit, match=r"--batch-size 64 \(32 per process\) is not divisible by --micro-batch-size 24"
    ):
        check_batch_sizes(32, 24, 64)
    with pytest.raises(SystemExit, match=r"--batch-size 0 and --micro-batch-size 4 must be positive"):
        check_batch_sizes(0, 4)


@pytest.mark.parametrize(
    "content,pattern",
    [
        ('{"messages": []}\n{"prompt": "a", "completion": "b"\n', r"bad\.jsonl:2: malformed JSON"),
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', r"bad\.jsonl:2: missing field 'completion'"),
        ('{"foo": 1}\n', r"bad\.jsonl:1: missing field: expected 'messages', 'prompt' \+ 'completion', or 'text'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', r"bad\.jsonl:1: field 'messages' has no assistant"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}\n', r"bad\.jsonl:1: field 'messages\[0\]\.role'"),
        ("[1, 2]\n", r"bad\.jsonl:1: expected a JSON object"),
        ("\n\n", r"bad\.jsonl: empty file"),
    ],
)
def test_bad_data_names_file_line_and_field(chat_tokenizer, tmp_path, content, pattern):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(SystemExit, match=pattern):
        load_sft_dataset(path, chat_tokenizer, max_length=64)


def test_missing_file(tmp_path):
    with pytest.raises(SystemExit, match=r"nope\.jsonl: no such file"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_pack_best_fit_by_hand():
    from common.data import pack_best_fit

    # longest first: 5 -> new bin A (room 2); 4 -> new bin B (3); 3 -> B, the least room that fits (0); 3 -> new C
    # (4); 2 -> A (0); 1 -> C (3)
    assert pack_best_fit([5, 4, 3, 3, 2, 1], 7) == [[0, 4], [1, 2], [3, 5]]
    assert pack_best_fit([7, 7], 7) == [[0], [1]]
    bins = pack_best_fit(list(range(1, 40)), 50)
    assert sorted(i for b in bins for i in b) == list(range(39))
    assert all(sum(range(1, 40)[i] for i in b) <= 50 for b in bins) and len(bins) == 16  # 780 tokens: 16 bins


def _sft_examples(n=7, seed=0):
    import random

    from common.data import IGNORE_INDEX

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(3, 20)
        ids = [rng.randint(3, 60) for _ in range(length)]
        prompt = rng.randint(1, length - 1)
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def test_packed_rows_give_the_unpacked_loss_gradient_and_no_cross_attention(random_model_dir):
    """The same examples packed into rows (position ids restarting, no attention across examples) and unpacked:
    the same loss-token count, summed NLL and gradient of every parameter; perturbing one example's tokens leaves
    every other example's log-probs in the packed row unchanged."""
    import torch

    from common.data import IGNORE_INDEX, count_loss_tokens, micro_batches, packed_micro_batches
    from common.logprobs import token_logprobs
    from common.model import load_model

    model = load_model(str(random_model_dir), dtype="float32", device="cpu")
    examples = _sft_examples()

    def nll_and_grads(batches):
        model.zero_grad()
        total = 0.0
        for mb in batches:
            mask = mb["labels"][:, 1:] != IGNORE_INDEX
            logps = token_logprobs(
                model, mb["input_ids"], mb["attention_mask"], target_mask=mask, position_ids=mb.get("position_ids")
            )
            nll = -(logps * mask).sum()
            nll.backward()
            total += nll.item()
        return total, [p.grad.clone() for p in model.parameters()]

    unpacked = micro_batches(examples, list(range(7)), 2, 0)
    packed = packed_micro_batches(examples, list(range(7)), 2, 40, 0)
    assert len(packed) < len(unpacked) and all(mb["input_ids"].shape[1] <= 40 for mb in packed)
    assert count_loss_tokens(packed) == count_loss_tokens(unpacked)
    nll_a, grads_a = nll_and_grads(unpacked)
    nll_b, grads_b = nll_and_grads(packed)
    assert nll_b == pytest.approx(nll_a, rel=1e-5)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    # no attention across examples: change the tokens of one example of a row, the others' log-probs stay
    mb, r = next(  # a row holding at least two examples
        (mb, r)
        for mb in packed
        for r in range(mb["input_ids"].shape[0])
        if ((mb["position_ids"][r, 1:] == 0) & (mb["attention_mask"][r, 1:] == 1)).any()
    )
    second = int(((mb["position_ids"][r, 1:] == 0) & (mb["attention_mask"][r, 1:] == 1)).nonzero()[0]) + 1
    changed = mb["input_ids"].clone()
    changed[r, :second] = (changed[r, :second] + 7) % 60 + 3  # the row's first example
    with torch.no_grad():
        before = token_logprobs(model, mb["input_ids"], mb["attention_mask"], position_ids=mb["position_ids"])[r]
        after = token_logprobs(model, changed, mb["attention_mask"], position_ids=mb["position_ids"])[r]
    # positions from `second` on predict the later examples' tokens (and padding) from within those examples
    torch.testing.assert_close(after[second:], before[second:], rtol=0, atol=1e-6)
    assert (after[: second - 1] - before[: second - 1]).abs().max() > 1e-3  # the edit mattered
