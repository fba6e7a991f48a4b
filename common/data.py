"""Training and evaluation data: one loader for every source, chat-template tokenization with assistant-only loss
masks, mixtures of sources, and batching for gradient accumulation.

Sources (`--dataset`, `--eval-dataset`, `--eval-prompts`; see `SOURCE_HELP`): our JSON Lines, a local .parquet,
.json, .jsonl or .csv file, a directory written by `datasets` `save_to_disk`, or a hub id `name[:config][@split]`,
with an optional slice `[start:stop]` after the split. Everything but our JSON Lines goes through the `datasets`
library (memory-mapped Arrow, its cache). `--columns` maps the record fields below onto a dataset's columns,
`--prompt-template` / `--system-prompt` build the prompts (`DataOptions`).

Record shapes (after mapping):
  SFT:      {"messages": [{"role", "content"}, ...]} | {"prompt", "completion"} | {"text"}
  preferences: {"prompt", "chosen", "rejected"}   (DPO, reward model; strings or message lists), or implicit:
            {"chosen", "rejected"} as whole conversations, the prompt their shared first turns (TRL's two shapes)
  prompts:  {"prompt", "answer", ...}   (RL and evaluation; `answer` goes to the verifier / reward function)
Errors name the source, the line or row and the field, and stop the run before any compute (`common.die`).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import string
import tempfile
import time
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from common import die

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")


def read_jsonl(path: str | Path) -> list[dict]:
    """Every line a JSON object; blank lines are skipped. Each record gets `_line` (1-based) for later messages."""
    return [r for chunk in iter_jsonl(path) for r in chunk]


def iter_jsonl(path: str | Path, chunk_size: int = 2_000):
    """`read_jsonl` a chunk of records at a time (a large file is never held whole as Python objects)."""
    path = Path(path)
    if not path.is_file():
        die(f"{path}: no such file")
    chunk, seen = [], False
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                die(f"{path}:{lineno}: not valid UTF-8 (byte {raw[e.start : e.start + 1]!r} at column {e.start + 1})")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                die(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})")
            if not isinstance(obj, dict):
                die(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            obj["_line"] = lineno
            chunk.append(obj)
            if len(chunk) == chunk_size:
                seen = True
                yield chunk
                chunk = []
    if not (seen or chunk):
        die(f"{path}: empty file (no records)")
    if chunk:
        yield chunk


# ----------------------------------------------------------------------------------------------------------------
# Sources: where records come from, and how a dataset's columns become our fields.

SOURCE_HELP = (
    "a JSONL file of our records, a .parquet/.json/.jsonl/.csv file, a directory written by datasets' save_to_disk, "
    "or a hub id NAME[:CONFIG][@SPLIT][[START:STOP]] (e.g. openai/gsm8k:main@train, openai/gsm8k:main@test[:500]; "
    "split default: train); local files and directories take @SPLIT and the slice too"
)
_SPEC = re.compile(r"^(?P<name>.+?)(?::(?P<config>[^:@/\[\]]+))?(?:@(?P<split>[^@\[\]]+))?(?:\[(?P<slice>[^\]]*)\])?$")
_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


@dataclass(frozen=True)
class DataOptions:
    """How a dataset's rows become our records (the same for every source of a run): `columns` maps our fields to
    its columns (`--columns prompt=question,answer=answer`), `prompt_template` formats a prompt from a row's
    columns (`--prompt-template`), `system_prompt` is prepended to every prompt that has no system turn."""

    columns: dict[str, str] = dataclass_field(default_factory=dict)
    prompt_template: str | None = None
    system_prompt: str | None = None

    def describe(self) -> str:
        parts = [f"--columns {','.join(f'{k}={v}' for k, v in self.columns.items())}"] if self.columns else []
        parts += [f"prompt template {self.prompt_template!r}"] if self.prompt_template is not None else []
        parts += [f"system prompt {self.system_prompt!r}"] if self.system_prompt else []
        return "  |  ".join(parts)


def data_options(args=None, *, columns: str | None = None, prompt_template: str | None = None, system_prompt=None):
    """`DataOptions` from a script's flags (`args.columns`, `.prompt_template`, `.system_prompt`, and the
    `--dataset` / `--dataset-weights` counts), checked before any compute: one line for a malformed value."""
    if args is not None:
        columns, prompt_template, system_prompt = args.columns, args.prompt_template, args.system_prompt
        if not args.dataset:
            die("--dataset: give at least one source")
        if args.dataset_weights is not None:
            check_weights(args.dataset_weights, len(args.dataset))
    mapping = {}
    for item in filter(None, (part.strip() for part in (columns or "").split(","))):
        ours, sep, theirs = (x.strip() for x in item.partition("="))
        if not sep or not ours or not theirs:
            die(f"--columns {columns!r}: expected FIELD=COLUMN pairs separated by commas, e.g. prompt=question")
        mapping[ours] = theirs
    if prompt_template is not None:
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(prompt_template) if name is not None]
        except ValueError as e:
            die(f"--prompt-template {prompt_template!r}: {e} (write a literal brace as {{{{ or }}}})")
        if not names:
            die(f"--prompt-template {prompt_template!r} uses no column (write the columns as {{question}})")
        if any(not n or not n.isidentifier() for n in names):
            die(f"--prompt-template {prompt_template!r}: every {{...}} must name a column, e.g. {{question}}")
    return DataOptions(mapping, prompt_template, system_prompt or None)


def check_weights(weights, num_sources: int) -> None:
    """`--dataset-weights`: one positive number per `--dataset` source, or one line naming the flag."""
    if len(weights) != num_sources:
        die(f"--dataset-weights has {len(weights)} values for {num_sources} --dataset sources")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        die(f"--dataset-weights {' '.join(map(str, weights))}: every weight must be a positive number")


def parse_source(spec: str) -> tuple[str, str | None, str | None, str | None]:
    """(name or path, config, split, slice) of a source spelling; an existing path is taken whole."""
    if Path(spec).expanduser().exists():
        return spec, None, None, None
    m = _SPEC.match(spec)
    if not m:
        die(f"dataset {spec!r}: expected {SOURCE_HELP}")
    name, config, split, slice_ = m.group("name", "config", "split", "slice")
    if config is not None and Path(f"{name}:{config}").expanduser().exists():  # a path with a colon in it
        name, config = f"{name}:{config}", None
    return name, config, split, slice_


def _apply_slice(ds, slice_: str | None, where: str):
    if slice_ is None:
        return ds
    start, sep, stop = slice_.partition(":")
    try:
        bounds = slice(int(start) if start.strip() else None, int(stop) if stop.strip() else None) if sep else None
    except ValueError:
        bounds = None
    if bounds is None:
        die(f"{where}: slice [{slice_}] must be [START:STOP] with integers, e.g. [:500]")
    return ds.select(range(len(ds))[bounds])


def _first_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _load_hf(spec: str, log=print):
    """A `datasets.Dataset` for a non-JSONL source, and the name its errors and records use. A dataset with several
    configs and none given (openai/gsm8k) takes the first, saying so."""
    try:
        import datasets
    except ImportError:
        die(f"dataset {spec!r}: reading it needs the `datasets` library: pip install datasets")
    name, config, split, slice_ = parse_source(spec)
    path = Path(name).expanduser()
    where = f"{name}" + (f":{config}" if config else "") + f"@{split or 'train'}"
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if (split or "train") not in ds:
                    die(f"{where}: no split {split or 'train'!r}; the splits are: {', '.join(ds)}")
                ds = ds[split or "train"]
            elif split not in (None, "train"):
                die(f"{where}: a saved Dataset has one split (train), not {split!r}")
        elif path.is_file():
            builder = _FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                die(f"{name}: unknown file type {path.suffix!r} (expected .jsonl, .json, .parquet or .csv)")
            if split not in (None, "train"):
                die(f"{where}: a single file has one split (train), not {split!r}")
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        elif path.is_dir() or not (name.startswith((".", "/", "~")) or path.suffix.lower() in _FILE_BUILDERS):
            try:
                ds = datasets.load_dataset(name, config, split=split or "train")  # a hub id or a dataset repository
            except ValueError as e:
                configs = re.search(r"Config name is missing.*?\[([^\]]*)\]", str(e), re.DOTALL)
                if config is not None or not configs:
                    raise
                names = [c.strip().strip("'\"") for c in configs.group(1).split(",")]
                config = names[0]
                log(f"{name}: no config given; using {config!r} (the configs are: {', '.join(names)})")
                where = f"{name}:{config}@{split or 'train'}"
                ds = datasets.load_dataset(name, config, split=split or "train")
        else:
            die(f"dataset {name!r}: no such file or directory")
    except ConnectionError:
        die(
            f"dataset {name!r} is not in the local datasets cache and the hub cannot be reached (HF_HUB_OFFLINE or "
            f'no network): download it where the hub is reachable (python -c "import datasets; '
            f'datasets.load_dataset({name!r}{", " + repr(config) if config else ""})") or pass a local path'
        )
    except (ValueError, FileNotFoundError, OSError) as e:  # unknown config or split, a missing file, bad data
        die(f"{where}: {_first_line(e)}")
    if len(ds) == 0:
        die(f"{where}: empty (no rows)")
    return _apply_slice(ds, slice_, where), where


def _sharegpt(messages):
    """ShareGPT turns ({"from": "human"|"gpt"|..., "value"}) as {role, content}; anything else unchanged."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return messages
    if not all("from" in m and "value" in m and "role" not in m for m in messages):
        return messages
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    roles |= {"tool": "tool", "function_call": "assistant", "observation": "tool"}
    return [{"role": roles.get(m["from"], m["from"]), "content": m["value"]} for m in messages]


@dataclass
class Source:
    """One opened source: its display name, the `datasets.Dataset` (None for our JSON Lines), the file it is read
    from (JSON Lines), a fingerprint of its content (the tokenization cache key) and where its cache lives."""

    name: str
    ds: object | None
    path: Path | None
    fingerprint: str
    cache_dir: Path


def open_source(spec: str | Path, what: str = "--dataset", log=print) -> Source:
    """Resolve a source spelling (see `SOURCE_HELP`) without reading its rows into memory."""
    spec = str(spec)
    if not spec:
        die(f"{what}: empty source")
    if spec.endswith(".jsonl"):  # our own records: read line by line, errors by line number
        path = Path(spec).expanduser()
        if not path.is_file():
            die(f"{spec}: no such file")
        stat = path.stat()
        fingerprint = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        return Source(spec, None, path, fingerprint, path.resolve().parent / ".cleanpost-cache")
    ds, name = _load_hf(spec, log)
    files = [Path(f["filename"]) for f in getattr(ds, "cache_files", []) or []]
    local = Path(parse_source(spec)[0]).expanduser()
    if local.exists():  # next to the file or the saved dataset
        cache_dir = local.resolve().parent / ".cleanpost-cache"
    elif files:  # in the datasets cache, next to the Arrow files
        cache_dir = files[0].parent / ".cleanpost-cache"
    else:
        cache_dir = Path.home() / ".cache" / "cleanpost"
    return Source(name, ds, None, f"{name}:{ds._fingerprint}:{len(ds)}", cache_dir)


CHUNK_ROWS = 2_000  # rows read, tokenized and stored flat at a time (larger: more transient memory)


def iter_records(source: Source, opts: DataOptions | None = None, chunk_size: int | None = None):
    """The rows of one source as our records (columns mapped, ShareGPT turns converted), `chunk_size` rows at a
    time (a dataset from its memory-mapped Arrow, our JSON Lines line by line). Each
    record carries `_where` ("file:line" or "name@split row i") for later messages."""
    opts, chunk_size = opts or DataOptions(), chunk_size or CHUNK_ROWS
    name = source.name
    if source.ds is None:

        def lines():
            for chunk in iter_jsonl(source.path, chunk_size):
                for r in chunk:
                    r["_where"] = f"{name}:{r['_line']}"
                yield chunk

        chunks = lines()
    else:
        columns = list(source.ds.column_names)
        # A source must have at least one of the mapped columns (a mixture's sources may each use some of them);
        # what a record then lacks is reported by the shape checks, with the columns it has.
        if opts.columns:
            missing = [(o, t) for o, t in opts.columns.items() if t not in columns and o not in columns]
            if len(missing) == len(opts.columns):
                ours, theirs = missing[0]
                die(f"{name}: --columns {ours}={theirs}: no column {theirs!r}; the columns are: {', '.join(columns)}")

        def rows():
            for start in range(0, len(source.ds), chunk_size):
                part = source.ds.select(range(start, min(start + chunk_size, len(source.ds)))).to_list()
                chunk = [{k: v for k, v in r.items() if v is not None} for r in part]  # null = absent
                for i, r in enumerate(chunk):
                    r["_where"] = f"{name} row {start + i}"
                yield chunk

        chunks = rows()
    for chunk in chunks:
        for r in chunk:
            for ours, theirs in opts.columns.items():
                if theirs in r:
                    r[ours] = r[theirs]
            for key in ("messages", "prompt", "completion", "chosen", "rejected"):
                if key in r:
                    r[key] = _sharegpt(r[key])
        yield chunk


def source_size(source: Source) -> int:
    """Rows of a source (non-blank lines of our JSON Lines)."""
    if source.ds is not None:
        return len(source.ds)
    with source.path.open("rb") as f:  # bytes: a bad UTF-8 line is reported by `iter_jsonl`, naming it
        return sum(1 for line in f if line.strip())


def read_records(
    spec: str | Path | Source, opts: DataOptions | None = None, what: str = "--dataset", log=print
) -> tuple[list[dict], str]:
    """Every row of one source as our records (see `iter_records`), and the source's display name."""
    source = spec if isinstance(spec, Source) else open_source(spec, what, log)
    return [r for chunk in iter_records(source, opts) for r in chunk], source.name


def apply_prompt_options(record: dict, opts: DataOptions, field: str = "prompt") -> None:
    """`--prompt-template` (the prompt formatted from the row's columns) and `--system-prompt` (prepended where the
    prompt has no system turn), applied in place to `record[field]` (a string or a message list)."""
    if opts.prompt_template is not None:
        try:
            record[field] = opts.prompt_template.format_map({k: v for k, v in record.items() if not k.startswith("_")})
        except KeyError as e:
            keys = ", ".join(k for k in record if not k.startswith("_"))
            die(f"{record['_where']}: --prompt-template uses column {e.args[0]!r}; the record has: {keys}")
        except (IndexError, ValueError, AttributeError) as e:
            die(f"{record['_where']}: --prompt-template: {_first_line(e)}")
    if opts.system_prompt and field in record:
        record[field] = with_system_prompt(record[field], opts.system_prompt)


def with_system_prompt(prompt, system_prompt: str):
    """A prompt (string or message list) as messages opening with `system_prompt`, unless it has a system turn."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and not (prompt and isinstance(prompt[0], dict) and prompt[0].get("role") == "system"):
        prompt = [{"role": "system", "content": system_prompt}] + prompt
    return prompt


PROMPT_COLUMNS = ("question", "problem", "query", "instruction")  # what prompt datasets call the prompt
ANSWER_COLUMNS = ("solution", "final_answer")  # ... and the reference answer (GSM8K's is already `answer`)


def load_prompts(
    spec: str, fields: tuple[str, ...], opts: DataOptions | None = None, what: str = "--dataset", log=print
) -> list[dict]:
    """Prompt records (RL training, greedy evaluation) of one source, `fields` required, prompt options applied.
    A required `prompt` / `answer` that no `--columns` or `--prompt-template` provides is taken from the first
    column of `PROMPT_COLUMNS` / `ANSWER_COLUMNS` every row has (GSM8K's `question`, MATH's `problem` and
    `solution`), saying so in one line."""
    opts = opts or DataOptions()
    records, name = read_records(spec, opts, what, log)
    for ours, candidates in (("prompt", PROMPT_COLUMNS), ("answer", ANSWER_COLUMNS)):
        given = ours in opts.columns or (ours == "prompt" and opts.prompt_template is not None)
        if ours not in fields or given or all(ours in r for r in records):
            continue
        found = next((c for c in candidates if all(c in r for r in records)), None)
        if found is not None:
            log(f"{name}: no '{ours}' column; using '{found}' (--columns {ours}=COLUMN picks another)")
            for r in records:
                r.setdefault(ours, r[found])
    for r in records:
        apply_prompt_options(r, opts)
    require_fields(records, name, fields)
    for r in records:
        if isinstance(r["prompt"], list):
            _check_messages(r["prompt"], name, r, "prompt")
        elif not isinstance(r["prompt"], str):
            die(f"{r['_where']}: field 'prompt' must be a string or a list of {{role, content}} messages")
    return records


def _where(path, record) -> str:
    return record.get("_where") or f"{path}:{record.get('_line', '?')}"


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
        if "weight" in m and (m["role"] != "assistant" or m["weight"] not in (0, 1)):
            die(f"{_where(path, record)}: field '{field}[{i}].weight' must be 0 or 1, on an assistant message")


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
    has = ", ".join(k for k in record if not k.startswith("_"))
    die(
        f"{_where(path, record)}: missing field: expected 'messages', 'prompt' + 'completion', or 'text' (the record "
        f"has: {has}; --columns maps columns)"
    )


def require_fields(records: list[dict], path, fields: tuple[str, ...]) -> None:
    for r in records:
        for field in fields:
            if field not in r:
                has = ", ".join(k for k in r if not k.startswith("_"))
                die(f"{_where(path, r)}: missing field '{field}' (the record has: {has}; --columns maps columns)")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def apply_template(tokenizer, messages: list[dict], **kwargs) -> str:
    """The chat template rendered as text, with the run's `--chat-template-kwargs` (see `load_tokenizer`)."""
    extra = getattr(tokenizer, "cleanpost_template_kwargs", None) or {}
    return tokenizer.apply_chat_template(messages, tokenize=False, **extra, **kwargs)


def fit_prompts(
    records: list[dict], tokenizer, max_prompt_length: int, what: str, log=print, flag: str = "--max-prompt-length"
) -> list[dict]:
    """The records whose prompt (after the chat template) is at most `max_prompt_length` tokens; the others are
    dropped and counted in one line, so one over-long prompt cannot end a run with an out-of-memory at whatever
    step samples it. All dropped: one error naming the source and the flag. `flag`: what sets the bound
    (sft/lora/dpo's evaluation prompts get the model's context minus `--eval-max-new-tokens`)."""
    if not records:
        return records
    bound = (
        f"--max-prompt-length {max_prompt_length} tokens"
        if flag == "--max-prompt-length"
        else f"{max_prompt_length} tokens (the model's context minus {flag})"
    )
    keep, longest = [], 0
    for s in range(0, len(records), 1000):
        chunk = records[s : s + 1000]
        texts = [render_prompt(tokenizer, r["prompt"]) for r in chunk]
        lengths = [
            len(ids) for ids in tokenizer(texts, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]
        ]
        longest = max(longest, *lengths)
        keep += [r for r, n in zip(chunk, lengths) if n <= max_prompt_length]
    if not keep:
        remedy = "raise --max-prompt-length" if flag == "--max-prompt-length" else f"lower {flag}"
        die(
            f"{what}: every prompt is longer than {bound} (the shortest rendered prompt is over it; the longest has "
            f"{longest}): {remedy} or shorten the prompts"
        )
    if len(keep) < len(records):
        log(
            f"{what}: dropped {len(records) - len(keep)} of {len(records)} prompts longer than {bound} (longest {longest})"
        )
    return keep


def prompt_budget(
    max_prompt_length: int | None, model: str, max_new_tokens: int, flag: str = "--max-new-tokens"
) -> int:
    """--max-prompt-length, or by default the model's context (`max_position_embeddings`) minus --max-new-tokens."""
    if max_prompt_length is not None:
        if max_prompt_length < 1:
            die(f"--max-prompt-length must be at least 1, got {max_prompt_length}")
        return max_prompt_length
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError):
        return 1 << 30  # load_model reports the model itself
    config = getattr(config, "text_config", None) or config
    context = getattr(config, "max_position_embeddings", None)
    if context is None:
        return 1 << 30
    if context <= max_new_tokens:
        die(f"{flag} {max_new_tokens} leaves no room for a prompt in {model}'s {context}-token context")
    return context - max_new_tokens


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
    (every assistant turn from message `train_from` on, its end-of-turn token included, except those with
    `"weight": 0`, as in OpenAI's fine-tuning format: context, not trained on). Works with any chat
    template, with or without `{% generation %}` markers: the spans come from the rendered text and map to tokens by
    character offsets."""
    text = apply_template(tokenizer, messages)
    spans = _assistant_spans(tokenizer, messages, text)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]  # one span each, in order
    spans = [span for span, i in zip(spans, assistant) if i >= train_from and messages[i].get("weight", 1) != 0]
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


# ----------------------------------------------------------------------------------------------------------------
# Tokenized examples: stored flat (one int32 array of every example's tokens per field, plus offsets), so memory is
# the token ids themselves (8 bytes a token for ids + labels, not a Python int object each), memory-mapped when read
# from the cache. Tokenization runs in `--num-proc` processes and is cached next to the dataset, keyed by the
# source's content, the tokenizer (vocabulary, chat template, template kwargs), the prompt options and max length.

CACHE_VERSION = 1  # bump when tokenization changes what it produces (an edit of this file changes the key too)
_CODE_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


class Examples:
    """Tokenized examples, indexable like a list of dicts ({input_ids: [...], labels: [...]}: token fields as lists
    of ints, made on access from the flat int32 storage; scalar fields as floats)."""

    def __init__(self, tokens: dict[str, tuple[np.ndarray, np.ndarray]], scalars: dict[str, np.ndarray], n: int):
        self.tokens, self.scalars, self.n = tokens, scalars, n  # tokens: field -> (values, offsets (n + 1,))

    @classmethod
    def from_examples(cls, examples: list[dict]) -> Examples:
        first = examples[0]
        tokens, scalars = {}, {}
        for key, value in first.items():
            if isinstance(value, np.ndarray):
                lengths = np.fromiter((len(e[key]) for e in examples), dtype=np.int64, count=len(examples))
                offsets = np.zeros(len(examples) + 1, dtype=np.int64)
                np.cumsum(lengths, out=offsets[1:])
                tokens[key] = (np.concatenate([e[key] for e in examples]).astype(np.int32, copy=False), offsets)
            else:
                scalars[key] = np.asarray([e[key] for e in examples], dtype=np.float64)
        return cls(tokens, scalars, len(examples))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not -self.n <= i < self.n:
            raise IndexError(i)
        i %= self.n
        out = {key: values[offsets[i] : offsets[i + 1]].tolist() for key, (values, offsets) in self.tokens.items()}
        out.update({key: float(values[i]) for key, values in self.scalars.items()})
        return out

    def __iter__(self):
        return (self[i] for i in range(self.n))

    def to_list(self) -> list[dict]:
        return list(self)

    def num_tokens(self) -> int:
        return int(sum(len(values) for values, _ in self.tokens.values()))

    @classmethod
    def concat(cls, parts: list[Examples]) -> Examples:
        if len(parts) == 1:
            return parts[0]
        tokens = {
            key: (np.concatenate([p.tokens[key][0] for p in parts]), _joined_offsets(parts, key))
            for key in parts[0].tokens
        }
        scalars = {key: np.concatenate([p.scalars[key] for p in parts]) for key in parts[0].scalars}
        return cls(tokens, scalars, sum(p.n for p in parts))

    @staticmethod
    def save(parts: list[Examples], directory: Path, meta: dict) -> None:
        """Write the concatenation of `parts` to `directory` atomically (a temporary sibling renamed into place),
        streaming: the file is written part by part, never held whole in memory a second time."""
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".tmp", dir=directory.parent))
        for key in parts[0].tokens:
            with (tmp / f"{key}.npy").open("wb") as f:
                shape = (sum(len(p.tokens[key][0]) for p in parts),)
                np.lib.format.write_array_header_1_0(f, {"descr": "<i4", "fortran_order": False, "shape": shape})
                for p in parts:
                    f.write(np.ascontiguousarray(p.tokens[key][0], dtype="<i4").tobytes())
            np.save(tmp / f"{key}.offsets.npy", _joined_offsets(parts, key))
        for key in parts[0].scalars:
            np.save(tmp / f"{key}.scalar.npy", np.concatenate([p.scalars[key] for p in parts]))
        n = sum(p.n for p in parts)
        meta = {**meta, "n": n, "tokens": list(parts[0].tokens), "scalars": list(parts[0].scalars)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        try:
            os.replace(tmp, directory)
        except OSError:  # another process (a torchrun rank) wrote it first: same content
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, directory: Path) -> tuple[Examples, dict]:
        meta = json.loads((directory / "meta.json").read_text())
        tokens = {
            key: (np.load(directory / f"{key}.npy", mmap_mode="r"), np.load(directory / f"{key}.offsets.npy"))
            for key in meta["tokens"]
        }
        scalars = {key: np.load(directory / f"{key}.scalar.npy") for key in meta["scalars"]}
        return cls(tokens, scalars, meta["n"]), meta


def _joined_offsets(parts: list[Examples], key: str) -> np.ndarray:
    """The offsets of the concatenated token arrays of field `key`."""
    out, shift = [np.zeros(1, dtype=np.int64)], 0
    for p in parts:
        offsets = p.tokens[key][1]
        out.append(offsets[1:] + shift)
        shift += int(offsets[-1])
    return np.concatenate(out)


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides a tokenization: the vocabulary and its rules, the special tokens, the chat template and the
    run's template kwargs. The vocabulary's hash (MBs of `tokenizer.json` for a 150k vocabulary) is computed once per
    tokenizer object and size, not once per source."""
    extra = getattr(tokenizer, "cleanpost_template_kwargs", None) or {}
    settings = (type(tokenizer).__name__, tokenizer.chat_template, json.dumps(extra, sort_keys=True))
    settings += (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, getattr(tokenizer, "add_bos_token", 0))
    memo = getattr(tokenizer, "_cleanpost_vocab_hash", None)
    if memo is None or memo[0] != len(tokenizer):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        vocab = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab())
        memo = (len(tokenizer), hashlib.sha256(vocab.encode()).hexdigest())
        tokenizer._cleanpost_vocab_hash = memo
    return hashlib.sha256(repr((memo[1], settings)).encode()).hexdigest()


def tokenized(spec, kind: str, tokenizer, max_length: int, opts: DataOptions, build, log=print) -> Examples:
    """`build(source) -> (Examples, notes)` run once per (source content, tokenizer, prompt options, max length):
    the result is cached in `.cleanpost-cache/` next to the dataset (in `~/.cache/cleanpost` where that is not
    writable; `CLEANPOST_NO_DATA_CACHE=1` turns the cache off) and later runs read it memory-mapped. Its notes
    (truncated / dropped counts) are printed either way."""
    source = spec if isinstance(spec, Source) else open_source(spec, log=log)
    key = hashlib.sha256(
        json.dumps(
            [CACHE_VERSION, _CODE_HASH, kind, source.fingerprint, tokenizer_fingerprint(tokenizer), max_length,
             opts.columns, opts.prompt_template, opts.system_prompt]
        ).encode()
    ).hexdigest()[:20]  # fmt: skip
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(source.name.split("@")[0]).name)[:60]
    use_cache = os.environ.get("CLEANPOST_NO_DATA_CACHE", "") in ("", "0")
    candidates = [
        source.cache_dir / f"{stem}.{kind}.{key}",
        Path.home() / ".cache" / "cleanpost" / f"{stem}.{kind}.{key}",
    ]
    for directory in candidates if use_cache else []:
        if (directory / "meta.json").is_file():
            examples, meta = Examples.load(directory)
            for note in meta["notes"]:
                log(note)
            log(f"{source.name}: {len(examples)} tokenized examples read from the cache {directory}")
            return examples
    t0 = time.time()
    parts, notes = build(source)
    for note in notes:
        log(note)
    saved = None
    if use_cache:
        meta = {"source": source.name, "kind": kind, "max_length": max_length, "notes": notes}
        for directory in candidates:
            try:
                Examples.save(parts, directory, meta)
                saved = directory
                break
            except OSError:
                continue
    if saved is not None:
        del parts  # read back memory-mapped: the run holds no second copy of the token ids
        examples, _ = Examples.load(saved)
    else:
        examples = Examples.concat(parts)
    rate = len(examples) / max(time.time() - t0, 1e-9)
    log(
        f"{source.name}: tokenized {len(examples)} examples ({rate:,.0f}/s)" + (f", cached in {saved}" if saved else "")
    )
    return examples


_WORKER_FN = None  # the per-record function of a parallel tokenization, inherited by the forked workers


def _map_chunk(chunk: list[dict]):
    out = []
    for record in chunk:
        try:
            out.append(_WORKER_FN(record))
        except SystemExit as e:  # a bad record: its one line goes back to the parent, which stops the run
            return out, str(e.code)
    return out, None


def _map_records(chunks, fn, num_proc: int, source: Source):
    """Yields `[fn(r) for r in chunk]` for each chunk, computed in `num_proc` forked processes when > 1, with a
    progress bar on long work. A bad record stops the run with its line (the first in record order)."""
    total = source_size(source)
    bar = tqdm(total=total, desc=f"tokenizing {Path(source.name).name}", disable=total < 10_000, leave=False)
    global _WORKER_FN
    try:
        if num_proc <= 1:
            for chunk in chunks:
                yield [fn(r) for r in chunk]
                bar.update(len(chunk))
            return
        _WORKER_FN = fn
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are the parallelism
        with multiprocessing.get_context("fork").Pool(num_proc) as pool:
            for chunk in chunks:
                size = max(1, min(500, len(chunk) // (4 * num_proc)))
                out = []
                for results, error in pool.imap(_map_chunk, [chunk[i : i + size] for i in range(0, len(chunk), size)]):
                    if error is not None:
                        pool.terminate()
                        raise SystemExit(error)
                    out.extend(results)
                yield out
                bar.update(len(chunk))
    finally:
        _WORKER_FN = None
        bar.close()


def _sft_example(tokenizer, max_length: int, path: str, record: dict):
    """(example or None, truncated?) of one SFT record; None when no loss token is left."""
    ids, labels = tokenize_sft_record(tokenizer, record, path)
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if not any(x != IGNORE_INDEX for x in labels[1:]):
        return None, truncated
    return {"input_ids": np.asarray(ids, dtype=np.int32), "labels": np.asarray(labels, dtype=np.int32)}, truncated


def load_sft_dataset(
    spec, tokenizer, max_length: int, log=print, opts: DataOptions | None = None, num_proc: int = 1
) -> Examples:
    """Read and tokenize one SFT source (in `num_proc` processes; cached, see `tokenized`). `--prompt-template`
    builds the prompt of prompt/completion rows, `--system-prompt` opens every conversation that has no system
    turn. Examples longer than `max_length` are truncated (counted and reported); examples left with no loss token
    are dropped (counted and reported). Returns `Examples` of {input_ids, labels}."""
    opts = opts or DataOptions()

    def prepare(records: list[dict]) -> list[dict]:
        for r in records:
            if "messages" in r:
                if opts.system_prompt:
                    r["messages"] = with_system_prompt(r["messages"], opts.system_prompt)
            elif "completion" in r:
                apply_prompt_options(r, opts)
        return records

    def build(source: Source):
        path = source.name
        chunks = (prepare(c) for c in iter_records(source, opts))
        parts, n, kept, truncated = [], 0, 0, 0
        for results in _map_records(chunks, partial(_sft_example, tokenizer, max_length, path), num_proc, source):
            examples = [e for e, _ in results if e is not None]
            n, kept, truncated = n + len(results), kept + len(examples), truncated + sum(t for _, t in results)
            parts += [Examples.from_examples(examples)] if examples else []  # flat per chunk: the ids, no more
        notes = [f"{path}: truncated {truncated} of {n} examples to --max-length {max_length}"] if truncated else []
        if kept < n:
            notes.append(f"{path}: dropped {n - kept} of {n} examples with no loss tokens left")
        if not kept:
            die(f"{path}: no usable examples (all {n} had no loss tokens within --max-length {max_length})")
        return parts, notes

    return tokenized(spec, "sft", tokenizer, max_length, opts, build, log)


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


def split_implicit_prompt(chosen: list[dict], rejected: list[dict], where: str):
    """(prompt, chosen response, rejected response) of two whole conversations: the prompt is the turns they share
    from the start; both responses must then begin with an assistant turn (else the two prompts differ: an error
    naming the row)."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    if k == 0 or k >= len(chosen) or k >= len(rejected):
        what = "share no prompt turns" if k == 0 else "are the same conversation up to the end of one of them"
        die(f"{where}: 'chosen' and 'rejected' {what} (an implicit prompt is the turns both start with)")
    if chosen[k]["role"] != "assistant" or rejected[k]["role"] != "assistant":
        die(
            f"{where}: 'chosen' and 'rejected' differ in turn {k} ({chosen[k]['role']} / {rejected[k]['role']}), "
            "before an assistant turn: their prompts differ"
        )
    return chosen[:k], chosen[k:], rejected[k:]


def _is_conversation(value) -> bool:
    """A message list that contains a non-assistant turn: a whole conversation, not just the responses."""
    return isinstance(value, list) and any(isinstance(m, dict) and m.get("role") != "assistant" for m in value)


def load_preference_dataset(
    spec, tokenizer, max_length: int, log=print, opts: DataOptions | None = None, num_proc: int = 1
) -> Examples:
    """Read and tokenize preference pairs, in TRL's two shapes: explicit {"prompt", "chosen", "rejected"} (strings,
    or message lists: a prompt conversation and assistant turns) and implicit {"chosen", "rejected"} as whole
    conversations, whose shared first turns are the prompt (a `prompt` column is then ignored, as TRL does). An
    optional numeric "margin". Loss tokens are the response's only. Pairs whose chosen equals rejected carry no
    preference: dropped, counted and reported; so are pairs with a response truncated away by `max_length`
    (longer ones are truncated, counted and reported). Tokenized in `num_proc` processes and cached (`tokenized`).
    Returns `Examples` of {chosen_ids, chosen_labels, rejected_ids, rejected_labels, margin}."""
    opts = opts or DataOptions()

    def prepare(records: list[dict]) -> list[dict]:
        for r in records:
            path = r["_where"]
            require_fields([r], path, ("chosen", "rejected"))
            for side in ("chosen", "rejected"):
                if isinstance(r[side], list):
                    _check_messages(r[side], path, r, side)
            if _is_conversation(r["chosen"]) and _is_conversation(r["rejected"]):
                r["prompt"], r["chosen"], r["rejected"] = split_implicit_prompt(r["chosen"], r["rejected"], r["_where"])
            elif "prompt" not in r and opts.prompt_template is None:
                die(
                    f"{_where(path, r)}: missing field 'prompt' (or give 'chosen' and 'rejected' as whole conversations)"
                )
            apply_prompt_options(r, opts)
        return records

    def build(source: Source):
        path = source.name
        chunks = (prepare(c) for c in iter_records(source, opts))
        parts, n, kept, same, dropped, truncated = [], 0, 0, 0, 0, 0
        for results in _map_records(chunks, partial(_pair_example, tokenizer, max_length, path), num_proc, source):
            pairs = [pair for pair, status, _ in results if status == "ok"]
            n, kept = n + len(results), kept + len(pairs)
            same += sum(status == "same" for _, status, _ in results)
            dropped += sum(status == "dropped" for _, status, _ in results)
            truncated += sum(t for _, _, t in results)
            parts += [Examples.from_examples(pairs)] if pairs else []
        notes = (
            [f"warning: {path}: dropped {same} of {n} pairs whose chosen and rejected are identical"] if same else []
        )
        if truncated:
            notes.append(f"{path}: truncated {truncated} responses of {n} pairs to --max-length {max_length}")
        if dropped:
            notes.append(
                f"{path}: dropped {dropped} of {n} pairs whose responses --max-length {max_length} truncated away "
                "(no response token left, or the two sides identical once truncated)"
            )
        if not kept:
            die(f"{path}: no usable preference pairs (of {n})")
        return parts, notes

    return tokenized(spec, "pairs", tokenizer, max_length, opts, build, log)


def _pair_example(tokenizer, max_length: int, path: str, r: dict):
    """(pair, "ok" | "same" | "dropped", responses truncated) of one preference record."""
    prompt = _as_turns(r["prompt"], "user", path, r, "prompt")
    margin = r.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        die(f"{_where(path, r)}: field 'margin' must be a number, got {margin!r}")
    pair, truncated, full = {"margin": float(margin)}, 0, {}
    for side in ("chosen", "rejected"):
        response = _as_turns(r[side], "assistant", path, r, side)
        if not any(m["role"] == "assistant" for m in response):
            die(f"{_where(path, r)}: field '{side}' has no assistant message")
        try:
            ids, labels = tokenize_pair_side(tokenizer, prompt, response)
        except ValueError as e:
            die(f"{_where(path, r)}: {e}")
        truncated += len(ids) > max_length
        full[side] = ids
        pair[f"{side}_ids"], pair[f"{side}_labels"] = ids[:max_length], labels[:max_length]
    if full["chosen"] == full["rejected"]:  # identical as written, not only after truncation
        return None, "same", truncated
    if pair["chosen_ids"] == pair["rejected_ids"] or not all(
        any(x != IGNORE_INDEX for x in pair[f"{s}_labels"][1:]) for s in ("chosen", "rejected")
    ):
        return None, "dropped", truncated
    for key in ("chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"):
        pair[key] = np.asarray(pair[key], dtype=np.int32)
    return pair, "ok", truncated


# ----------------------------------------------------------------------------------------------------------------
# Batching. An optimizer step takes `batch_size` examples chosen by (seed, step) alone; it is then cut into
# micro-batches of `micro_batch_size`, length-sorted to waste little padding. So runs that differ only in
# micro-batch size see the same data, and the accumulated gradient is the one of the whole step.


def check_batch_sizes(batch_size: int, micro_batch_size: int, typed_batch_size: int | None = None) -> int:
    """grad_accum_steps = batch_size / micro_batch_size, or one clear error naming the flags. `batch_size` is this
    process's share of the batch the user asked for, `typed_batch_size` (under torchrun; default: the same), which
    the error names as typed. A micro-batch size at least the batch size means one forward/backward per step (the
    default 64 must not break a batch of 16)."""
    typed = typed_batch_size or batch_size
    flag = f"--batch-size {typed}" + (f" ({batch_size} per process)" if typed != batch_size else "")
    if batch_size < 1 or micro_batch_size < 1:
        die(f"{flag} and --micro-batch-size {micro_batch_size} must be positive")
    if micro_batch_size >= batch_size:
        return 1
    if batch_size % micro_batch_size:
        die(f"{flag} is not divisible by --micro-batch-size {micro_batch_size}")
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


class _Concat:
    """Several sequences indexed as one (without copying them)."""

    def __init__(self, parts: list):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        part = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[part][i - int(self.starts[part])]

    def __iter__(self):
        return (x for p in self.parts for x in p)


class Mixture:
    """The training sources of a run (`--dataset A B ...`) drawn in proportion to `--dataset-weights`.

    `items` is every source's examples, concatenated. Step `step` takes `batch_size` of them: with one source, the
    seeded epoch permutations of `step_indices`; with several, each slot's source is drawn from the weights, and
    each source is read through its own seeded epoch permutations from where its previous draws stopped. Like
    `step_indices` it depends only on (sources' sizes, weights, batch_size, step, seed), so a resumed run draws what
    the uninterrupted one would. `shares` is the realized share of each source over steps 0..step (logged as
    `data/share/<name>`)."""

    def __init__(self, parts: list[list], names: list[str], weights: list[float] | None = None):
        weights = list(weights) if weights is not None else [float(len(p)) for p in parts]  # default: by size
        check_weights(weights, len(parts))
        self.sizes = [len(p) for p in parts]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(parts))]
        self.items = parts[0] if len(parts) == 1 else _Concat(parts)
        self.weights = torch.tensor(weights, dtype=torch.float64) / sum(weights)
        stems = [Path(str(n).split("@")[0].split("[")[0]).stem or str(n) for n in names]
        self.names = [s if stems.count(s) == 1 else f"{s}_{i}" for i, s in enumerate(stems)]
        self._done = {}  # (batch_size, seed) -> (steps drawn, draws per source so far)

    def __len__(self) -> int:
        return len(self.items)

    def describe(self, opts: DataOptions | None = None) -> str:
        """One banner line: the sources, their sizes and weights, and the prompt options."""
        w = self.weights.tolist()
        sources = ", ".join(f"{n} ({k} examples, weight {x:.3g})" for n, k, x in zip(self.names, self.sizes, w))
        extra = opts.describe() if opts else ""
        return f"data: {sources}" + (f"  |  {extra}" if extra else "")

    def _sources(self, batch_size: int, step: int, seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step + 7)
        return torch.multinomial(self.weights, batch_size, replacement=True, generator=g).tolist()

    def _draws_before(self, batch_size: int, step: int, seed: int) -> list[int]:
        done, counts = self._done.get((batch_size, seed), (0, [0] * len(self.sizes)))
        if step < done:
            done, counts = 0, [0] * len(self.sizes)
        counts = list(counts)
        for s in range(done, step):
            for src in self._sources(batch_size, s, seed):
                counts[src] += 1
        self._done[(batch_size, seed)] = (step, tuple(counts))
        return counts

    def indices(self, batch_size: int, step: int, seed: int) -> list[int]:
        """Indices into `items` of optimizer step `step` (0-based)."""
        if len(self.sizes) == 1:
            return step_indices(self.sizes[0], batch_size, step, seed)
        counts = self._draws_before(batch_size, step, seed)
        out, perms = [], {}
        for src in self._sources(batch_size, step, seed):
            epoch, k = divmod(counts[src], self.sizes[src])
            if (src, epoch) not in perms:
                g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 101 + src)
                perms[(src, epoch)] = torch.randperm(self.sizes[src], generator=g).tolist()
            out.append(self.offsets[src] + perms[(src, epoch)][k])
            counts[src] += 1
        return out

    def shares(self, batch_size: int, step: int, seed: int) -> dict[str, float]:
        """`data/share/<name>`: each source's share of the examples drawn in steps 0..step; {} for one source."""
        if len(self.sizes) == 1:
            return {}
        counts = self._draws_before(batch_size, step + 1, seed)
        total = sum(counts)
        return {f"data/share/{n}": c / total for n, c in zip(self.names, counts)}


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad `input_ids` (and `labels` with IGNORE_INDEX) into (B, T) tensors with an attention mask."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.from_numpy(np.asarray(e["input_ids"], dtype=np.int64))  # lists or int32 arrays
        labels[i, :n] = torch.from_numpy(np.asarray(e["labels"], dtype=np.int64))
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def micro_batches(examples: list[dict], indices: list[int], micro_batch_size: int, pad_token_id: int) -> list[dict]:
    """The step's examples, longest first, cut into collated micro-batches."""
    chosen = sorted((examples[i] for i in indices), key=lambda e: -len(e["input_ids"]))
    return [collate(chosen[s : s + micro_batch_size], pad_token_id) for s in range(0, len(chosen), micro_batch_size)]


def pack_best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: items longest first, each into the open bin with the least room that still
    holds it (a new bin when none does). lengths (each <= capacity) -> bins of item indices, in order of creation."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins, room = [], []  # room: sorted (remaining capacity, bin index)
    for i in order:
        k = bisect.bisect_left(room, (lengths[i], -1))  # the first bin with remaining >= the item
        if k < len(room):
            remaining, b = room.pop(k)
        else:
            remaining, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        bisect.insort(room, (remaining - lengths[i], b))
    return bins


def packed_micro_batches(
    examples: list[dict], indices: list[int], micro_batch_size: int, max_length: int, pad_token_id: int
) -> list[dict]:
    """--packing: the step's examples packed into rows of at most `max_length` tokens (`pack_best_fit`),
    `micro_batch_size` rows a micro-batch. A row holds its examples back to back, then padding; `position_ids`
    restart at 0 at each example (and at the padding), which makes transformers attend within each example only
    (flash-attention's variable-length kernel on a GPU, a block-diagonal causal mask otherwise: exact either way),
    and each example's first label is IGNORE_INDEX (nothing predicts an example's first token, as in an unpacked
    row), so the loss tokens and their log-probs are those of the unpacked examples."""
    chosen = [examples[i] for i in indices]
    rows = []
    for b in pack_best_fit([len(e["input_ids"]) for e in chosen], max_length):
        ids = [np.asarray(chosen[j]["input_ids"], dtype=np.int64) for j in b]
        labels = [np.asarray(chosen[j]["labels"], dtype=np.int64).copy() for j in b]
        for lab in labels:
            lab[0] = IGNORE_INDEX
        rows.append((np.concatenate(ids), np.concatenate(labels), np.concatenate([np.arange(len(x)) for x in ids])))
    out = []
    for s in range(0, len(rows), micro_batch_size):
        chunk = rows[s : s + micro_batch_size]
        width = max(len(r[0]) for r in chunk)
        input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        position_ids = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (ids, lab, pos) in enumerate(chunk):
            n = len(ids)
            input_ids[i, :n], labels[i, :n], position_ids[i, :n] = map(torch.from_numpy, (ids, lab, pos))
            attention_mask[i, :n] = 1
            position_ids[i, n:] = torch.arange(width - n)  # the padding: a sequence of its own
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        out.append({**batch, "position_ids": position_ids})
    return out


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


def fit_rollout_prompts(
    train_sources: list[list[dict]], eval_records: list[dict], tokenizer, args, new_tokens: int | None = None
):
    """grpo/ppo/opd's prompts, made to fit: each `--dataset` source's prompts longer than `--max-prompt-length`
    (default: the model's context minus `--max-new-tokens`) dropped and counted, the evaluation prompts against
    the room their own answers need (`--eval-max-new-tokens`, default `--max-new-tokens`). `new_tokens`: the room
    after the prompt instead, for training and evaluation (grpo.py --env: --max-episode-tokens). Returns the
    training `Mixture` and the evaluation records that fit."""
    flag = "--max-episode-tokens" if new_tokens else "--max-new-tokens"
    max_prompt = prompt_budget(args.max_prompt_length, args.model, new_tokens or args.max_new_tokens, flag)
    train = Mixture(
        [fit_prompts(p, tokenizer, max_prompt, source) for p, source in zip(train_sources, args.dataset)],
        args.dataset,
        args.dataset_weights,
    )
    eval_new_tokens = new_tokens or args.eval_max_new_tokens or args.max_new_tokens
    eval_prompt = prompt_budget(args.max_prompt_length, args.model, eval_new_tokens, flag)
    return train, fit_prompts(eval_records, tokenizer, eval_prompt, "--eval-prompts")
