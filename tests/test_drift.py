"""common/drift.py: eval/kl_to_init against a brute-force per-sequence computation and 0 for the initial model;
eval/weight_drift by hand; LoRA's adapters-off initial model and its drift; every script logs both."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, read_metrics, run_script

from common.drift import Drift, kl_prompts, kl_to_init, resident, weight_drift
from common.generation import derive_seed, generate
from common.model import load_model, load_tokenizer

PROMPTS = ["What is 12+34?", "What is 7+8?", "Reverse: cat", "What is 99+1?"]  # different lengths: padding


def _args(**kw):
    base = {"target_skill": "arithmetic", "kl_prompts": 64, "kl_samples": 3, "seed": 5, "eval_batch_size": 4}
    base.update(kw)
    return SimpleNamespace(**base)


def _perturbed(model, scale=0.05, seed=0):
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return other


def _brute_force(policy, initial, tokenizer, prompts, samples, max_new_tokens, seed):
    """The same samples (the same generate call and seed), then each sequence alone through each model's full
    forward, without padding: log-softmax of the logits at the positions before each completion token."""
    out = generate(
        policy, tokenizer, prompts, n=samples, max_new_tokens=max_new_tokens, temperature=1.0, batch_size=4,
        seed=derive_seed(seed, "kl_to_init", 0),
    )  # fmt: skip
    k1, k3, n = 0.0, 0.0, 0
    vocab = len(tokenizer)
    for i in range(out["completion_ids"].shape[0]):
        prompt = out["prompt_ids"][i][out["prompt_mask"][i].bool()]
        completion = out["completion_ids"][i][out["completion_mask"][i].bool()]
        ids = torch.cat([prompt, completion])[None]
        with torch.no_grad():
            lp = torch.log_softmax(policy(ids).logits[0, :, :vocab].double(), -1)
            lq = torch.log_softmax(initial(ids).logits[0, :, :vocab].double(), -1)
        for t, token in enumerate(completion.tolist()):
            pos = len(prompt) - 1 + t
            d = lq[pos, token].item() - lp[pos, token].item()
            k1 += -d
            k3 += math.exp(d) - d - 1
            n += 1
    return k1 / n, k3 / n, n


def test_kl_to_init_matches_a_brute_force_computation(random_model_dir):
    tokenizer = load_tokenizer(str(random_model_dir))
    initial = load_model(str(random_model_dir), dtype="float32", device="cpu").eval()
    policy = _perturbed(initial)
    got = kl_to_init(policy, tokenizer, PROMPTS, resident(initial), samples=3, max_new_tokens=6, seed=5, batch_size=4)
    k1, k3, n = _brute_force(policy, initial, tokenizer, PROMPTS, 3, 6, 5)
    assert got["eval/kl_to_init_tokens"] == n > len(PROMPTS) * 3  # several tokens a completion
    assert got["eval/kl_to_init"] == pytest.approx(k3, rel=1e-4)
    assert got["eval/kl_to_init_k1"] == pytest.approx(k1, rel=1e-4, abs=1e-6)
    assert got["eval/kl_to_init"] > 1e-3  # the perturbation moved the model


def test_kl_and_drift_are_zero_for_the_initial_model(random_model_dir):
    tokenizer = load_tokenizer(str(random_model_dir))
    model = load_model(str(random_model_dir), dtype="float32", device="cpu").eval()
    records = [{"prompt": p, "answer": "", "skill": "arithmetic"} for p in PROMPTS]
    drift = Drift(_args(dtype="float32", model=str(random_model_dir), attn_implementation=None), records,
                  torch.device("cpu"), 6)  # fmt: skip
    got = drift(model, tokenizer)  # against a fresh host copy of the same checkpoint
    assert got["eval/kl_to_init"] == 0 and got["eval/kl_to_init_k1"] == 0 and got["eval/weight_drift"] == 0
    assert got["eval/kl_to_init_tokens"] > 0


def test_weight_drift_by_hand():
    a = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        a.weight.copy_(torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]]))  # ||W0|| = 5
    initial = {k: v.clone() for k, v in a.named_parameters()}
    with torch.no_grad():
        a.weight[0, 2] = 1.0  # ||W - W0|| = 1
    assert weight_drift(a, initial) == pytest.approx(0.2)
    # in the initial copy's dtype: a bf16 initial copy compares the rounded weights
    assert weight_drift(a, {k: v.bfloat16() for k, v in initial.items()}) == pytest.approx(0.2)


def test_kl_prompts_are_the_target_skill_first_n():
    records = [{"prompt": f"p{i}", "skill": "arithmetic" if i % 2 else "reverse"} for i in range(10)]
    assert kl_prompts(records, "arithmetic", 3) == ["p1", "p3", "p5"]
    assert kl_prompts([{"prompt": "x"}], "arithmetic", 3) == ["x"]  # no skill: target
    assert kl_prompts(records, "arithmetic", 0) == []


def test_lora_adapters_off_is_the_base_and_its_drift_is_the_merged_update(random_model_dir):
    import lora

    model = load_model(str(random_model_dir), dtype="float32", device="cpu").eval()
    base = copy.deepcopy(model)
    initial_sq = sum(p.pow(2).sum().item() for p in model.parameters())
    args = lora.Args(lora_r=4, lora_alpha=8)
    wrapped = lora.add_lora(model, lora.target_names(model, "all-linear"), args)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in wrapped.values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    ids = torch.randint(0, 20, (2, 7), generator=g)
    with torch.no_grad():
        with lora.adapters_off(model, wrapped):
            torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=0)
        assert not torch.allclose(model(ids).logits, base(ids).logits)  # the scales are back
    merged_sq = sum(
        (m.scaling * m.lora_B @ m.lora_A).pow(2).sum().item() for m in wrapped.values()
    )  # the (out, in) update, formed here only
    assert lora.lora_weight_drift(wrapped, initial_sq) == pytest.approx(math.sqrt(merged_sq / initial_sq), rel=1e-5)


@pytest.mark.slow  # six short runs; the quick loop has the brute-force and zero-at-init tests
@pytest.mark.parametrize(
    "script,extra",
    [
        ("sft.py", ["--max-steps", "2", "--batch-size", "8", "--micro-batch-size", "8"]),
        ("lora.py", ["--max-steps", "2", "--batch-size", "8", "--micro-batch-size", "8"]),
        ("dpo.py", ["--max-steps", "2", "--batch-size", "8", "--micro-batch-size", "8"]),
        ("grpo.py", ["--max-steps", "2", "--prompts-per-step", "2", "--group-size", "4"]),
        ("ppo.py", ["--max-steps", "2", "--prompts-per-step", "4", "--micro-batch-size", "4"]),
        ("opd.py", ["--max-steps", "2", "--prompts-per-step", "2", "--group-size", "2"]),
    ],
)
def test_every_script_logs_kl_to_init_and_weight_drift(tmp_path, script, extra, eval_subset):
    run_script(
        ROOT / script, *extra, "--eval-prompts", eval_subset, "--kl-prompts", "8", "--kl-samples", "2",
        "--output-dir", tmp_path, "--run-name", "run",
    )  # fmt: skip
    rows = [r for r in read_metrics(tmp_path / "run") if "eval/kl_to_init" in r]
    assert len(rows) == 2  # step 0 and the last step
    start, end = rows
    assert start["eval/kl_to_init"] == 0 and start["eval/weight_drift"] == 0
    assert start["eval/kl_to_init_tokens"] > 0
    assert end["eval/weight_drift"] > 0 and end["eval/kl_to_init"] >= 0


@pytest.fixture(scope="module")
def eval_subset(tmp_path_factory):
    """A few held-out records of every skill (the evaluation's cost is not what these tests check)."""
    import json

    records = [json.loads(line) for line in (ROOT / "assets" / "data" / "eval.jsonl").open()]
    skills = {}
    for r in records:
        skills.setdefault(r.get("skill"), []).append(r)
    path = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for rs in skills.values() for r in rs[:4]))
    return str(path)
