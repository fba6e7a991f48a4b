"""Loading and saving models, tokenizers and training checkpoints.

`load_model` / `load_tokenizer` take a hub id or a local directory; `save_model` writes a Hugging Face
checkpoint atomically (temporary directory + rename); `save_checkpoint` / `load_checkpoint` add what
`--resume` needs (optimizer, scheduler, RNG, step).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from common import die, dist

hf_logging.disable_progress_bar()  # our own bar is the only one on the console


def default_device() -> torch.device:
    """This process's GPU (under torchrun, `common.dist.init` has made it LOCAL_RANK's), else the CPU. On a GPU,
    fp32 matmuls may use TF32 (what every fp32 path of a trainer wants; bf16 compute is unaffected)."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
PURE_DTYPES = {"pure-bf16": torch.bfloat16, "pure-bfloat16": torch.bfloat16}
DTYPE_HELP = (
    "auto (bf16 compute with fp32 master weights on a GPU with native bf16, else fp32) | float32 | bfloat16 "
    "(bf16 compute, fp32 master weights, optimizer state and gradients, also on a CPU) | pure-bf16 (weights, "
    "gradients and AdamW state all in bf16: 8 instead of 16 bytes a parameter, but updates below half a bf16 ulp "
    "of a weight are lost)"
)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The compute dtype: `auto` = bf16 on a CUDA device with native bf16 (not emulated), else fp32 (fp16
    training needs a loss scaler we don't ship). `pure-bf16` computes in bf16 too (see `is_pure`)."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16
        return torch.float32
    if dtype in PURE_DTYPES:
        return PURE_DTYPES[dtype]
    if dtype not in DTYPES:
        die(f"--dtype {dtype!r} is not one of auto, {', '.join([*DTYPES, *PURE_DTYPES])}")
    return DTYPES[dtype]


def is_pure(dtype: str) -> bool:
    """`--dtype pure-bf16`: a trained model keeps its weights and optimizer state in bf16 (no fp32 master copy)."""
    return dtype in PURE_DTYPES


def disk_dtype(model) -> torch.dtype:
    """The dtype the checkpoint was stored in (what `save_model` writes again); the model's own dtype if unknown."""
    return getattr(model, "_cleanpost_disk_dtype", None) or next(model.parameters()).dtype


def _config_dtype(name_or_path: str, **kwargs) -> torch.dtype | None:
    """The dtype a checkpoint declares in its config (`dtype`, formerly `torch_dtype`), or None."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path, **{k: v for k, v in kwargs.items() if k == "revision"})
    except (OSError, ValueError):
        return None
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off in every module and in the attention kernels (config `*dropout*` rates read at forward time),
    as peers do for policies, references and value models: the log-probs of a training forward are then those of
    the same function that sampled (and the ratio of unchanged weights is exactly 1)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for attr in ("attention_dropout", "dropout", "attn_dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
    configs = [model.config] + [getattr(model.config, k) for k in ("text_config",) if hasattr(model.config, k)]
    for cfg in configs:
        for key, value in list(vars(cfg).items()):
            if "dropout" in key and isinstance(value, float):
                setattr(cfg, key, 0.0)


@functools.cache
def _check_source(name_or_path: str, what: str) -> None:
    """A `--model` that is not an existing directory must be a hub id that is cached or that the hub has: a typo
    (`runs/typo`, `my-model-dir`) gets one line saying there is no such directory, in seconds, instead of a minute
    of hub retries and a message about the hub."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or path.exists()
    if looks_local:
        die(f"{what} {name_or_path!r}: no such directory")
    import huggingface_hub
    from huggingface_hub.utils import HFValidationError

    try:
        if isinstance(huggingface_hub.try_to_load_from_cache(name_or_path, "config.json"), str):
            return  # in the local hub cache
    except HFValidationError:
        die(f"{what} {name_or_path!r}: no such directory (and not a valid hub id)")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        die(f"{what} {name_or_path!r}: no such directory, and not in the local hub cache (HF_HUB_OFFLINE is set)")
    try:
        huggingface_hub.model_info(name_or_path, timeout=10)
    except huggingface_hub.errors.GatedRepoError:  # (a subclass of the next one)
        return  # transformers says how to get access
    except huggingface_hub.errors.RepositoryNotFoundError:
        die(f"{what} {name_or_path!r}: no such directory, and no such model on the hub (or it is private: log in)")
    except Exception as e:  # noqa: BLE001 -- offline, DNS, proxy, timeout: the hub cannot answer
        die(
            f"{what} {name_or_path!r}: no such directory, not in the local hub cache, and the hub cannot be reached "
            f"({type(e).__name__})"
        )


def load_model(
    name_or_path: str,
    *,
    dtype: str = "auto",
    device: torch.device | str | None = None,
    gradient_checkpointing: bool = False,
    model_class=AutoModelForCausalLM,
    attn_implementation: str | None = None,
    on_host: bool = False,
    sharded_load: bool = False,
    **kwargs,
) -> PreTrainedModel:
    """A causal LM (any `AutoModelForCausalLM` architecture) from a hub id or a local directory, on `device`, in
    the compute dtype of `dtype` (see `resolve_dtype`), dropout off. A trained model gets its fp32 master weights
    from `common.dist.wrap`; `save_model` writes it back in the checkpoint's own dtype (`disk_dtype`).
    `on_host`: leave it in host memory, in `device`'s compute dtype, for the caller to move (lora.py quantizes
    layer by layer on the way to the accelerator).

    `sharded_load` (for a model that `common.dist.wrap` places next): under torchrun the model is built on the meta
    device and its weights are left to `wrap`, which reads from the safetensors files only the rows of each tensor
    that this process's FSDP2 shard holds (see `_deferred_load`). No process ever holds the whole model, so a
    model that fits only when sharded loads at all. Nothing may touch the weights between the two calls. One
    process, or a checkpoint this reader cannot map onto the model: an ordinary load."""
    _check_source(name_or_path, "--model")
    device = torch.device(device) if device is not None else default_device()
    torch_dtype = resolve_dtype(dtype, device)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = None  # on the meta device, its weights left to dist.wrap, when sharded loading applies
    if sharded_load and dist.world_size() > 1 and not on_host:
        model = _deferred_load(name_or_path, model_class, torch_dtype, device, kwargs)
    deferred = model is not None
    if not deferred:
        try:
            model = model_class.from_pretrained(name_or_path, dtype=torch_dtype, **kwargs)
        except (OSError, ValueError, ImportError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if attn_implementation and "attn" in str(e).lower():
                die(f"--attn-implementation {attn_implementation!r} cannot be used with {name_or_path!r}: {reason}")
            die(
                f"cannot load model {name_or_path!r} (not a local checkpoint directory, and not loadable from the "
                f"hub): {reason}"
            )
    model._cleanpost_disk_dtype = _config_dtype(name_or_path, **kwargs) or torch_dtype
    model._cleanpost_pure = is_pure(dtype)
    disable_dropout(model)
    if not (on_host or deferred):
        model.to(device)
    if model_class is AutoModelForCausalLM:  # every script computes log-probs through the fused head
        if deferred:
            model._cleanpost_check_head = name_or_path  # checked by `wrap` once the weights are there
        else:
            from common.logprobs import check_fused_head

            check_fused_head(model, name_or_path)
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    return model


# ----------------------------------------------------------------------------------------------------------------
# Sharded loading under torchrun: build on the meta device, shard, then read each process's rows of each tensor

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsReader:
    """Tensors of a (possibly multi-file) safetensors checkpoint read by rows with plain file reads: `rows(name,
    start, stop)` costs the bytes of those rows and nothing else (no memory map, whose touched pages would count
    in this process's memory until it is closed). The format: 8 bytes of header length, a JSON header giving each
    tensor's dtype, shape and byte range in the data that follows."""

    def __init__(self, files: list[Path]):
        self.entries = {}  # name -> (file, absolute byte offset, dtype, shape)
        for file in files:
            with open(file, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_len))
            header.pop("__metadata__", None)
            for name, entry in header.items():
                dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
                begin = 8 + header_len + entry["data_offsets"][0]
                self.entries[name] = (file, begin, dtype, tuple(entry["shape"]))

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][3]

    def dtype(self, name: str) -> torch.dtype | None:
        return self.entries[name][2]

    def rows(self, name: str, start: int = 0, stop: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) along the first dimension (the whole tensor by default; a 0-d tensor whole), read into
        `out` when given (a contiguous host tensor of the stored dtype and the rows' shape)."""
        file, begin, dtype, shape = self.entries[name]
        if not shape:
            start, stop, row_shape = 0, 1, ()
        else:
            stop = shape[0] if stop is None else stop
            row_shape = shape[1:]
        row_bytes = math.prod(row_shape) * dtype.itemsize
        out = (
            torch.empty((stop - start, *row_shape), dtype=dtype) if out is None else out.view(stop - start, *row_shape)
        )
        if out.numel():
            with open(file, "rb") as f:
                f.seek(begin + start * row_bytes)
                f.readinto(out.detach().view(torch.uint8).numpy().reshape(-1))
        return out.reshape(shape) if not shape else out


def _checkpoint_files(name_or_path: str, revision: str | None) -> list[Path] | None:
    """The safetensors files of a checkpoint (a local directory or a hub id, fetched into the hub cache), or None
    when it has none (a `.bin` checkpoint)."""
    from transformers.utils import cached_file

    def fetch(filename):
        path = Path(name_or_path) / filename
        if Path(name_or_path).is_dir():
            return path if path.is_file() else None
        found = cached_file(name_or_path, filename, revision=revision, _raise_exceptions_for_missing_entries=False)
        return Path(found) if found else None

    index = fetch("model.safetensors.index.json")
    if index is not None:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [fetch(s) for s in shards]
        return files if all(files) else None
    single = fetch("model.safetensors")
    return [single] if single else None


@contextlib.contextmanager
def _parameters_on_meta():
    """Build modules with their parameters on the meta device (no memory, no initialization) and their buffers
    real: the non-persistent ones (rotary frequencies) are computed by the model's own code and are not in any
    checkpoint."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _deferred_load(name_or_path: str, model_class, torch_dtype, device, kwargs) -> PreTrainedModel | None:
    """The model on the meta device with `model._cleanpost_load_weights` set, or None when the checkpoint is not
    one we can read shard by shard (then the caller loads it whole): no safetensors files, a quantized or
    fp32-pinned model, or a tensor of the model's body missing from the checkpoint or shaped differently (a
    checkpoint transformers converts on load, e.g. fused MoE experts). Parameters outside the body that the
    checkpoint lacks (a sequence-classification `score` head on a causal-LM checkpoint) are initialized here as
    `from_pretrained` does, by the model's own `_init_weights` from the same random state."""
    from transformers import AutoConfig

    config_kwargs = {k: v for k, v in kwargs.items() if k != "attn_implementation"}
    try:
        config = AutoConfig.from_pretrained(name_or_path, **config_kwargs)
        files = _checkpoint_files(name_or_path, kwargs.get("revision"))
    except (OSError, ValueError):
        return None  # the ordinary load says what is wrong
    if files is None or getattr(config, "quantization_config", None) is not None:
        return None
    reader = SafetensorsReader(files)
    with _parameters_on_meta():
        model = model_class.from_config(
            config, dtype=torch_dtype, attn_implementation=kwargs.get("attn_implementation")
        )
    model.tie_weights()
    if model.can_generate():  # what from_pretrained reads beside the weights: generation_config.json (eos ids)
        from transformers import GenerationConfig

        with contextlib.suppress(OSError):
            revision = {k: v for k, v in kwargs.items() if k == "revision"}
            model.generation_config = GenerationConfig.from_pretrained(name_or_path, **revision)
    if model._keep_in_fp32_modules or getattr(model, "_keep_in_fp32_modules_strict", None):
        return None
    prefix = model.base_model_prefix
    sources = {}  # parameter name -> checkpoint name, or a full tensor initialized here
    missing_modules = {}
    for name, param in model.named_parameters():
        candidates = [name, name.removeprefix(prefix + "."), f"{prefix}.{name}"]
        found = next((c for c in candidates if c in reader.entries), None)
        if found is not None and reader.shape(found) == tuple(param.shape) and reader.dtype(found) is not None:
            sources[name] = found
        elif name.startswith(prefix + ".") or found is not None:
            return None  # the body does not match the checkpoint as stored: transformers maps it
        else:
            module_name = name.rpartition(".")[0]
            missing_modules[module_name] = model.get_submodule(module_name)
    for module_name, module in missing_modules.items():  # the same draws as from_pretrained's missing-key init
        fresh = copy.deepcopy(module).to_empty(device="cpu")
        model._init_weights(fresh)
        for pname, p in fresh.named_parameters(recurse=False):
            sources[f"{module_name}.{pname}" if module_name else pname] = p.detach()
    buffers = {n for n, _ in model.named_buffers()}
    checkpoint_buffers = {n: c for n in buffers for c in (n, n.removeprefix(prefix + ".")) if c in reader.entries}
    model._cleanpost_load_weights = functools.partial(
        _load_shards, reader=reader, sources=sources, buffers=checkpoint_buffers, dtype=torch_dtype, device=device
    )
    return model


@torch.no_grad()
def _load_shards(model, *, reader, sources, buffers, dtype, device) -> None:
    """Give a model built by `_deferred_load` (and since sharded by `common.dist.wrap`, or not) its weights: each
    FSDP2 parameter (a DTensor sharded on dim 0, rank r holding rows [r * ceil(n / N), ...)) gets only its rows,
    read in the checkpoint's dtype, rounded to the compute dtype and stored in the parameter's own (fp32 for the
    master weights of mixed precision), exactly what a whole load followed by `wrap` holds. Buffers keep the
    values the model's code computed, or the checkpoint's where it has them."""
    from torch.distributed.tensor import DTensor, Shard

    kept = {n: b.detach().to(device, copy=True) for n, b in model.named_buffers()}
    model.to_empty(device=device)
    if not dist.is_sharded(model):
        model.tie_weights()  # to_empty gave a plain model new parameters (FSDP2 keeps a tied one tied)
    for name, b in model.named_buffers():
        b.copy_(reader.rows(buffers[name]) if name in buffers else kept[name])
    for name, param in model.named_parameters():
        local, start = param, 0
        if isinstance(param, DTensor):
            local = param.to_local()
            if any(p.is_shard() for p in param.placements):
                if param.placements != (Shard(0),):
                    raise NotImplementedError(f"{name}: placement {param.placements} (only FSDP2's Shard(0))")
                start = dist.rank() * math.ceil(param.shape[0] / dist.world_size())
        stop = start + (local.shape[0] if local.dim() else 1)
        source = sources[name]
        if not isinstance(source, str):  # initialized by `_deferred_load`
            local.copy_(source.reshape(-1, *source.shape[1:])[start:stop].reshape(local.shape))
        elif local.device.type == "cpu" and local.is_contiguous() and local.dtype == dtype == reader.dtype(source):
            reader.rows(source, start, stop, out=local)  # straight into the shard: no copy
        else:  # rounded to the compute dtype first, as a whole load in that dtype would be
            local.copy_(reader.rows(source, start, stop).to(device).to(dtype).reshape(local.shape))


def load_tokenizer(name_or_path: str, chat_template_kwargs: str | dict | None = None) -> PreTrainedTokenizerBase:
    """The model's tokenizer with a pad token guaranteed and left padding (what batched generation needs).

    `chat_template_kwargs` (`--chat-template-kwargs`, JSON or a dict, e.g. {"enable_thinking": false} for Qwen3)
    are passed to every rendering of the chat template (`common.data.apply_template`): training data, prompts and
    evaluation alike. Training batches are padded by `common.data.collate`, whatever the padding side.
    """
    if isinstance(chat_template_kwargs, str):
        try:
            chat_template_kwargs = json.loads(chat_template_kwargs) if chat_template_kwargs.strip() else {}
        except json.JSONDecodeError as e:
            die(f"--chat-template-kwargs is not valid JSON ({e.msg} at column {e.colno}): {chat_template_kwargs!r}")
        if not isinstance(chat_template_kwargs, dict):
            die("--chat-template-kwargs must be a JSON object, e.g. '{\"enable_thinking\": false}'")
    _check_source(name_or_path, "--model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        die(f"cannot load the tokenizer of {name_or_path!r}: {reason}")
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            die(f"tokenizer of {name_or_path!r} has neither a pad, an eos nor an unk token to pad with")
        warnings.warn(f"tokenizer of {name_or_path!r} has no pad token; padding with {fallback!r} (masked out)")
        tokenizer.pad_token = fallback
    tokenizer.padding_side = "left"
    tokenizer.cleanpost_template_kwargs = dict(chat_template_kwargs or {})
    return tokenizer


def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, out_dir: str | Path, *, sync: bool = True
) -> Path:
    """Hugging Face format (safetensors + config + tokenizer) in the checkpoint's own dtype (`disk_dtype`: a bf16
    model trained from fp32 master weights is written in bf16 again), written to `out_dir.tmp` then renamed into
    place, so a crash never leaves a half-written checkpoint where a loader would find it. For a sharded model
    (FSDP2, see `common.dist.wrap`) every rank calls it: its full state dict is gathered to rank 0, which alone
    writes (a plain model is written by rank 0, with no collective). `sync=False` skips the fsync for a caller that
    syncs the whole directory itself (`save_checkpoint`, which would otherwise flush the weights twice)."""
    out_dir = Path(out_dir)
    sharded = dist.is_sharded(model)
    state_dict = dist.full_state_dict(model) if sharded else None  # a collective
    if dist.is_main():
        target = disk_dtype(model)
        if state_dict is None and any(p.dtype != target and p.is_floating_point() for p in model.parameters()):
            state_dict = model.state_dict()
        if state_dict is not None:
            cast = {}  # by storage, so tied weights (an LM head sharing the embedding) stay one tensor
            for v in state_dict.values():
                if v.is_floating_point() and v.data_ptr() not in cast:
                    cast[v.data_ptr()] = v.to(target)
            state_dict = {k: cast.get(v.data_ptr(), v) if v.is_floating_point() else v for k, v in state_dict.items()}
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        config_file = tmp / "config.json"  # save_pretrained records the parameters' dtype (fp32 masters)
        config = json.loads(config_file.read_text())
        if config.get("dtype") != str(target).removeprefix("torch."):
            config["dtype"] = str(target).removeprefix("torch.")
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if sync:
            _fsync_tree(tmp)
        _replace(tmp, out_dir)
    if sharded:
        dist.barrier()
    return out_dir


def _replace(tmp: Path, out_dir: Path) -> None:
    """Move the finished `tmp` directory to `out_dir`, replacing an older one."""
    old = out_dir.with_name(out_dir.name + ".old")
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# A frozen model kept in host memory between uses (the KL probe's initial policy)


def offload_to_host(model):
    """Move a frozen model's weights to host memory (pinned when a GPU is there, so they stream back at full PCIe
    speed); `on_device` brings them to the accelerator for a while. Returns the model."""
    pin = torch.cuda.is_available()
    for t in [*model.parameters(), *model.buffers()]:
        t.data = t.data.cpu().pin_memory() if pin else t.data.cpu()
    return model


@contextlib.contextmanager
def on_device(model, device: torch.device):
    """The weights of an `offload_to_host` model on `device` for the duration (one copy in, none back: the model is
    frozen, so the host copy stays valid); the accelerator memory is released on exit."""
    tensors = [*model.parameters(), *model.buffers()]
    host = [t.data for t in tensors]
    for t, h in zip(tensors, host):
        t.data = h.to(device, non_blocking=True)
    try:
        yield model
    finally:
        for t, h in zip(tensors, host):
            t.data = h


# ----------------------------------------------------------------------------------------------------------------
# Training checkpoints for --resume: runs/{run}/checkpoints/step_{N}/ = HF model + trainer_state.pt


def save_checkpoint(
    run_dir: Path,
    step: int,
    model,
    tokenizer,
    optimizer,
    scheduler,
    extra: dict | None = None,
    save_fn=None,
    state_model=None,
) -> Path:
    """Write `checkpoints/step_{step}` atomically: the model in HF format in its checkpoint dtype (or whatever
    `save_fn(dir)` writes, e.g. only LoRA adapters) plus what `--resume` needs to continue the same run: the
    trained weights at full precision (the fp32 master weights, not their bf16 rounding), optimizer state (unless
    None), scheduler and RNG state.

    A sharded model (FSDP2: every mixed-precision run and every run under torchrun; every rank calls this): the
    gathered HF model and `trainer_state.pt` come from rank 0; the fp32 master weights and optimizer state are
    written shard by shard by every rank (`train_state/`, torch.distributed.checkpoint); each rank's RNG state
    goes to `rng_{rank}.pt`. Resume with the same number of processes.

    `state_model`: the modules the optimizer trains when they are more than `model` (ppo.py: a ModuleDict of the
    policy and the value model, whose files `save_fn` writes); their full-precision weights and optimizer state
    are what `load_trainer_state(..., model=state_model)` restores."""
    state_model = model if state_model is None else state_model
    ckpt = Path(run_dir) / "checkpoints" / f"step_{step}"
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    if save_fn is not None:
        save_fn(tmp)
    else:
        save_model(model, tokenizer, tmp, sync=False)  # synced below with the rest of the checkpoint
    dist.barrier()  # rank 0's model files are in place before the other ranks write theirs
    sharded = dist.is_sharded(model)
    if sharded and optimizer is not None:
        dist.save_train_state(state_model, optimizer, tmp / "train_state")
    master = None  # a plain model trained in a wider dtype than its checkpoint's keeps that precision for --resume
    parts = list(state_model.values()) if isinstance(state_model, torch.nn.ModuleDict) else [state_model]
    wider = any(p.dtype != disk_dtype(m) for m in parts for p in m.parameters())
    if not sharded and (save_fn is None or state_model is not model) and wider:
        master = {k: v.detach().cpu() for k, v in state_model.state_dict().items()}
    rng = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    if dist.world_size() > 1:
        torch.save(rng, tmp / f"rng_{dist.rank()}.pt")
    if dist.is_main():
        state = {
            "step": step,
            "world_size": dist.world_size(),
            "optimizer": None if sharded or optimizer is None else optimizer.state_dict(),
            "master_weights": master,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng,
            "extra": extra or {},
        }
        torch.save(state, tmp / "trainer_state.pt")
    dist.barrier()
    if dist.is_main():
        _fsync_tree(tmp)  # every file on disk before the name says the checkpoint is complete
        _slow_write_for_tests(tmp)
        shutil.rmtree(ckpt, ignore_errors=True)
        tmp.rename(ckpt)
        _fsync_dir(ckpt.parent)
    dist.barrier()
    return ckpt


def _fsync_tree(root: Path) -> None:
    for f in sorted(root.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(root)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some systems (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _slow_write_for_tests(tmp: Path) -> None:
    """`CLEANPOST_TEST_CHECKPOINT_PAUSE=step_N:S`: when writing checkpoint step_N, create `step_N.tmp/WRITING` and
    sleep S seconds before the rename, so a test can kill the run inside the write (tests/test_invariance.py)."""
    name, _, pause = os.environ.get("CLEANPOST_TEST_CHECKPOINT_PAUSE", "").partition(":")
    if name and tmp.name == f"{name}.tmp":
        (tmp / "WRITING").touch()
        time.sleep(float(pause))
        (tmp / "WRITING").unlink()


def find_checkpoint(path: str | Path) -> Path:
    """`path` is a checkpoint directory (has trainer_state.pt) or a run directory: its newest complete
    `checkpoints/step_N`, said in one line. A checkpoint becomes `step_N` only once complete (`save_checkpoint`
    writes `step_N.tmp`, syncs it to disk and renames it), so a `.tmp` left by a killed run is never resumed from:
    it is named in one line and ignored."""
    path = Path(path)
    if (path / "trainer_state.pt").is_file():
        return path
    steps, partial = [], []
    for d in (path / "checkpoints").glob("step_*"):
        m = re.fullmatch(r"step_(\d+)", d.name)
        if m and (d / "trainer_state.pt").is_file():
            steps.append((int(m.group(1)), d))
        elif d.is_dir():
            partial.append(d.name)
    if partial and dist.is_main():
        print(f"resume: ignoring incomplete checkpoint(s) {', '.join(sorted(partial))} (a write that did not finish)")
    if not steps:
        die(
            f"--resume {str(path)!r}: no checkpoint found (expected a run directory with checkpoints/step_N/ "
            "or a checkpoint directory with trainer_state.pt; write them with --save-every N)"
        )
    step, newest = max(steps)
    if dist.is_main():
        print(f"resume: from {newest} (the newest complete checkpoint, step {step})")
    return newest


def load_trainer_state(ckpt: Path, optimizer, scheduler, model=None) -> dict:
    """Restore the full-precision weights of `model` (loaded before with `load_model(ckpt)`, in the checkpoint's
    dtype, and wrapped), optimizer, scheduler and RNG from `ckpt`; returns the trainer state: `step` and the
    script's `extra`. A sharded model reads its own shard of the master weights and optimizer state; the
    checkpoint must come from the same number of processes."""
    state = torch.load(Path(ckpt) / "trainer_state.pt", weights_only=False)
    saved_world = state.get("world_size", 1)
    if saved_world != dist.world_size():
        die(
            f"--resume {str(ckpt)!r} was written by {saved_world} process(es); resume it with the same number "
            f"(this run has {dist.world_size()})"
        )
    parts = list(model.values()) if isinstance(model, torch.nn.ModuleDict) else [model]
    sharded = model is not None and dist.is_sharded(parts[0])
    if state["optimizer"] is None:
        if not sharded or not (Path(ckpt) / "train_state").is_dir():
            die(
                f"--resume {str(ckpt)!r}: the checkpoint has no optimizer state for this run (written for evaluation "
                "only, or by a run of another precision: resume with the same --dtype)"
            )
        dist.load_train_state(model, optimizer, Path(ckpt) / "train_state")
    else:
        if sharded:
            die(f"--resume {str(ckpt)!r} was written by an unsharded fp32 run: resume it with the same --dtype")
        if state.get("master_weights") is not None and model is not None:
            model.load_state_dict(state["master_weights"])
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    rng = torch.load(Path(ckpt) / f"rng_{dist.rank()}.pt", weights_only=False) if saved_world > 1 else state["rng"]
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


# ----------------------------------------------------------------------------------------------------------------
# The learning-rate schedule every script uses (LambdaLR multiplier)


def lr_lambda(step: int, warmup_steps: int, max_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at `step` (for LambdaLR): linear warmup over `warmup_steps`, then
    cosine or linear decay to 0 at `max_steps`, or constant."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "linear":
        return max(0.0, 1 - progress)
    return 1.0


def last_token_scores(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar scores of a one-label `AutoModelForSequenceClassification` (reward or value model), read at each row's
    last attended token whatever the padding side: (B, T) -> (B,) fp32.

    Uses the attention mask, not `config.pad_token_id` (transformers' own pooling), so a pad token that equals the
    EOS token inside a sequence cannot move the read-out position. Naive equivalent with right padding:
        model(input_ids, attention_mask=attention_mask).logits[arange(B), attention_mask.sum(-1) - 1, 0]"""
    return dist.root_forward(model, _last_token_scores, input_ids, attention_mask)


def _last_token_scores(model, input_ids, attention_mask):
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    hidden = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state  # (B, T, H)
    last = attention_mask.shape[1] - 1 - attention_mask.long().flip(-1).argmax(-1)  # (B,) index of the last 1
    head = model.score if hasattr(model, "score") else model.classifier
    return head(hidden[torch.arange(len(last), device=hidden.device), last]).squeeze(-1).float()
