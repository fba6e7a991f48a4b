"""SFT with LoRA adapters (Hu et al. 2021, arXiv 2106.09685), optionally on a 4-bit NF4 or int8 base (QLoRA,
Dettmers et al. 2023, arXiv 2305.14314). The adapter and quantization code lives in this file, to be changed.

Every targeted linear layer W (frozen, optionally quantized) gets a trainable low-rank update:

    y = W x + s * B A dropout(x),   A (r, in) kaiming-uniform, B (out, r) zeros,   s = alpha / r  (rsLoRA: alpha / sqrt r)
    loss = the SFT loss: summed NLL of the assistant tokens / the step's assistant-token count

so the model at step 0 is exactly the base model. Only A and B are in the optimizer. `final/` is a PEFT-compatible
adapter directory (`peft.PeftModel.from_pretrained(base, "runs/<run>/final")`); `--merge` also writes `merged/`, a
full Hugging Face model with W + s B A folded in.

    python lora.py                                                      # the tiny world, a few minutes on a CPU
    python lora.py --quantize nf4                                       # QLoRA: the frozen base in 4 bits
    python lora.py --model Qwen/Qwen3-0.6B --dataset chat.jsonl --quantize nf4 --batch-size 32 \\
        --micro-batch-size 4 --learning-rate 2e-4 --eval-prompts '' --merge
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
import tyro
from safetensors.torch import load_file, save_file
from torch import nn

from common import die, dist
from common.data import (
    IGNORE_INDEX,
    Mixture,
    check_batch_sizes,
    count_loss_tokens,
    data_options,
    fit_prompts,
    load_prompts,
    load_sft_dataset,
    micro_batches,
    packed_micro_batches,
    prompt_budget,
)
from common.drift import Drift
from common.logprobs import token_logprobs
from common.model import (
    default_device,
    load_model,
    load_tokenizer,
    load_trainer_state,
    lr_lambda,
    save_checkpoint,
    save_model,
)
from common.rewards import eval_reward_fn
from common.tinyworld import TARGET_SKILL, evaluate
from common.tracking import Tracker, open_run, peak_memory_gb


@dataclass
class Args:
    # experiment
    seed: int = 1
    """seed of the data order, the adapters' initialization and of torch"""
    output_dir: str = "runs"
    """runs are written to {output_dir}/{run_name}/"""
    run_name: str | None = None
    """the run's name; if not given: lora__{seed}__{unix time}"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works)"""
    wandb_project: str = "cleanpost"
    """the wandb project"""
    wandb_entity: str | None = None
    """the wandb entity (team)"""
    # model
    model: str = "assets/tiny-base"
    """hub id or local directory of the base model (frozen)"""
    dtype: str = "auto"
    """auto: bf16 compute from fp32 master weights on a GPU with native bf16, else fp32 | float32 | bfloat16: bf16
    compute, fp32 master weights, gradients and AdamW state (also on a CPU) | pure-bf16: everything in bf16 (8 instead
    of 16 bytes a parameter; updates below half a bf16 ulp of a weight are lost)"""
    gradient_checkpointing: bool = False
    """recompute activations in backward to save memory"""
    attn_implementation: str | None = None
    """attention kernel: sdpa | eager | flash_attention_2 (default: transformers' choice; Gemma-2 needs eager)"""
    chat_template_kwargs: str | None = None
    """JSON passed to the chat template for training data, prompts and evaluation alike, e.g. '{"enable_thinking":
    false}' for Qwen3"""
    # LoRA
    lora_r: int = 16
    """adapter rank r"""
    lora_alpha: float = 32.0
    """adapter scale numerator: s = alpha / r (or alpha / sqrt(r) with --use-rslora)"""
    lora_dropout: float = 0.0
    """dropout on the adapter's input"""
    use_rslora: bool = False
    """rank-stabilized scaling alpha / sqrt(r) (Kalajdzievski 2023), better at high ranks"""
    target_modules: str = "all-linear"
    """comma-separated name suffixes of the linear layers to adapt (e.g. q_proj,v_proj), or all-linear: every linear
    layer of the transformer blocks (attention and MLP; not the output head), as PEFT's all-linear"""
    quantize: Literal["none", "nf4", "int8"] = "none"
    """store the frozen targeted base weights as 4-bit NormalFloat or int8, blockwise absmax (block 64), dequantized
    on the fly in forward"""
    merge: bool = False
    """also write merged/: the base with the adapters folded in, a plain Hugging Face model"""
    # data
    dataset: tuple[str, ...] = ("assets/data/sft.jsonl",)
    """training data, one or more sources (mixed by --dataset-weights) of {messages} | {prompt, completion} | {text}
    records; each a JSONL/.json/.parquet/.csv file, a save_to_disk directory, or a hub id
    NAME[:CONFIG][@SPLIT][[START:STOP]] (e.g. HuggingFaceH4/ultrachat_200k@train_sft)"""
    dataset_weights: tuple[float, ...] | None = None
    """one weight per --dataset source: each example is drawn from a source with probability proportional to its
    weight, reproducibly from --seed (default: the sources' sizes, i.e. their concatenation); logged as data/share/*"""
    columns: str | None = None
    """FIELD=COLUMN,... maps our record fields onto a dataset's columns, for every dataset of the run (e.g.
    prompt=question,answer=answer for GSM8K; messages=conversations for a chat set); each source must have at least
    one of the columns"""
    prompt_template: str | None = None
    """a Python format string over a row's columns that makes its prompt, for training and evaluation prompts alike
    (e.g. '{question}\nPut the final answer in \\boxed{{}}.')"""
    system_prompt: str | None = None
    """a system turn put first in every prompt or conversation that has none"""
    num_proc: int = 1
    """processes that tokenize the datasets (the result is cached next to each dataset, keyed by its content, the
    tokenizer, the chat template, the prompt options and --max-length: a second run skips it)"""
    eval_dataset: str = "assets/data/sft_eval.jsonl"
    """held-out data of the same shapes for eval/loss ('' to skip; any source --dataset takes, one of them)"""
    eval_prompts: str = "assets/data/eval.jsonl"
    """held-out {prompt, answer, skill} records for greedy accuracy ('' to skip; any source --dataset takes, one of
    them)"""
    target_skill: str = TARGET_SKILL
    """the skill reported as eval/accuracy; the other skills make eval/general_accuracy"""
    max_length: int = 256
    """examples are truncated to this many tokens (counted and reported)"""
    packing: bool = False
    """pack each step's examples into rows of --max-length tokens (best-fit decreasing; --micro-batch-size then counts
    rows): no compute on padding, the same loss and gradient (attention stays within each example; the loss is
    still the step's token mean)"""
    # optimization
    max_steps: int = 400
    """optimizer steps"""
    batch_size: int = 64
    """examples per optimizer step, over all processes (each of N torchrun processes takes batch_size / N)"""
    micro_batch_size: int = 64
    """examples per forward/backward in each process; gradient accumulation steps = batch_size / N / micro_batch_size"""
    learning_rate: float = 3e-3
    """peak learning rate of AdamW (LoRA wants ~10x the full fine-tuning rate: sft.py uses 5e-4 here)"""
    weight_decay: float = 0.0
    """AdamW weight decay of the adapter matrices"""
    lr_schedule: str = "cosine"
    """cosine | linear | constant, after warmup"""
    warmup_steps: int = 10
    """linear warmup from 0 to the peak learning rate"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this (train/grad_norm is logged before clipping)"""
    # evaluation and checkpoints
    eval_every: int = 100
    """evaluate every N steps (0: only before the first and after the last step)"""
    eval_max_new_tokens: int = 16
    """generation budget of the accuracy evaluation"""
    eval_reward_fn: str = "tiny_world"
    """verifier of the greedy evaluation: tiny_world | math | format | module:function (eval/accuracy = its mean
    reward on the target skill)"""
    eval_batch_size: int = 128
    """prompts per generate call in the greedy evaluation (lower it for large models and long answers)"""
    kl_prompts: int = 64
    """eval/kl_to_init, the KL of the model to the initial one: over the first N held-out target-skill prompts of
    --eval-prompts, on the model's own samples (0: off; see common/drift.py)"""
    kl_samples: int = 4
    """eval/kl_to_init: completions sampled per prompt (temperature 1, the same seed at every evaluation)"""
    save_every: int = 0
    """write checkpoints/step_N (adapters + optimizer) every N steps for --resume (0: only final/)"""
    resume: str | None = None
    """a run directory (its newest checkpoint) or a checkpoint directory to continue from"""


# ----------------------------------------------------------------------------------------------------------------
# Quantization of the frozen base: blockwise absmax, plain torch (CPU and CUDA). A block of 64 consecutive weights
# shares one fp32 scale (its largest |w|); each weight stores the index of the nearest code.

# NF4 (QLoRA, appendix E): the 16 quantiles of N(0, 1) that place 8 codes on the positive side and 7 on the negative,
# with an exact 0, rescaled to [-1, 1]. (tests/test_lora.py rebuilds them from the normal quantile function.)
NF4_CODEBOOK = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)
BLOCK_SIZE = 64


def quantize_blockwise(weight: torch.Tensor, kind: str, block_size: int = BLOCK_SIZE) -> dict:
    """weight (any shape) -> {"codes": uint8 (nf4: two 4-bit codes a byte) or int8, "absmax": fp32 per block}."""
    flat = weight.detach().float().flatten()
    pad = (-flat.numel()) % block_size
    blocks = F.pad(flat, (0, pad)).view(-1, block_size)  # (num_blocks, block)
    absmax = blocks.abs().amax(-1).clamp_min(1e-12)  # (num_blocks,)
    normed = blocks / absmax[:, None]  # in [-1, 1]
    if kind == "nf4":
        codebook = NF4_CODEBOOK.to(flat.device)
        midpoints = (codebook[1:] + codebook[:-1]) / 2  # (15,) the nearest code changes at these
        codes = torch.bucketize(normed.flatten(), midpoints, out_int32=True).to(torch.uint8)  # nearest code, 0..15
        packed = (codes[0::2] << 4) | codes[1::2]  # two codes a byte (block size is even)
    elif kind == "int8":
        packed = torch.round(normed * 127).to(torch.int8).flatten()
    else:
        raise ValueError(f"unknown quantization {kind!r}")
    return {"codes": packed, "absmax": absmax}


def dequantize_blockwise(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    kind: str,
    shape,
    dtype=torch.float32,
    block_size: int = BLOCK_SIZE,
    codebook: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of `quantize_blockwise` up to the rounding: codebook value (or q / 127) times the block's absmax.
    `codebook`: NF4's on the codes' device (a layer's buffer), else copied there."""
    if kind == "nf4":
        idx = torch.stack([codes >> 4, codes & 0xF], dim=-1).flatten().long()
        normed = (NF4_CODEBOOK.to(codes.device) if codebook is None else codebook)[idx]
    else:
        normed = codes.float() / 127
    values = (normed.view(-1, block_size) * absmax[:, None]).flatten()
    return values[: math.prod(shape)].view(shape).to(dtype)


class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight is stored quantized (buffers, not parameters) and dequantized per forward;
    quantized on `device` (the layer's weight moves there alone, so a model is quantized on the way to the
    accelerator without the whole bf16 model ever being on it)."""

    def __init__(self, linear: nn.Linear, kind: str, device: torch.device | None = None):
        super().__init__()
        self.in_features, self.out_features, self.kind = linear.in_features, linear.out_features, kind
        self.weight_shape, self.compute_dtype = tuple(linear.weight.shape), linear.weight.dtype
        device = device or linear.weight.device
        q = quantize_blockwise(linear.weight.detach().to(device), kind)
        self.register_buffer("codes", q["codes"])
        self.register_buffer("absmax", q["absmax"])
        codebook = NF4_CODEBOOK.to(device) if kind == "nf4" else None  # on the device once, not copied per forward
        self.register_buffer("codebook", codebook, persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().to(device)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def dequantized_weight(self, dtype=None) -> torch.Tensor:
        return dequantize_blockwise(
            self.codes, self.absmax, self.kind, self.weight_shape, dtype or self.compute_dtype, codebook=self.codebook
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return DequantizedLinear.apply(x, self, bias)


class DequantizedLinear(torch.autograd.Function):
    """x @ dequant(W).T + b for a frozen quantized W that backward dequantizes again instead of keeping: autograd
    through F.linear would save the dequantized weight (the full compute-dtype matrix, 3.5x its NF4 storage) for
    every layer until backward. Nothing is saved (the codes are the layer's buffers); the input is not needed,
    since W gets no gradient."""

    @staticmethod
    def forward(ctx, x, layer, bias):
        ctx.layer = layer
        return F.linear(x, layer.dequantized_weight(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_out @ ctx.layer.dequantized_weight(grad_out.dtype)  # (..., out) @ (out, in)
        return grad_x, None, None


# ----------------------------------------------------------------------------------------------------------------
# LoRA


class LoRALinear(nn.Module):
    """base(x) + s * B A dropout(x). The base (nn.Linear or QuantizedLinear) is frozen; A and B are fp32 parameters,
    used in the input's (compute) dtype."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float, use_rslora: bool):
        super().__init__()
        self.base = base.requires_grad_(False)
        device = base.codes.device if isinstance(base, QuantizedLinear) else base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear's (and PEFT's) default init
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def base_weight(self, dtype=torch.float32) -> torch.Tensor:
        if isinstance(self.base, QuantizedLinear):
            return self.base.dequantized_weight(dtype)
        return self.base.weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        # in the input's dtype: A and B (small) are cast, not x, so backward keeps x itself and no fp32 copy of it
        update = (self.dropout(x) @ self.lora_A.to(x.dtype).T) @ self.lora_B.to(x.dtype).T  # (..., out)
        return out + (self.scaling * update).to(out.dtype)


def target_names(model: nn.Module, target_modules: str) -> list[str]:
    """Qualified names of the linear layers to adapt: all-linear = every nn.Linear but the output head."""
    head = model.get_output_embeddings()
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    if target_modules == "all-linear":
        return [n for n, _ in linears]
    suffixes = [s.strip() for s in target_modules.split(",") if s.strip()]
    names = [n for n, _ in linears if any(n == s or n.endswith("." + s) for s in suffixes)]
    missing = [s for s in suffixes if not any(n == s or n.endswith("." + s) for n in names)]
    if missing or not names:
        known = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
        die(
            f"--target-modules: no linear layer named {', '.join(missing) or target_modules}; known: {', '.join(known)}"
        )
    return names


def add_lora(
    model: nn.Module, names: list[str], args: Args, device: torch.device | None = None
) -> dict[str, LoRALinear]:
    """Freeze the model, quantize the targeted layers if asked, and wrap each in a LoRALinear (in place). A model
    still in host memory is quantized layer by layer onto `device`, then the rest of it moved there: the device
    never holds more than one layer's unquantized weight."""
    model.requires_grad_(False)
    wrapped = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if args.quantize != "none":
            base = QuantizedLinear(base, args.quantize, device)
        wrapped[name] = LoRALinear(base, args.lora_r, args.lora_alpha, args.lora_dropout, args.use_rslora)
        setattr(parent, child, wrapped[name])  # the unquantized layer (host memory) is freed here
    if device is not None:
        model.to(device)
    return wrapped


def lora_update_ratio(wrapped: dict[str, LoRALinear], base_norms: dict[str, float]) -> float:
    """Mean over layers of ||s B A||_F / ||W||_F, with ||B A||_F^2 = tr((B^T B)(A A^T)): two r x r products, never the
    (out, in) matrix."""
    ratios = []
    for name, m in wrapped.items():
        with torch.no_grad():
            A, B = dist.full_tensor(m.lora_A), dist.full_tensor(m.lora_B)  # (r, in), (out, r): small
            sq = torch.trace((B.T @ B) @ (A @ A.T)).clamp_min(0)
        ratios.append(m.scaling * sq.sqrt().item() / base_norms[name])
    return sum(ratios) / len(ratios)


def lora_weight_drift(wrapped: dict[str, LoRALinear], initial_sq_norm: float) -> float:
    """eval/weight_drift of a LoRA model: ||theta - theta_init||_F / ||theta_init||_F over every weight, where the
    only change is each adapted layer's s B A (the rest is frozen): sqrt(sum_l s^2 ||B A||^2) / sqrt(initial_sq_norm),
    ||B A||_F^2 = tr((B^T B)(A A^T)); `initial_sq_norm` = the squared norm of all the model's weights at the start."""
    sq = 0.0
    for m in wrapped.values():
        with torch.no_grad():
            A, B = dist.full_tensor(m.lora_A), dist.full_tensor(m.lora_B)  # (r, in), (out, r): small
            sq += m.scaling**2 * torch.trace((B.T @ B) @ (A @ A.T)).clamp_min(0).item()
    return math.sqrt(sq / max(initial_sq_norm, 1e-24))


@contextlib.contextmanager
def adapters_off(model: nn.Module, wrapped: dict[str, LoRALinear]):
    """The base model, the initial model of the run: every adapter's scale set to 0 for the duration (s B A x
    contributes exactly 0), for eval/kl_to_init without a second copy of the weights."""
    scalings = {name: m.scaling for name, m in wrapped.items()}
    for m in wrapped.values():
        m.scaling = 0.0
    try:
        yield model
    finally:
        for name, m in wrapped.items():
            m.scaling = scalings[name]


def adapter_state_dict(wrapped: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """The adapters under PEFT's key names: base_model.model.<module>.lora_A.weight (r, in) / lora_B.weight (out, r).
    Under torchrun a collective (sharded adapters are gathered)."""
    out = {}
    for name, m in wrapped.items():
        out[f"base_model.model.{name}.lora_A.weight"] = dist.full_tensor(m.lora_A.detach()).float().cpu().contiguous()
        out[f"base_model.model.{name}.lora_B.weight"] = dist.full_tensor(m.lora_B.detach()).float().cpu().contiguous()
    return out


def save_adapter(out_dir: Path, wrapped: dict[str, LoRALinear], args: Args, tokenizer=None) -> Path:
    """A PEFT LoRA adapter directory: adapter_config.json + adapter_model.safetensors (+ the tokenizer), written to
    `out_dir.tmp` and renamed into place (as common.model.save_model). Under torchrun every rank calls it; rank 0
    writes."""
    out_dir = Path(out_dir)
    state = adapter_state_dict(wrapped)
    if not dist.is_main():
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": args.model,
        "r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "lora_dropout": args.lora_dropout,
        "use_rslora": args.use_rslora,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in wrapped}),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(state, str(tmp / "adapter_model.safetensors"))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    return tmp.rename(out_dir)


def load_adapter(in_dir: Path, wrapped: dict[str, LoRALinear]) -> None:
    state = load_file(str(Path(in_dir) / "adapter_model.safetensors"))
    with torch.no_grad():
        for name, m in wrapped.items():
            m.lora_A.copy_(state[f"base_model.model.{name}.lora_A.weight"])
            m.lora_B.copy_(state[f"base_model.model.{name}.lora_B.weight"])


@torch.no_grad()
def merge_lora(model: nn.Module, wrapped: dict[str, LoRALinear]) -> nn.Module:
    """Replace each LoRALinear by a plain nn.Linear holding W + s B A (W dequantized if quantized), in place."""
    for name, m in wrapped.items():
        weight = m.base_weight(torch.float32) + m.scaling * (m.lora_B @ m.lora_A)
        dtype = m.base.compute_dtype if isinstance(m.base, QuantizedLinear) else m.base.weight.dtype
        linear = nn.Linear(m.base.in_features, m.base.out_features, bias=m.base.bias is not None)
        linear = linear.to(device=weight.device, dtype=dtype)
        linear.weight.copy_(weight)
        if m.base.bias is not None:
            linear.bias.copy_(m.base.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return model


def sft_loss(logps: torch.Tensor, labels: torch.Tensor, num_loss_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of the loss tokens divided by the whole step's loss-token count (as in sft.py).
    logps (B, T-1); labels (B, T), IGNORE_INDEX where no loss. Returns (loss for backward, summed NLL)."""
    loss_mask = labels[:, 1:] != IGNORE_INDEX
    nll_sum = -(logps * loss_mask).sum()
    return nll_sum / num_loss_tokens, nll_sum.detach()


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main(args: Args) -> None:
    # PLUMBING: check flags and inputs before any compute
    dist.init()  # torchrun: join the other processes (nothing for `python lora.py`)
    args, ckpt, run_dir = open_run(args, "lora")  # a new run directory, or --resume's run and saved flags
    data_opts = data_options(args)  # --columns, --prompt-template, --dataset-weights: checked now
    eval_reward = eval_reward_fn(args.eval_reward_fn)  # the verifier of eval/accuracy
    rank_rows = dist.local_slice(args.batch_size)  # this process's share of every step
    grad_accum_steps = check_batch_sizes(rank_rows.stop - rank_rows.start, args.micro_batch_size)
    if args.lr_schedule not in ("cosine", "linear", "constant"):
        die(f"--lr-schedule {args.lr_schedule!r} is not one of cosine, linear, constant")
    if args.lora_r < 1:
        die(f"--lora-r must be >= 1, got {args.lora_r}")
    if not 0 <= args.lora_dropout < 1:
        die(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    torch.manual_seed(args.seed)

    tokenizer = load_tokenizer(args.model, args.chat_template_kwargs)
    train = Mixture(
        [
            load_sft_dataset(source, tokenizer, args.max_length, opts=data_opts, num_proc=args.num_proc)
            for source in args.dataset
        ],
        args.dataset,
        args.dataset_weights,
    )
    train_examples = train.items  # every source's examples, concatenated; `train.indices` draws the steps
    eval_examples = (
        load_sft_dataset(args.eval_dataset, tokenizer, args.max_length, opts=data_opts, num_proc=args.num_proc)
        if args.eval_dataset
        else []
    )
    eval_records = (
        load_prompts(args.eval_prompts, ("prompt", "answer"), data_opts, "--eval-prompts") if args.eval_prompts else []
    )
    eval_budget = prompt_budget(None, args.model, args.eval_max_new_tokens)  # the context minus the answer's room
    eval_records = fit_prompts(eval_records, tokenizer, eval_budget, "--eval-prompts", flag="--eval-max-new-tokens")
    device = default_device()
    model = load_model(  # with --quantize, in host memory: quantized layer by layer onto the device (add_lora)
        args.model,
        dtype=args.dtype,
        device=device,
        on_host=args.quantize != "none",
        gradient_checkpointing=args.gradient_checkpointing,
        attn_implementation=args.attn_implementation,
    )

    # ALGO LOGIC: freeze the base, (quantize,) wrap the targeted linears
    names = target_names(model, args.target_modules)
    base_weights = [model.get_submodule(n).weight for n in names]
    base_bytes = tensor_bytes(base_weights)
    base_norms = {n: w.float().norm().item() for n, w in zip(names, base_weights)}
    del base_weights
    initial_sq_norm = sum(p.detach().float().pow(2).sum().item() for p in model.parameters())  # eval/weight_drift's
    wrapped = add_lora(model, names, args, device)
    if ckpt:
        load_adapter(ckpt, wrapped)
    if args.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    model = dist.wrap(model, train=True, mixed_precision=False)  # torchrun: FSDP2 shards base and adapters alike
    trainable = [p for m in wrapped.values() for p in (m.lora_A, m.lora_B)]  # (sharded, under torchrun)
    num_trainable = sum(p.numel() for p in trainable)
    num_total = sum(p.numel() for p in model.parameters()) + sum(
        math.prod(m.base.weight_shape) for m in wrapped.values() if isinstance(m.base, QuantizedLinear)
    )
    stored_bytes = tensor_bytes(
        [
            t
            for m in wrapped.values()
            for t in ((m.base.codes, m.base.absmax) if args.quantize != "none" else (m.base.weight,))
        ]
    )
    model.train()
    drift = Drift(  # eval/kl_to_init to the base model: the same model with its adapters off, no second copy
        args,
        eval_records,
        device,
        args.eval_max_new_tokens,
        context=lambda: adapters_off(model, wrapped),
        drift_fn=lambda _: lora_weight_drift(wrapped, initial_sq_norm),
    )

    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, args.warmup_steps, args.max_steps, args.lr_schedule)
    )
    start_step = load_trainer_state(ckpt, optimizer, scheduler, model)["step"] if ckpt else 0
    tracker = Tracker(run_dir, args, script="lora", total_steps=args.max_steps, start_step=start_step)
    tracker.write(
        f"run: {run_dir}  |  {len(train_examples)} train examples, "
        f"{'up to ' if args.packing else ''}{grad_accum_steps} micro-batches/step"
        + (f" in each of {dist.world_size()} processes" if dist.world_size() > 1 else "")
        + "  |  "
        f"LoRA r={args.lora_r} alpha={args.lora_alpha} on {len(names)} linear layers: {num_trainable:,} trainable of "
        f"{num_total:,} parameters ({100 * num_trainable / num_total:.2f}%) on {device}"
        + (f"  |  resumed at step {start_step} from {ckpt}" if ckpt else "")
    )
    tracker.write(train.describe(data_opts))
    tracker.write(
        f"targeted base weights: {base_bytes / 2**20:.2f} MB"
        + (
            f" -> {stored_bytes / 2**20:.2f} MB as {args.quantize} ({base_bytes / stored_bytes:.1f}x smaller)"
            if args.quantize != "none"
            else " (not quantized)"
        )
    )

    @torch.no_grad()
    def evaluation() -> dict:
        metrics = {}
        model.eval()
        if eval_examples:
            nll, tokens = 0.0, 0
            mine = dist.strided(list(range(len(eval_examples))))  # each process takes every N-th example
            with dist.unsharded(model):
                for mb in (
                    micro_batches(eval_examples, mine, args.micro_batch_size, tokenizer.pad_token_id) if mine else []
                ):
                    mb = {k: v.to(device) for k, v in mb.items()}
                    n = count_loss_tokens([mb])
                    loss_tokens = mb["labels"][:, 1:] != IGNORE_INDEX  # (b, T-1): the only rows the LM head runs on
                    logps = token_logprobs(model, mb["input_ids"], mb["attention_mask"], target_mask=loss_tokens)
                    nll += sft_loss(logps, mb["labels"], n)[1].item()
                    tokens += n
            nll, tokens = dist.all_reduce([nll, tokens])
            metrics["eval/loss"] = nll / max(1, tokens)
        model.train()
        if eval_records:
            metrics.update(
                evaluate(
                    model,
                    tokenizer,
                    eval_records,
                    reward_fn=eval_reward,
                    target_skill=args.target_skill,
                    batch_size=args.eval_batch_size,
                    max_new_tokens=args.eval_max_new_tokens,
                )
            )
        return {**metrics, **drift(model, tokenizer)}  # eval/kl_to_init, eval/weight_drift

    if start_step == 0:  # every run shows its starting point (the base model: B = 0)
        start = evaluation()
        tracker.log(start, step=0)
        tracker.write("step 0: " + "  ".join(f"{k}={v:.4f}" for k, v in start.items()))

    for step in range(start_step, args.max_steps):
        t0 = time.time()
        # ALGO LOGIC: exactly sft.py's step (each process its slice, the normalizer over all); only the adapters
        # receive gradients
        step_examples = train.indices(args.batch_size, step, args.seed)[rank_rows]
        if args.packing:  # rows of --max-length tokens, examples back to back
            batches = packed_micro_batches(
                train_examples, step_examples, args.micro_batch_size, args.max_length, tokenizer.pad_token_id
            )
        else:
            batches = micro_batches(train_examples, step_examples, args.micro_batch_size, tokenizer.pad_token_id)
        num_loss_tokens = int(dist.all_reduce(count_loss_tokens(batches)))
        nll_sum = torch.zeros((), dtype=torch.float64, device=device)  # on the device: one host sync per step
        num_tokens = sum(int(mb["attention_mask"].sum()) for mb in batches)  # counted on the host, before the copy
        for mb in batches:
            mb = {k: v.to(device, non_blocking=True) for k, v in mb.items()}
            loss_tokens = mb["labels"][:, 1:] != IGNORE_INDEX  # (b, T-1): the only rows the LM head runs on
            logps = token_logprobs(
                model,
                mb["input_ids"],
                mb["attention_mask"],
                target_mask=loss_tokens,
                position_ids=mb.get("position_ids"),
            )  # (b, T-1)
            loss, nll = sft_loss(logps, mb["labels"], num_loss_tokens)
            loss.backward()
            nll_sum += nll
        nll_sum, num_tokens = dist.all_reduce([float(nll_sum), num_tokens])
        train_loss = nll_sum / num_loss_tokens
        grad_norm = dist.grad_norm(torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm))
        # PLUMBING: a broken step stops the run before it touches the weights or a checkpoint
        if not (math.isfinite(train_loss) and math.isfinite(grad_norm)):
            tracker.close()
            die(
                f"non-finite loss ({train_loss}) or gradient norm ({grad_norm}) at step {step + 1}; "
                "no update applied, no checkpoint written (try a lower --learning-rate)"
            )
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_s = time.time() - t0

        done = step + 1
        metrics = {
            "train/loss": train_loss,
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/lora_update_ratio": lora_update_ratio(wrapped, base_norms),
            "train/epoch": done * args.batch_size / len(train_examples),
            **train.shares(args.batch_size, step, args.seed),
            "perf/tokens_per_s": num_tokens / step_s,
            "perf/step_s": step_s,
            "perf/peak_mem_gb": peak_memory_gb(device),
        }
        if done == args.max_steps or (args.eval_every and done % args.eval_every == 0):
            metrics.update(evaluation())
        tracker.log(metrics, step=done)
        tracker.step()
        if args.save_every and done % args.save_every == 0 and done < args.max_steps:
            save_checkpoint(
                run_dir, done, model, tokenizer, optimizer, scheduler, save_fn=lambda d: save_adapter(d, wrapped, args)
            )

    final = save_adapter(run_dir / "final", wrapped, args, tokenizer)
    if args.save_every and args.max_steps % args.save_every == 0:
        save_checkpoint(
            run_dir,
            args.max_steps,
            model,
            tokenizer,
            optimizer,
            scheduler,
            save_fn=lambda d: save_adapter(d, wrapped, args),
        )
    if args.merge and dist.world_size() == 1:
        merged = save_model(merge_lora(model, wrapped), tokenizer, run_dir / "merged")
        tracker.write(f"merged model: {merged}")
    elif args.merge:  # sharded: rank 0 rebuilds the base on the CPU, adds the saved adapters and merges
        if dist.is_main():
            base = load_model(args.model, dtype=args.dtype, device="cpu", attn_implementation=args.attn_implementation)
            base_wrapped = add_lora(base, names, args)
            load_adapter(final, base_wrapped)
            merged = save_model(merge_lora(base, base_wrapped), tokenizer, run_dir / "merged")
            tracker.write(f"merged model: {merged}")
        dist.barrier()
    tracker.close()
    last = {k: v for k, v in metrics.items() if k.startswith("eval/")} if args.max_steps > start_step else {}
    if dist.is_main():
        print(f"saved {final}" + ("  |  " + "  ".join(f"{k}={v:.4f}" for k, v in last.items()) if last else ""))


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__.split("\n\n")[0]))  # --help opens with what the script does
