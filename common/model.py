"""Loading and saving models, tokenizers and training checkpoints.

`load_model` / `load_tokenizer` take a hub id or a local directory; `save_model` writes a Hugging Face
checkpoint atomically (temporary directory + rename); `save_checkpoint` / `load_checkpoint` add what
`--resume` needs (optimizer, scheduler, RNG, step).
"""

from __future__ import annotations

import math
import random
import re
import shutil
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from common import die, dist

hf_logging.disable_progress_bar()  # our own bar is the only one on the console


def default_device() -> torch.device:
    """This process's GPU (under torchrun, `common.dist.init` has made it LOCAL_RANK's), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` = bf16 on a CUDA device that supports it, else fp32 (fp16 training needs a loss scaler we don't ship)."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in table:
        die(f"--dtype {dtype!r} is not one of auto, {', '.join(table)}")
    return table[dtype]


def _check_source(name_or_path: str, what: str) -> None:
    """A path that looks local but does not exist gets a clear message instead of a hub lookup."""
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not Path(name_or_path).expanduser().is_dir():
        die(f"{what} {name_or_path!r}: no such directory")


def load_model(
    name_or_path: str,
    *,
    dtype: str = "auto",
    device: torch.device | str | None = None,
    gradient_checkpointing: bool = False,
    model_class=AutoModelForCausalLM,
    **kwargs,
) -> PreTrainedModel:
    """A causal LM (any `AutoModelForCausalLM` architecture) from a hub id or a local directory, on `device`."""
    _check_source(name_or_path, "--model")
    device = torch.device(device) if device is not None else default_device()
    torch_dtype = resolve_dtype(dtype, device)
    try:
        model = model_class.from_pretrained(name_or_path, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        die(
            f"cannot load model {name_or_path!r} (not a local checkpoint directory, and not loadable from the hub): "
            f"{reason}"
        )
    model.to(device)
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    return model


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer with a pad token guaranteed and left padding (what batched generation needs).

    Training batches are padded by `common.data.collate`, which does not depend on the padding side.
    """
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
    return tokenizer


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, out_dir: str | Path) -> Path:
    """Hugging Face format (safetensors + config + tokenizer), written to `out_dir.tmp` then renamed into place,
    so a crash never leaves a half-written checkpoint where a loader would find it. Under torchrun every rank
    calls it for a sharded model: its full state dict is gathered to rank 0, which alone writes (a plain model is
    written by rank 0, with no collective)."""
    out_dir = Path(out_dir)
    sharded = dist.is_sharded(model)
    state_dict = dist.full_state_dict(model) if sharded else None  # a collective
    if dist.is_main():
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
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
# Training checkpoints for --resume: runs/{run}/checkpoints/step_{N}/ = HF model + trainer_state.pt


def save_checkpoint(
    run_dir: Path, step: int, model, tokenizer, optimizer, scheduler, extra: dict | None = None, save_fn=None
) -> Path:
    """Write `checkpoints/step_{step}` atomically: the model in HF format (or whatever `save_fn(dir)` writes, e.g.
    only LoRA adapters) plus optimizer (unless None), scheduler and RNG state.

    Under torchrun (every rank calls it): the gathered model and `trainer_state.pt` come from rank 0, the sharded
    optimizer state from every rank (`optimizer/`, torch.distributed.checkpoint), each rank's RNG state in
    `rng_{rank}.pt`; resume with the same number of processes."""
    ckpt = Path(run_dir) / "checkpoints" / f"step_{step}"
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    if save_fn is not None:
        save_fn(tmp)
    else:
        save_model(model, tokenizer, tmp)
    dist.barrier()  # rank 0's model files are in place before the other ranks write theirs
    sharded = dist.is_sharded(model)
    if sharded and optimizer is not None:
        dist.save_optimizer(model, optimizer, tmp / "optimizer")
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
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng,
            "extra": extra or {},
        }
        torch.save(state, tmp / "trainer_state.pt")
    dist.barrier()
    if dist.is_main():
        shutil.rmtree(ckpt, ignore_errors=True)
        tmp.rename(ckpt)
    dist.barrier()
    return ckpt


def find_checkpoint(path: str | Path) -> Path:
    """`path` is a checkpoint directory (has trainer_state.pt) or a run directory: its newest `checkpoints/step_N`."""
    path = Path(path)
    if (path / "trainer_state.pt").is_file():
        return path
    steps = []
    for d in (path / "checkpoints").glob("step_*"):
        m = re.fullmatch(r"step_(\d+)", d.name)
        if m and (d / "trainer_state.pt").is_file():
            steps.append((int(m.group(1)), d))
    if not steps:
        die(
            f"--resume {str(path)!r}: no checkpoint found (expected a run directory with checkpoints/step_N/ "
            "or a checkpoint directory with trainer_state.pt)"
        )
    return max(steps)[1]


def load_trainer_state(ckpt: Path, optimizer, scheduler, model=None) -> dict:
    """Restore optimizer, scheduler and RNG from `ckpt` (the weights are loaded with `load_model(ckpt)`);
    returns the trainer state: `step` and the script's `extra`. A sharded model (`model`, under torchrun) reads
    its optimizer shard; the checkpoint must come from the same number of processes."""
    state = torch.load(Path(ckpt) / "trainer_state.pt", weights_only=False)
    saved_world = state.get("world_size", 1)
    if saved_world != dist.world_size():
        die(
            f"--resume {str(ckpt)!r} was written by {saved_world} process(es); resume it with the same number "
            f"(this run has {dist.world_size()})"
        )
    if state["optimizer"] is None:
        if not (Path(ckpt) / "optimizer").is_dir():
            die(f"--resume {str(ckpt)!r}: the checkpoint has no optimizer state (it was written for evaluation only)")
        dist.load_optimizer(model, optimizer, Path(ckpt) / "optimizer")
    else:
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
