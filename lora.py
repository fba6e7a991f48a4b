"""SFT with LoRA adapters (Hu et al. 2021, arXiv 2106.09685), optionally on a 4-bit NF4 or int8 base (QLoRA,
Dettmers et al. 2023, arXiv 2305.14314). The adapter and quantization code lives in this file, to be changed.

Every targeted linear layer W (frozen, optionally quantized) gets a trainable low-rank update:

    y = W x + s * B A dropout(x),   A (r, in) kaiming-uniform, B (out, r) zeros,   s = alpha / r  (rsLoRA: alpha / sqrt r)
    loss = the SFT loss: summed NLL of the assistant tokens / the step's assistant-token count

so the model at step 0 is exactly the base model. Only A and B are in the optimizer. Two variants, each a flag:

    --init-lora-weights pissa (Meng et al. 2024, PiSSA): A, B = W's top-r singular vectors (s B0 A0 = U_r S_r V_r^T),
        the residual W - s B0 A0 frozen: the principal directions train, the rest stays; W exactly at step 0
    --adapter oft (Qiu et al. 2023, orthogonal fine-tuning), input-centric as PEFT: y = base(x R),
        R = blockdiag(R_i), R_i = (I - Q_i)(I + Q_i)^-1 (Cayley) of a skew-symmetric Q_i: W's singular values kept

`final/` is a PEFT adapter directory loadable on the original base (`peft.PeftModel.from_pretrained(base,
"runs/<run>/final")`; PiSSA saved as PEFT converts it, a rank-2r LoRA of W's change); `--merge` also writes
`merged/`, a full Hugging Face model with the adapters folded in.

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
from common.rewards import eval_reward_fn, evaluate
from common.tinyworld import TARGET_SKILL
from common.tracking import Tracker, open_run, peak_memory_gb

SCRIPT = Path(__file__).stem  # the run's name and --resume's check, from the file name: a copy is its own script


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
    # adapters
    adapter: Literal["lora", "oft"] = "lora"
    """lora: a low-rank update s B A added to each targeted weight; oft: orthogonal fine-tuning, the weight's input
    space rotated by a block-diagonal orthogonal matrix (Cayley transform), its singular values kept"""
    init_lora_weights: Literal["default", "pissa"] = "default"
    """--adapter lora: default (A kaiming-uniform, B = 0: the base at step 0) or pissa (A, B from W's top-r singular
    vectors, the residual frozen: W at step 0, exactly)"""
    pissa_niter: int = 0
    """--init-lora-weights pissa: subspace iterations of a randomized SVD (fast on large layers; 0: the full SVD)"""
    oft_block_size: int = 32
    """--adapter oft: the size b of each orthogonal block (b(b-1)/2 parameters a block; it must divide every targeted
    layer's input size)"""
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
    used in the input's (compute) dtype. `enabled = False` gives the base alone (the run's initial model, for
    eval/kl_to_init). With PiSSA the base holds the residual W - s B0 A0 and `lora_A0` / `lora_B0` the initial
    factors (for the PEFT conversion on save)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float, use_rslora: bool):
        super().__init__()
        self.base = base.requires_grad_(False)
        device = base.codes.device if isinstance(base, QuantizedLinear) else base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear's (and PEFT's) default init
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        self.lora_A0 = self.lora_B0 = None  # PiSSA's initial factors

    def base_weight(self, dtype=torch.float32) -> torch.Tensor:
        return _base_weight(self.base, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        # in the input's dtype: A and B (small) are cast, not x, so backward keeps x itself and no fp32 copy of it
        update = (self.dropout(x) @ self.lora_A.to(x.dtype).T) @ self.lora_B.to(x.dtype).T  # (..., out)
        return out + (self.scaling * update).to(out.dtype)

    def delta_sq_norm(self) -> float:
        """||s B A - s B0 A0||_F^2, the change of the layer's effective weight since the start; without PiSSA (B0 = 0)
        tr((B^T B)(A A^T)) s^2: two r x r products, never the (out, in) matrix."""
        A, B = dist.full_tensor(self.lora_A).float(), dist.full_tensor(self.lora_B).float()  # (r, in), (out, r)
        if self.lora_A0 is not None:  # [B, -B0] [A; A0] = B A - B0 A0: a rank-2r product, same trick
            A, B = torch.cat([A, self.lora_A0]), torch.cat([B, -self.lora_B0], dim=1)
        return self.scaling**2 * torch.trace((B.T @ B) @ (A @ A.T)).clamp_min(0).item()

    def merged_weight(self) -> torch.Tensor:
        return self.base_weight(torch.float32) + self.scaling * (self.lora_B.float() @ self.lora_A.float())


class OFTLinear(nn.Module):
    """Orthogonal fine-tuning (Qiu et al. 2023, arXiv 2306.07280), input-centric as PEFT's OFT: base(x R) with
    R = blockdiag(R_1, ..., R_n) (in, in), n = in / block_size, each block the Cayley transform of a skew-symmetric
    Q_i = U_i - U_i^T built from the trainable strict upper triangle U_i,

        R_i = (I - Q_i)(I + Q_i)^-1   (exactly orthogonal for any Q_i; R = I at init, Q = 0)

    so the effective weight W R^T has W's singular values: only the input space of W is rotated. `oft_R` (n,
    b(b-1)/2) is PEFT's `oft_R.weight`; fp32, the rotation applied in the input's dtype."""

    def __init__(self, base: nn.Module, block_size: int, name: str = "layer"):
        super().__init__()
        self.base = base.requires_grad_(False)
        if base.in_features % block_size:
            die(
                f"--oft-block-size {block_size} does not divide {name}'s {base.in_features} input features; choose a "
                "divisor of every targeted layer's input size"
            )
        device = base.codes.device if isinstance(base, QuantizedLinear) else base.weight.device
        self.block_size, self.n_blocks = block_size, base.in_features // block_size
        self.oft_R = nn.Parameter(torch.zeros(self.n_blocks, block_size * (block_size - 1) // 2, device=device))
        rows, cols = torch.triu_indices(block_size, block_size, 1, device=device)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.enabled = True

    def rotation(self) -> torch.Tensor:
        """The blocks R_i (n, b, b), fp32."""
        n, b = self.n_blocks, self.block_size
        upper = torch.zeros(n, b, b, device=self.oft_R.device, dtype=torch.float32)
        upper[:, self.rows, self.cols] = self.oft_R.float()
        q = upper - upper.transpose(1, 2)  # skew-symmetric
        eye = torch.eye(b, device=q.device, dtype=q.dtype).expand(n, b, b)
        return torch.linalg.solve(eye + q, eye - q, left=False)  # X (I + Q) = I - Q

    def base_weight(self, dtype=torch.float32) -> torch.Tensor:
        return _base_weight(self.base, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        blocks = x.reshape(*x.shape[:-1], self.n_blocks, self.block_size)  # (..., n, b)
        rotated = torch.einsum("...nk,nkc->...nc", blocks, self.rotation().to(x.dtype))  # x R, block by block
        return self.base(rotated.reshape(x.shape))

    def merged_weight(self) -> torch.Tensor:
        """W R^T (out, in) fp32: column block i of W times R_i^T."""
        w = self.base_weight(torch.float32)
        blocks = w.reshape(w.shape[0], self.n_blocks, self.block_size)  # (out, n, b)
        return torch.einsum("onk,nck->onc", blocks, self.rotation()).reshape(w.shape)

    def delta_sq_norm(self) -> float:
        return (self.merged_weight() - self.base_weight(torch.float32)).pow(2).sum().item()


def _base_weight(base: nn.Module, dtype) -> torch.Tensor:
    if isinstance(base, QuantizedLinear):
        return base.dequantized_weight(dtype)
    return base.weight.to(dtype)


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


def pissa_factors(weight: torch.Tensor, r: int, scaling: float, niter: int = 0):
    """PiSSA (Meng et al. 2024, arXiv 2404.02948): the top-r singular triplets of W (out, in) as the adapter,
    B0 = U_r sqrt(S_r / s), A0 = sqrt(S_r / s) V_r^T, so s B0 A0 = U_r S_r V_r^T; the residual W - s B0 A0 stays frozen
    and W = residual + s B0 A0 at init. `niter` > 0: a randomized SVD with that many subspace iterations
    (torch.svd_lowrank, PEFT's pissa_niter_N), else the full SVD. Returns A0 (r, in), B0 (out, r), residual, fp32."""
    w = weight.float()
    if niter:
        u, sv, v = torch.svd_lowrank(w, q=r, niter=niter)
        vh = v.T
    else:
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    root = (sv[:r] / scaling).sqrt()
    a0, b0 = root[:, None] * vh[:r], u[:, :r] * root[None, :]
    return a0, b0, w - scaling * (b0 @ a0)


def add_lora(
    model: nn.Module, names: list[str], args: Args, device: torch.device | None = None
) -> dict[str, LoRALinear | OFTLinear]:
    """Freeze the model, quantize the targeted layers if asked, and wrap each in a LoRALinear or an OFTLinear
    (`--adapter`, in place). With `--init-lora-weights pissa` the adapters start from W's principal components and
    the (then quantized) base holds the residual. A model still in host memory is quantized layer by layer onto
    `device`, then the rest of it moved there: the device never holds more than one layer's unquantized weight."""
    model.requires_grad_(False)
    wrapped = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        factors = None
        if args.adapter == "lora" and args.init_lora_weights == "pissa":
            scaling = args.lora_alpha / math.sqrt(args.lora_r) if args.use_rslora else args.lora_alpha / args.lora_r
            on = base.weight.to(device) if device is not None else base.weight
            factors = pissa_factors(on, args.lora_r, scaling, args.pissa_niter)
            with torch.no_grad():
                base.weight.copy_(factors[2].to(base.weight))  # the residual, in the base's dtype and place
        if args.quantize != "none":
            base = QuantizedLinear(base, args.quantize, device)
        if args.adapter == "oft":
            wrapped[name] = OFTLinear(base, args.oft_block_size, name)
        else:
            wrapped[name] = LoRALinear(base, args.lora_r, args.lora_alpha, args.lora_dropout, args.use_rslora)
        if factors is not None:
            m = wrapped[name]
            with torch.no_grad():
                m.lora_A.copy_(factors[0])
                m.lora_B.copy_(factors[1])
            m.lora_A0, m.lora_B0 = factors[0].clone(), factors[1].clone()
        setattr(parent, child, wrapped[name])  # the unquantized layer (host memory) is freed here
    if device is not None:
        model.to(device)
        for m in wrapped.values():
            if getattr(m, "lora_A0", None) is not None:
                m.lora_A0, m.lora_B0 = m.lora_A0.to(device), m.lora_B0.to(device)
    return wrapped


def lora_update_ratio(wrapped: dict, base_norms: dict[str, float]) -> float:
    """Mean over layers of ||change of the layer's weight||_F / ||W||_F (LoRA: s B A - s B0 A0; OFT: W R^T - W)."""
    with torch.no_grad():
        ratios = [math.sqrt(m.delta_sq_norm()) / base_norms[name] for name, m in wrapped.items()]
    return sum(ratios) / len(ratios)


def lora_weight_drift(wrapped: dict, initial_sq_norm: float) -> float:
    """eval/weight_drift of an adapted model: ||theta - theta_init||_F / ||theta_init||_F over every weight, where
    the only change is each adapted layer's effective weight (the rest is frozen): sqrt(sum_l ||dW_l||^2) /
    sqrt(initial_sq_norm); `initial_sq_norm` = the squared norm of all the model's weights at the start."""
    with torch.no_grad():
        sq = sum(m.delta_sq_norm() for m in wrapped.values())
    return math.sqrt(sq / max(initial_sq_norm, 1e-24))


@contextlib.contextmanager
def adapters_off(model: nn.Module, wrapped: dict):
    """The base alone, every adapter switched off for the duration: the run's initial model (not with PiSSA, whose
    initial model is residual + s B0 A0, the original W), for eval/kl_to_init without a second copy of the weights."""
    for m in wrapped.values():
        m.enabled = False
    try:
        yield model
    finally:
        for m in wrapped.values():
            m.enabled = True


def adapter_state_dict(wrapped: dict) -> dict[str, torch.Tensor]:
    """The adapters under PEFT's key names, fp32 on the CPU. LoRA: base_model.model.<module>.lora_A.weight (r, in) /
    lora_B.weight (out, r); PiSSA converted to a rank-2r LoRA of the original W, A' = [A; A0], B' = [B, -B0], so
    s' B' A' = s (B A - B0 A0) (PEFT's path_initial_model_for_weight_conversion; s' = s: alpha doubles, or x sqrt 2
    with rsLoRA); OFT: <module>.oft_R.weight (n, b(b-1)/2). Under torchrun a collective (sharded adapters gathered)."""
    out = {}
    for name, m in wrapped.items():
        key = f"base_model.model.{name}"
        if isinstance(m, OFTLinear):
            out[f"{key}.oft_R.weight"] = dist.full_tensor(m.oft_R.detach()).float().cpu().contiguous()
            continue
        A, B = dist.full_tensor(m.lora_A.detach()).float().cpu(), dist.full_tensor(m.lora_B.detach()).float().cpu()
        if m.lora_A0 is not None:
            A, B = torch.cat([A, m.lora_A0.float().cpu()]), torch.cat([B, -m.lora_B0.float().cpu()], dim=1)
        out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = A.contiguous(), B.contiguous()
    return out


def save_adapter(out_dir: Path, wrapped: dict, args: Args, tokenizer=None) -> Path:
    """A PEFT adapter directory (LoRA, or OFT with `--adapter oft`): adapter_config.json + adapter_model.safetensors
    (+ the tokenizer), loadable on the original base (a PiSSA adapter is converted, see `adapter_state_dict`),
    written to `out_dir.tmp` and renamed into place (as common.model.save_model). Under torchrun every rank calls
    it; rank 0 writes."""
    out_dir = Path(out_dir)
    state = adapter_state_dict(wrapped)
    if not dist.is_main():
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    common = {
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": args.model,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in wrapped}),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
    if args.adapter == "oft":
        config = {
            "peft_type": "OFT",
            "r": 0,  # the number of blocks follows from each layer's input size / oft_block_size
            "oft_block_size": args.oft_block_size,
            "module_dropout": 0.0,
            "init_weights": True,
            "coft": False,
            "block_share": False,
            "use_cayley_neumann": False,  # the exact Cayley transform, as here
            **common,
        }
    else:
        pissa = args.init_lora_weights == "pissa"
        config = {
            "peft_type": "LORA",
            "r": args.lora_r * (2 if pissa else 1),
            "lora_alpha": args.lora_alpha * ((math.sqrt(2) if args.use_rslora else 2) if pissa else 1),
            "lora_dropout": args.lora_dropout,
            "use_rslora": args.use_rslora,
            "init_lora_weights": True,
            **common,
        }
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(state, str(tmp / "adapter_model.safetensors"))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    return tmp.rename(out_dir)


def load_adapter(in_dir: Path, wrapped: dict) -> None:
    """The inverse of `save_adapter` onto freshly built adapters (`add_lora` with the run's flags): a PiSSA adapter's
    first r rows / columns are the trained A / B."""
    state = load_file(str(Path(in_dir) / "adapter_model.safetensors"))
    with torch.no_grad():
        for name, m in wrapped.items():
            key = f"base_model.model.{name}"
            if isinstance(m, OFTLinear):
                m.oft_R.copy_(state[f"{key}.oft_R.weight"])
                continue
            r = m.lora_A.shape[0]
            m.lora_A.copy_(state[f"{key}.lora_A.weight"][:r])
            m.lora_B.copy_(state[f"{key}.lora_B.weight"][:, :r])


@torch.no_grad()
def merge_lora(model: nn.Module, wrapped: dict) -> nn.Module:
    """Replace each adapted layer by a plain nn.Linear holding its effective weight (W + s B A, with PiSSA the
    residual + s B A; OFT: W R^T; W dequantized if quantized), in place."""
    for name, m in wrapped.items():
        weight = m.merged_weight()
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
    args, ckpt, run_dir = open_run(args, SCRIPT)  # a new run directory, or --resume's run and saved flags
    data_opts = data_options(args)  # --columns, --prompt-template, --dataset-weights: checked now
    eval_reward = eval_reward_fn(args.eval_reward_fn)  # the verifier of eval/accuracy
    rank_rows = dist.local_slice(args.batch_size)  # this process's share of every step
    grad_accum_steps = check_batch_sizes(rank_rows.stop - rank_rows.start, args.micro_batch_size, args.batch_size)
    if args.lr_schedule not in ("cosine", "linear", "constant"):
        die(f"--lr-schedule {args.lr_schedule!r} is not one of cosine, linear, constant")
    if args.lora_r < 1:
        die(f"--lora-r must be >= 1, got {args.lora_r}")
    if not 0 <= args.lora_dropout < 1:
        die(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if args.adapter == "oft" and (args.init_lora_weights != "default" or args.lora_dropout):
        die("--init-lora-weights and --lora-dropout apply to --adapter lora (OFT starts at the identity, no dropout)")
    if args.oft_block_size < 2 or args.pissa_niter < 0:
        die(f"--oft-block-size must be >= 2 and --pissa-niter >= 0, got {args.oft_block_size}, {args.pissa_niter}")
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
    trainable = [p for m in wrapped.values() for p in m.parameters() if p.requires_grad]  # A, B or oft_R
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
    pissa = args.init_lora_weights == "pissa"  # its initial model is W itself: a host copy, not adapters off
    drift = Drift(  # eval/kl_to_init to the base model: the same model with its adapters off, no second copy
        args,
        eval_records,
        device,
        args.eval_max_new_tokens,
        context=None if pissa else lambda: adapters_off(model, wrapped),
        drift_fn=lambda _: lora_weight_drift(wrapped, initial_sq_norm),
    )

    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, args.warmup_steps, args.max_steps, args.lr_schedule)
    )
    start_step = load_trainer_state(ckpt, optimizer, scheduler, model)["step"] if ckpt else 0
    tracker = Tracker(run_dir, args, script=SCRIPT, total_steps=args.max_steps, start_step=start_step)
    tracker.write(
        f"run: {run_dir}  |  {len(train_examples)} train examples, "
        f"{'up to ' if args.packing else ''}{grad_accum_steps} micro-batches/step"
        + (f" in each of {dist.world_size()} processes" if dist.world_size() > 1 else "")
        + "  |  "
        + (
            f"OFT blocks of {args.oft_block_size}"
            if args.adapter == "oft"
            else f"LoRA r={args.lora_r} alpha={args.lora_alpha}"
            + (" (PiSSA init)" if args.init_lora_weights == "pissa" else "")
        )
        + f" on {len(names)} linear layers: {num_trainable:,} trainable of "
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
        tracker.check_finite(train_loss, grad_norm, step + 1)
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
