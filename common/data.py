"""JSON Lines data, chat-template tokenization with assistant-only loss masks, and batching for gradient accumulation.

Record shapes (one JSON object a line):
  SFT:      {"messages": [{"role", "content"}, ...]} | {"prompt", "completion"} | {"text"}
  preferences: {"prompt", "chosen", "rejected"}   (DPO, reward model; strings or message lists)
  prompts:  {"prompt", "answer", ...}   (RL and evaluation; `answer` goes to the verifier / reward function)
Errors name the file, the line and the field, and stop the run before any compute (`common.die`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from common import die

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")


def read_jsonl(path: str | Path) -> list[dict]:
    """Every line a JSON object; blank lines are skipped. Each record gets `_line` (1-based) for later messages."""
    path = Path(path)
    if not path.is_file():
        die(f"{path}: no such file")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                die(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})")
            if not isinstance(obj, dict):
                die(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            obj["_line"] = lineno
            records.append(obj)
    if not records:
        die(f"{path}: empty file (no records)")
    return records


def _where(path, record) -> str:
    return f"{path}:{record.get('_line', '?')}"


def _check_messages(messages, path, record, field) -> None:
    if not isinstance(messages, list) or not messages:
        die(f"{_where(path, record)}: field '{field}' must be a non-empty list of {{role, content}} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            die(f"{_where(path, record)}: field '{field}[{i}]' must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            die(f"{_where(path, record)}: field '{field}[{i}].role' is {m['role']!r}, not one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            die(f"{_where(path, record)}: field '{field}[{i}].content' must be a string")


def to_messages(record: dict, path) -> list[dict] | None:
    """An SFT record as a conversation (None for plain `text`). Validates the fields as it goes."""
    if "messages" in record:
        _check_messages(record["messages"], path, record, "messages")
        if not any(m["role"] == "assistant" for m in record["messages"]):
            die(f"{_where(path, record)}: field 'messages' has no assistant message to train on")
        return record["messages"]
    if "prompt" in record or "completion" in record:
        for field in ("prompt", "completion"):
            if field not in record:
                die(f"{_where(path, record)}: missing field '{field}'")
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        _check_messages(prompt, path, record, "prompt")
        _check_messages(completion, path, record, "completion")
        return prompt + completion
    if "text" in record:
        if not isinstance(record["text"], str):
            die(f"{_where(path, record)}: field 'text' must be a string")
        return None
    die(f"{_where(path, record)}: missing field: expected 'messages', 'prompt' + 'completion', or 'text'")


def require_fields(records: list[dict], path, fields: tuple[str, ...]) -> None:
    for r in records:
        for field in fields:
            if field not in r:
                die(f"{_where(path, r)}: missing field '{field}'")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def apply_template(tokenizer, messages: list[dict], **kwargs) -> str:
    """The chat template rendered as text, with the run's `--chat-template-kwargs` (see `load_tokenizer`)."""
    extra = getattr(tokenizer, "cleanpost_template_kwargs", None) or {}
    return tokenizer.apply_chat_template(messages, tokenize=False, **extra, **kwargs)


def render_prompt(tokenizer, prompt) -> str:
    """A prompt (string or message list) as the text the model continues: chat template with the generation prompt,
    or the raw string for a tokenizer without a chat template."""
    if has_chat_template(tokenizer):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return apply_template(tokenizer, messages, add_generation_prompt=True)
    if not isinstance(prompt, str):
        die("message-list prompts need a tokenizer with a chat template")
    return prompt


def _assistant_spans(tokenizer, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in `text` (the rendered conversation).

    Prefix-stable templates: render up to turn i with the generation prompt, and up to and including turn i; the text
    in between (less trailing whitespace, the template's separator) is the assistant's turn with its end-of-turn
    token. Templates that re-render earlier turns (Qwen3 drops the empty `<think>` block from history turns) fall
    back to finding each assistant content in order, plus the EOS token right after it if the template puts one there;
    an earlier turn whose `<think>...</think>` reasoning the template leaves out of the history (Qwen3) is trained on
    what is rendered of it, the answer after `</think>`.
    """
    spans, stable = [], True
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = apply_template(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = apply_template(tokenizer, messages[: i + 1])
        if not (upto.startswith(before) and text.startswith(upto)):
            stable = False
            break
        spans.append((len(before), len(upto.rstrip())))
    if stable:
        return spans
    spans, pos, eos = [], 0, tokenizer.eos_token or ""
    for m in messages:
        content, start = m["content"], text.find(m["content"], pos)
        if start < 0 and m["role"] == "assistant" and "</think>" in content:
            # Qwen3-style templates render an earlier turn without its reasoning: train on what is rendered
            content = content.split("</think>")[-1].lstrip("\n")
            start = text.find(content, pos)
        if start < 0:
            raise ValueError(f"the chat template does not render the {m['role']} content verbatim")
        pos = start + len(content)
        if m["role"] == "assistant":
            end = pos + len(eos) if eos and text.startswith(eos, pos) else pos
            spans.append((start, end))
            pos = end
    return spans


def tokenize_conversation(tokenizer, messages: list[dict], train_from: int = 0) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for a conversation; labels are IGNORE_INDEX everywhere but the assistant's tokens
    (every assistant turn from message `train_from` on, its end-of-turn token included). Works with any chat
    template, with or without `{% generation %}` markers: the spans come from the rendered text and map to tokens by
    character offsets."""
    text = apply_template(tokenizer, messages)
    spans = _assistant_spans(tokenizer, messages, text)
    spans = spans[sum(m["role"] == "assistant" for m in messages[:train_from]) :]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [IGNORE_INDEX] * len(enc["input_ids"])
    for k, (tok, (a, b)) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
        if b > a and any(s <= a and b <= e for s, e in spans):
            labels[k] = tok
    return list(enc["input_ids"]), labels


def tokenize_sft_record(tokenizer, record: dict, path) -> tuple[list[int], list[int]]:
    messages = to_messages(record, path)
    if messages is None:  # plain text: continued pre-training, loss on every token
        ids = tokenizer(record["text"], add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        return ids, list(ids)
    if has_chat_template(tokenizer):
        try:
            return tokenize_conversation(tokenizer, messages)
        except ValueError as e:
            die(f"{_where(path, record)}: {e}")
    if "messages" in record or len(messages) != 2:
        die(
            f"{_where(path, record)}: a 'messages' record needs a tokenizer with a chat template; this one has none "
            "(use 'prompt'/'completion' or 'text' records, or a chat model)"
        )
    prompt_ids = tokenizer(messages[0]["content"], add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(messages[1]["content"], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def load_sft_dataset(path, tokenizer, max_length: int, log=print) -> list[dict]:
    """Read and tokenize an SFT file. Examples longer than `max_length` are truncated (counted and reported);
    examples left with no loss token are dropped (counted and reported). Returns [{input_ids, labels}] as lists."""
    records = read_jsonl(path)
    examples, truncated, dropped = [], 0, 0
    for r in tqdm(records, desc=f"tokenizing {Path(path).name}", disable=len(records) < 20_000, leave=False):
        ids, labels = tokenize_sft_record(tokenizer, r, path)
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if not any(x != IGNORE_INDEX for x in labels[1:]):
            dropped += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
    if truncated:
        log(f"{path}: truncated {truncated} of {len(records)} examples to --max-length {max_length}")
    if dropped:
        log(f"{path}: dropped {dropped} of {len(records)} examples with no loss tokens left")
    if not examples:
        die(f"{path}: no usable examples (all {len(records)} had no loss tokens within --max-length {max_length})")
    return examples


def _as_turns(value, role: str, path, record, field: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    _check_messages(value, path, record, field)
    return value


def tokenize_pair_side(tokenizer, prompt: list[dict], response: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of prompt + response with labels on the response's assistant tokens only."""
    if has_chat_template(tokenizer):
        return tokenize_conversation(tokenizer, prompt + response, train_from=len(prompt))
    if len(prompt) != 1 or len(response) != 1:
        raise ValueError("message-list preferences need a tokenizer with a chat template; this one has none")
    prompt_ids = tokenizer(prompt[0]["content"], add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response[0]["content"], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


def load_preference_dataset(path, tokenizer, max_length: int, log=print) -> list[dict]:
    """Read and tokenize {"prompt", "chosen", "rejected"} records (strings, or message lists: a prompt conversation
    and assistant turns), with an optional numeric "margin". Loss tokens are the response's only. Pairs whose
    chosen equals rejected carry no preference: dropped, counted and reported; so are pairs with a response
    truncated away by `max_length` (longer ones are truncated, counted and reported).
    Returns [{chosen_ids, chosen_labels, rejected_ids, rejected_labels, margin}]."""
    records = read_jsonl(path)
    require_fields(records, path, ("prompt", "chosen", "rejected"))
    pairs, same, truncated, dropped = [], 0, 0, 0
    for r in tqdm(records, desc=f"tokenizing {Path(path).name}", disable=len(records) < 10_000, leave=False):
        prompt = _as_turns(r["prompt"], "user", path, r, "prompt")
        margin = r.get("margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            die(f"{_where(path, r)}: field 'margin' must be a number, got {margin!r}")
        pair = {"margin": float(margin)}
        for side in ("chosen", "rejected"):
            response = _as_turns(r[side], "assistant", path, r, side)
            if not any(m["role"] == "assistant" for m in response):
                die(f"{_where(path, r)}: field '{side}' has no assistant message")
            try:
                ids, labels = tokenize_pair_side(tokenizer, prompt, response)
            except ValueError as e:
                die(f"{_where(path, r)}: {e}")
            if len(ids) > max_length:
                truncated += 1
                ids, labels = ids[:max_length], labels[:max_length]
            pair[f"{side}_ids"], pair[f"{side}_labels"] = ids, labels
        if pair["chosen_ids"] == pair["rejected_ids"]:
            same += 1
            continue
        if not all(any(x != IGNORE_INDEX for x in pair[f"{s}_labels"][1:]) for s in ("chosen", "rejected")):
            dropped += 1
            continue
        pairs.append(pair)
    if same:
        log(f"warning: {path}: dropped {same} of {len(records)} pairs whose chosen and rejected are identical")
    if truncated:
        log(f"{path}: truncated {truncated} responses of {len(records)} pairs to --max-length {max_length}")
    if dropped:
        log(f"{path}: dropped {dropped} of {len(records)} pairs with a response truncated away")
    if not pairs:
        die(f"{path}: no usable preference pairs (of {len(records)})")
    return pairs


# ----------------------------------------------------------------------------------------------------------------
# Batching. An optimizer step takes `batch_size` examples chosen by (seed, step) alone; it is then cut into
# micro-batches of `micro_batch_size`, length-sorted to waste little padding. So runs that differ only in
# micro-batch size see the same data, and the accumulated gradient is the one of the whole step.


def check_batch_sizes(batch_size: int, micro_batch_size: int) -> int:
    """grad_accum_steps = batch_size / micro_batch_size, or one clear error naming the flags. A micro-batch size at
    least the batch size means one forward/backward per step (the default 64 must not break a batch of 16)."""
    if batch_size < 1 or micro_batch_size < 1:
        die(f"--batch-size ({batch_size}) and --micro-batch-size ({micro_batch_size}) must be positive")
    if micro_batch_size >= batch_size:
        return 1
    if batch_size % micro_batch_size:
        die(f"--batch-size {batch_size} is not divisible by --micro-batch-size {micro_batch_size}")
    return batch_size // micro_batch_size


def step_indices(num_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The example indices of optimizer step `step` (0-based): epochs are seeded permutations, cut into whole
    batches (a last partial batch of an epoch is skipped). Depends only on (num_examples, batch_size, step, seed)."""
    steps_per_epoch = max(1, num_examples // batch_size)
    epoch, k = divmod(step, steps_per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(num_examples, generator=g).tolist()
    perm = perm * math.ceil(batch_size / num_examples) if batch_size > num_examples else perm
    return perm[k * batch_size : (k + 1) * batch_size]


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad `input_ids` (and `labels` with IGNORE_INDEX) into (B, T) tensors with an attention mask."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def micro_batches(examples: list[dict], indices: list[int], micro_batch_size: int, pad_token_id: int) -> list[dict]:
    """The step's examples, longest first, cut into collated micro-batches."""
    chosen = sorted((examples[i] for i in indices), key=lambda e: -len(e["input_ids"]))
    return [collate(chosen[s : s + micro_batch_size], pad_token_id) for s in range(0, len(chosen), micro_batch_size)]


def pair_micro_batches(pairs: list[dict], indices: list[int], micro_batch_size: int, pad_token_id: int) -> list[dict]:
    """The step's preference pairs, longest first, cut into micro-batches of `micro_batch_size` pairs; each collates
    chosen then rejected into one (2b, T) batch (rows :b chosen, b: rejected) for a single forward, and carries
    `margin` (b,) and the pairs' dataset `index` (b,)."""
    order = sorted(indices, key=lambda i: -max(len(pairs[i]["chosen_ids"]), len(pairs[i]["rejected_ids"])))
    out = []
    for s in range(0, len(order), micro_batch_size):
        chunk = [pairs[i] for i in order[s : s + micro_batch_size]]
        sides = [
            {"input_ids": p[f"{side}_ids"], "labels": p[f"{side}_labels"]}
            for side in ("chosen", "rejected")
            for p in chunk
        ]
        batch = collate(sides, pad_token_id)
        batch["margin"] = torch.tensor([p["margin"] for p in chunk])
        batch["index"] = torch.tensor(order[s : s + micro_batch_size])
        out.append(batch)
    return out


def count_loss_tokens(batches: list[dict]) -> int:
    """Loss tokens in a whole optimizer step: the normalizer of its token-mean loss (targets are labels[:, 1:])."""
    return int(sum((b["labels"][:, 1:] != IGNORE_INDEX).sum() for b in batches))
