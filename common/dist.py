"""Data parallelism under torchrun: the process group, rank helpers, FSDP2 sharding, reductions, rank-0 I/O.

    python sft.py ...                               # one process: everything here is a no-op
    torchrun --nproc_per_node=8 sft.py ...          # 8 processes, one per GPU (gloo on CPU, NCCL on CUDA)

The scripts call the same functions either way. With more than one process:
- `init()` joins the process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...).
- `wrap(model, train=True)` shards a trained model with FSDP2 (`fully_shard` on every transformer block, then on
  the root); on CUDA a bf16/fp32 model trains from fp32 master weights with bf16 compute and fp32 gradient
  reduction. Gradients are *summed* across ranks (not averaged): each rank divides its loss by the global
  normalizer (`all_reduce`d before backward), so N ranks take the same step as one process on the same batch.
- A model loaded with `common.model.load_model(..., sharded_load=True)` is still on the meta device: `wrap` shards
  it, then each rank reads only its shards' rows from the checkpoint (no rank ever holds the whole model).
- `wrap(model, train=False, shard=...)` places a frozen model (reference, teacher, reward model): a full copy
  per rank (`shard=False`, no communication) or FSDP2-sharded (1/N of the memory, an all-gather per forward).
- `root_forward(model, fn, ...)` runs `fn(model, ...)` as the model's forward: FSDP gathers the root's own
  parameters (embeddings, final norm, LM head) around it. Our fused log-prob code calls the model body and reads
  the head weight itself, so it must run inside this.
- `unsharded(model)` gathers every parameter once for generation and evaluation: forward passes inside it do no
  communication, so ranks may run different numbers of them (different prompts, different lengths).
- Every FSDP forward outside `unsharded` is a collective: all ranks must run the same number of them, which is
  why every rank gets an equal share of each step.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import types

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """Join the process group when started by torchrun with more than one process (else nothing)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    else:
        dist.init_process_group("gloo")
    atexit.register(close)


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce(values, op: str = "sum"):
    """Sum (or max/min) a number, a list of numbers or a tensor over all ranks; returns the same kind (floats for
    numbers, computed in float64)."""
    if world_size() == 1:
        return values
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    if isinstance(values, torch.Tensor):
        t = values.detach().to(_comm_device()).clone()
        dist.all_reduce(t, op=reduce_op)
        return t.to(values.device)
    scalar = not isinstance(values, (list, tuple))
    t = torch.tensor([values] if scalar else list(values), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=reduce_op)
    out = t.cpu().tolist()
    return out[0] if scalar else out


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of x over mask == 1 on every rank's tensors (one process: `x[mask.bool()].mean()`)."""
    total, count = all_reduce([float((x * mask).sum()), float(mask.sum())])
    return total / max(count, 1.0)


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 the tensors of all ranks, in rank order (the first dimension may differ)."""
    if world_size() == 1:
        return tensor
    t = tensor.detach().to(_comm_device()).contiguous()
    sizes = [int(n) for n in all_reduce([t.shape[0] if r == rank() else 0 for r in range(world_size())])]
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(tensor.device)


def broadcast_object(obj):
    """Rank 0's value of `obj` on every rank (e.g. a run name containing the time)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def local_slice(n: int, what: str = "--batch-size") -> slice:
    """This rank's contiguous share of n items (rank r takes [r n/N, (r+1) n/N)); n must divide evenly."""
    w = world_size()
    if n % w:
        from common import die

        die(f"{what} ({n}) must be divisible by the number of processes ({w})")
    k = n // w
    return slice(rank() * k, (rank() + 1) * k)


def strided(items: list) -> list:
    """This rank's share of a list for evaluation: items r, r+N, r+2N, ... (shares differ by at most one)."""
    return items[rank() :: world_size()]


# ----------------------------------------------------------------------------------------------------------------
# FSDP2


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def transformer_blocks(model) -> list[torch.nn.Module]:
    """The repeated decoder layers: the classes transformers marks `_no_split_modules`, else the longest
    `nn.ModuleList`."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
        blocks = list(max(lists, key=len)) if lists else []
    return blocks


def _call(self, fn, *args, **kwargs):
    out = fn(self, *args, **kwargs)
    # FSDP hooks its pre-backward on the outputs; an output that is a view could lose it to an in-place op
    return torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.clone() if t._base is not None else t, out)


def _ensure_process_group() -> None:
    """A process group of one for a single process (FSDP2 needs a mesh even then): an in-memory store, no network."""
    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=device)
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    atexit.register(close)


def wrap(model, *, train: bool, shard: bool = True, mixed_precision: bool = True):
    """Place a model for training or inference; returns it (the same object).

    A trained model whose compute dtype is bf16/fp16 (e.g. `--dtype auto` on a GPU) trains in mixed precision:
    fp32 master weights and AdamW state, bf16 compute, fp32 gradients, accumulated over micro-batches and reduced
    in fp32. That is FSDP2's `MixedPrecisionPolicy`, used for one process (on a one-process mesh) exactly as for N,
    so one process and N take the same step. The upcast happens block by block after that block is sharded, so
    no GPU ever holds the whole model in fp32 (only its shard). Exceptions, kept in their own dtype:
    `mixed_precision=False` (LoRA: a frozen bf16 base with fp32 adapters) and a model loaded with
    `--dtype pure-bf16` (`model._cleanpost_pure`: bf16 weights and AdamW state, what it costs is printed).

    A trained fp32 model: unchanged with one process, FSDP2-sharded under torchrun. A frozen model (reference,
    teacher, reward model) stays in its compute dtype: a full copy per rank (`shard=False`, no communication) or
    FSDP2-sharded (`shard=True`: 1/N of the memory, an all-gather per forward)."""
    low_precision = next(model.parameters()).dtype in (torch.bfloat16, torch.float16)
    pure = getattr(model, "_cleanpost_pure", False)
    mixed = train and low_precision and mixed_precision and not pure
    if train and low_precision and pure and is_main():
        print(
            "pure bf16 training (--dtype pure-bf16): weights, gradients and AdamW state in bf16 (8 bytes a parameter "
            "instead of 16); updates smaller than half a bf16 ulp of a weight (|w| * 2^-9, e.g. lr 1e-5 on a weight "
            "of 0.02) are lost, and gradients accumulate in bf16"
        )
    if not mixed and (world_size() == 1 or not (train or shard)):
        return _load_weights(model)
    _ensure_process_group()
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    kwargs = {}
    if mixed:  # fp32 master weights and optimizer state, bf16/fp16 compute, fp32 reduction
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=next(model.parameters()).dtype, reduce_dtype=torch.float32
        )
    for block in transformer_blocks(model):
        if mixed:
            block.float()  # this block's full fp32 copy lives only until fully_shard keeps this rank's shard
        fully_shard(block, **kwargs)
    if mixed:
        model.float()  # what is left outside the blocks (embeddings, final norm, head); blocks are already fp32
    fully_shard(model, **kwargs)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            # sum, not mean: the scripts divide each rank's loss by the *global* normalizer themselves
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM reduction (gloo has no pre-multiplied sum)
    model._cleanpost_call = types.MethodType(_call, model)
    register_fsdp_forward_method(model, "_cleanpost_call")
    return _load_weights(model)


def _load_weights(model):
    """A model that `load_model(..., sharded_load=True)` built on the meta device gets its weights now, each process
    reading only the rows its shards hold; then the fused-head check that loading defers. Any other model: as is."""
    load = model.__dict__.pop("_cleanpost_load_weights", None)
    if load is not None:
        load(model)
        name = model.__dict__.pop("_cleanpost_check_head", None)
        if name is not None:
            from common.logprobs import check_fused_head

            check_fused_head(model, name)
            if is_sharded(model):
                model.reshard()  # the check's forward left the root's parameters gathered
    return model


def root_forward(model, fn, *args, **kwargs):
    """`fn(model, *args, **kwargs)`, run as the model's forward when it is FSDP-sharded (so the root's parameters,
    e.g. a tied LM head read by `fn` directly, are gathered and their gradients reduced)."""
    if hasattr(model, "_cleanpost_call"):
        return model._cleanpost_call(fn, *args, **kwargs)
    return fn(model, *args, **kwargs)


@contextlib.contextmanager
def unsharded(model):
    """Gather all of a sharded model's parameters for the duration (generation, evaluation): its forward passes
    then communicate nothing, so each rank may run as many as it needs. Costs one full copy of the weights in
    compute precision. No-op for a plain model."""
    if model is None or not is_sharded(model):
        yield model
        return
    from torch.distributed.fsdp import FSDPModule

    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in fsdp_modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m in fsdp_modules:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)  # FSDP's default: the root stays gathered


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole of a (possibly FSDP-sharded) parameter: a collective for a DTensor, `t` itself otherwise."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_state_dict(model) -> dict:
    """The full (unsharded) state dict on CPU: on rank 0 for a sharded model (a collective: call on every rank),
    `model.state_dict()` otherwise."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # tied weights (e.g. an LM head sharing the embedding) come back under both names; keep the one
    # `named_parameters` reports, as `model.state_dict()` + save_pretrained would
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in state.items() if k in names}


def save_train_state(model, optimizer, path) -> None:
    """The sharded master weights (fp32 in mixed precision) and optimizer state (torch.distributed.checkpoint):
    every rank writes its shards into directory `path`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=str(path))


def load_train_state(model, optimizer, path) -> None:
    """Restore what `save_train_state` wrote (same number of processes) into the wrapped model and its optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(path))  # reads into the layout given
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def grad_norm(total) -> float:
    """`clip_grad_norm_`'s result as a float (a DTensor under FSDP: its full value, the same on every rank)."""
    return float(total.full_tensor() if hasattr(total, "full_tensor") else total)
