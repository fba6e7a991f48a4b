import json

import pytest
import torch
from conftest import ROOT, TINY_BASE, run_script
from transformers import AutoModelForCausalLM

from common.model import load_model
from lora import (
    BLOCK_SIZE,
    NF4_CODEBOOK,
    Args,
    LoRALinear,
    add_lora,
    dequantize_blockwise,
    load_adapter,
    lora_update_ratio,
    merge_lora,
    quantize_blockwise,
    save_adapter,
    target_names,
)


def _model(path):
    return load_model(str(path), dtype="float32", device="cpu").eval()


def _ids():
    return torch.tensor([[5, 17, 42, 9, 60, 33, 7], [8, 8, 21, 70, 3, 14, 2]])


def _randomize_b(wrapped, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in wrapped.values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


def test_all_linear_targets_every_block_linear_but_not_the_head(random_model_dir):
    model = _model(random_model_dir)
    names = target_names(model, "all-linear")
    suffixes = {n.rsplit(".", 1)[-1] for n in names}
    assert suffixes == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(names) == 7 * model.config.num_hidden_layers and "lm_head" not in names
    assert target_names(model, "q_proj, v_proj") == [n for n in names if n.endswith(("q_proj", "v_proj"))]


def test_lora_at_initialization_equals_the_base_model(random_model_dir):
    base, model = _model(random_model_dir), _model(random_model_dir)
    add_lora(model, target_names(model, "all-linear"), Args())
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, base(_ids()).logits)


def test_only_adapters_get_gradients_and_merge_matches(random_model_dir):
    model = _model(random_model_dir)
    wrapped = add_lora(model, target_names(model, "all-linear"), Args(lora_r=4, lora_alpha=8))
    _randomize_b(wrapped)
    model(_ids()).logits.logsumexp(-1).mean().backward()
    adapters = {id(p) for m in wrapped.values() for p in (m.lora_A, m.lora_B)}
    for name, p in model.named_parameters():
        if id(p) in adapters:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name
    with torch.no_grad():
        adapted = model(_ids()).logits
        merged = merge_lora(model, wrapped)(_ids()).logits
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.allclose(merged, adapted, atol=1e-5)


def test_rslora_scaling_and_update_ratio_by_hand(random_model_dir):
    model = _model(random_model_dir)
    names = target_names(model, "q_proj")
    norms = {n: model.get_submodule(n).weight.norm().item() for n in names}
    wrapped = add_lora(model, names, Args(lora_r=4, lora_alpha=8, use_rslora=True))
    assert all(m.scaling == pytest.approx(8 / 2) for m in wrapped.values())
    assert lora_update_ratio(wrapped, norms) == 0.0
    _randomize_b(wrapped)
    expected = sum((m.scaling * m.lora_B @ m.lora_A).norm().item() / norms[n] for n, m in wrapped.items()) / len(
        wrapped
    )
    assert lora_update_ratio(wrapped, norms) == pytest.approx(expected, rel=1e-4)


def test_nf4_codebook_is_the_normal_quantile_construction():
    # QLoRA appendix E / bitsandbytes' create_normal_map: quantiles of N(0, 1) from offset = 1 - (1/30 + 1/32) / 2 to
    # 0.5, 8 on the positive side and 7 on the negative, plus an exact 0; normalized to [-1, 1]
    normal = torch.distributions.Normal(0.0, 1.0)
    offset = 1 - 0.5 * (1 / 30 + 1 / 32)
    positive = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1].float())
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1].float())
    values = torch.cat([positive, torch.zeros(1), negative]).sort().values
    assert torch.allclose(values / values.abs().max(), NF4_CODEBOOK, atol=1e-4)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantization_error_bound_and_round_trip(kind):
    torch.manual_seed(0)
    w = torch.randn(37, 50) * 0.02  # 1850 weights: not a multiple of the block size
    q = quantize_blockwise(w, kind)
    assert q["codes"].numel() == 29 * 64 // (2 if kind == "nf4" else 1)  # padded to 29 blocks of 64
    back = dequantize_blockwise(q["codes"], q["absmax"], kind, w.shape)
    blocks_absmax = torch.nn.functional.pad(w.flatten(), (0, 29 * 64 - 1850)).view(-1, BLOCK_SIZE).abs().amax(-1)
    per_weight_absmax = blocks_absmax.repeat_interleave(BLOCK_SIZE)[:1850].view(w.shape)
    if kind == "nf4":  # nearest code: at most half the widest gap between neighbouring codes, times the block scale
        bound = (NF4_CODEBOOK.diff().max() / 2) * per_weight_absmax
    else:  # round to the nearest of 255 levels: half a step
        bound = per_weight_absmax / 127 / 2
    assert ((back - w).abs() <= bound + 1e-7).all()
    assert (back - w).abs().max() > 0  # it is lossy
    # values already on the grid survive exactly (each block holds its absmax): the codebook round-trips
    levels = torch.randint(0, 16, (4, BLOCK_SIZE)) if kind == "nf4" else torch.randint(-127, 128, (4, BLOCK_SIZE))
    levels[:, 0] = 15 if kind == "nf4" else 127
    grid = (NF4_CODEBOOK[levels] if kind == "nf4" else levels.float() / 127).flatten() * 0.3
    again = quantize_blockwise(grid, kind)
    assert torch.allclose(dequantize_blockwise(again["codes"], again["absmax"], kind, grid.shape), grid, atol=1e-7)


def test_peft_loads_the_saved_adapter_with_the_same_logits(random_model_dir, tmp_path):
    import peft  # a test dependency: pip install -e '.[dev]'

    model = _model(random_model_dir)
    args = Args(model=str(random_model_dir), lora_r=4, lora_alpha=8)
    wrapped = add_lora(model, target_names(model, "all-linear"), args)
    _randomize_b(wrapped, seed=1)
    save_adapter(tmp_path / "adapter", wrapped, args)
    peft_model = peft.PeftModel.from_pretrained(_model(random_model_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(peft_model(_ids()).logits, model(_ids()).logits, atol=1e-5)


def test_dropout_applies_only_to_the_adapter_input_in_train_mode(random_model_dir):
    """LoRALinear = base(x) + s * B A dropout(x): in train mode the adapter sees x with entries zeroed or scaled by
    1 / (1 - p) (inverted dropout, as PEFT), the base sees x untouched; in eval mode dropout is off."""
    p = 0.5
    model = _model(random_model_dir)
    wrapped = add_lora(model, target_names(model, "q_proj"), Args(lora_r=4, lora_alpha=8, lora_dropout=p))
    _randomize_b(wrapped)
    layer = next(iter(wrapped.values()))
    seen = {}
    layer.dropout.register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0], dropped=out))
    x = torch.randn(3, 5, layer.base.in_features)
    layer.train()
    torch.manual_seed(0)
    out = layer(x)
    ratio = seen["dropped"] / seen["x"]
    kept = ratio != 0
    assert 0 < kept.float().mean() < 1 and torch.allclose(ratio[kept], torch.full_like(ratio[kept], 1 / (1 - p)))
    expected = x @ layer.base.weight.T + layer.scaling * (seen["dropped"] @ layer.lora_A.T) @ layer.lora_B.T
    if layer.base.bias is not None:
        expected = expected + layer.base.bias
    assert torch.allclose(out, expected, atol=1e-5)
    layer.eval()
    no_dropout = x @ layer.base.weight.T + layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T
    if layer.base.bias is not None:
        no_dropout = no_dropout + layer.base.bias
    assert torch.allclose(layer(x), no_dropout, atol=1e-5) and torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("quantize", ["none", "nf4", "int8"])
def test_cli_end_to_end_with_merge(tmp_path, random_model_dir, quantize):
    dropout = 0.1 if quantize == "int8" else 0.0  # one case trains with adapter dropout (saved in adapter_config)
    run_script(
        ROOT / "lora.py",
        "--lora-dropout",
        str(dropout),
        "--model",
        random_model_dir,
        "--eval-prompts",
        "",
        "--max-steps",
        "3",
        "--batch-size",
        "8",
        "--micro-batch-size",
        "4",
        "--quantize",
        quantize,
        "--merge",
        "--output-dir",
        tmp_path,
        "--run-name",
        "run",
    )
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert rows[-1]["train/lora_update_ratio"] > 0 and "eval/loss" in rows[-1]
    config = json.loads((run / "final" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16 and config["lora_dropout"] == dropout
    merged = AutoModelForCausalLM.from_pretrained(run / "merged").eval()
    # the merged model = the base (dequantized, if quantized) + the saved adapters
    model = _model(random_model_dir)
    args = Args(quantize=quantize)
    wrapped = add_lora(model, target_names(model, "all-linear"), args)
    load_adapter(run / "final", wrapped)
    with torch.no_grad():
        assert torch.allclose(merged(_ids()).logits, model(_ids()).logits, atol=1e-4)


@pytest.mark.slow
def test_default_lora_run_learns(tmp_path):
    """`python lora.py` with no flags: held-out target accuracy +20 points over tiny-base."""
    base = json.loads((TINY_BASE / "build_eval.json").read_text())["eval/accuracy"]
    run_script(ROOT / "lora.py", "--output-dir", tmp_path, "--run-name", "lora_default_learns")
    rows = [json.loads(line) for line in (tmp_path / "lora_default_learns" / "metrics.jsonl").open()]
    assert rows[-1]["eval/accuracy"] >= base + 0.20, (base, rows[-1]["eval/accuracy"])


def test_nf4_codes_by_midpoints_are_the_nearest_codes():
    """Bucketizing on the midpoints between neighbouring codes gives argmin |x - code| (without the numel x 16
    distance tensor) on 200k random values; on the midpoints themselves (ties up to float rounding) a code at the
    least distance, within 1e-6."""
    torch.manual_seed(0)
    w = torch.cat([torch.randn(200_000), (NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2 * 3.0, torch.tensor([3.0])])
    w = torch.nn.functional.pad(w, (0, (-w.numel()) % BLOCK_SIZE))
    q = quantize_blockwise(w, "nf4")
    codes = torch.stack([q["codes"] >> 4, q["codes"] & 0xF], -1).flatten().long()
    normed = (w.view(-1, BLOCK_SIZE) / q["absmax"][:, None]).flatten()
    distance = (normed[:, None] - NF4_CODEBOOK).abs()  # (n, 16)
    nearest = distance.argmin(-1)
    assert torch.equal(codes[:200_000], nearest[:200_000])
    chosen = distance.gather(-1, codes[:, None])[:, 0]
    assert (chosen - distance.min(-1).values).abs().max() < 1e-6


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_linear_keeps_no_weight_for_backward(kind):
    """The quantized base saves nothing for backward (the dequantized weight is recomputed there), gives the same
    output and input gradient as F.linear with the dequantized weight, and LoRA keeps its bf16 input as is (no fp32
    copy): what backward keeps is the input once plus the rank-r intermediate."""
    from lora import QuantizedLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 512, bias=True).to(torch.bfloat16)
    layer = LoRALinear(QuantizedLinear(linear, kind), r=4, alpha=8, dropout=0.0, use_rslora=False)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 7, 256, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    saved_bytes = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in saved}.values())
    weight_bytes = 256 * 512 * 2
    assert saved_bytes < weight_bytes / 4  # before: the bf16 weight itself (and an fp32 copy of x)
    assert not any(t.dtype == torch.float32 and t.numel() == x.numel() for t in saved)
    out.float().sum().backward()
    w = layer.base.dequantized_weight(torch.bfloat16).detach()
    x2 = x.detach().clone().requires_grad_()
    ref = (
        torch.nn.functional.linear(x2, w, linear.bias.detach())
        + layer.scaling * (x2 @ layer.lora_A.detach().bfloat16().T) @ layer.lora_B.detach().bfloat16().T
    )
    ref.float().sum().backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-2, atol=1e-2)
    assert layer.base.codebook is None or layer.base.codebook.device == layer.base.codes.device


def test_quantized_linear_is_built_on_the_target_device_from_a_host_layer():
    """Layer-by-layer quantization on the way to the accelerator: a host layer quantized onto `device` has its
    codes, scales, codebook and bias there (checked with the meta device, which any stray host tensor breaks)."""
    from lora import QuantizedLinear

    q = QuantizedLinear(torch.nn.Linear(128, 64, bias=True), "nf4", device=torch.device("meta"))
    assert {t.device.type for t in (q.codes, q.absmax, q.codebook, q.bias)} == {"meta"}
    assert q(torch.empty(2, 128, device="meta")).device.type == "meta"


def _train_a_few_steps(model, wrapped, steps=3, lr=0.05):
    params = [p for m in wrapped.values() for p in m.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)  # Adam: steps of ~lr whatever the gradient scale
    for _ in range(steps):
        loss = model(_ids()).logits.logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


OFT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj"  # the test model's down_proj has 89 (prime) inputs


def test_oft_is_the_identity_at_init_and_stays_orthogonal(random_model_dir):
    from lora import OFTLinear

    base, model = _model(random_model_dir), _model(random_model_dir)
    wrapped = add_lora(model, target_names(model, OFT_TARGETS), Args(adapter="oft", oft_block_size=8))
    assert all(isinstance(m, OFTLinear) for m in wrapped.values())
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, base(_ids()).logits)  # R = I exactly: (I - 0)(I + 0)^-1
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [f"{n}.oft_R" for n in wrapped]
    _train_a_few_steps(model, wrapped)
    with torch.no_grad():
        for m in wrapped.values():
            R = m.rotation().double()  # (n, b, b)
            assert (m.oft_R.abs().max() > 1e-3) and not torch.allclose(R, torch.eye(8, dtype=R.dtype))
            eye = torch.eye(8, dtype=torch.float64).expand_as(R)
            torch.testing.assert_close(R @ R.transpose(1, 2), eye, atol=1e-5, rtol=0)  # orthogonal
            # W R^T keeps W's singular values: only the input space is rotated
            sv = torch.linalg.svdvals(m.merged_weight().double())
            torch.testing.assert_close(sv, torch.linalg.svdvals(m.base_weight().double()), atol=1e-4, rtol=1e-5)
        # the merged model computes what the adapted one does
        out = model(_ids()).logits
        torch.testing.assert_close(merge_lora(model, wrapped)(_ids()).logits, out, atol=1e-4, rtol=1e-4)


def test_oft_block_size_must_divide_the_inputs(random_model_dir):
    model = _model(random_model_dir)
    with pytest.raises(SystemExit, match="--oft-block-size 8 does not divide model.layers.0.mlp.down_proj's 89"):
        add_lora(model, target_names(model, "all-linear"), Args(adapter="oft", oft_block_size=8))


def test_pissa_reconstructs_w_exactly_at_init(random_model_dir):
    from lora import pissa_factors

    base, model = _model(random_model_dir), _model(random_model_dir)
    args = Args(init_lora_weights="pissa", lora_r=4, lora_alpha=8)
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in target_names(model, "all-linear")}
    wrapped = add_lora(model, list(originals), args)
    for name, m in wrapped.items():
        w = originals[name].double()
        s = m.scaling
        # the residual plus the adapter is W; the adapter is W's best rank-r part (its top-r singular values)
        torch.testing.assert_close(m.merged_weight().double(), w, atol=1e-5, rtol=0)
        top = torch.linalg.svdvals(w)[:4]
        adapter_sv = torch.linalg.svdvals(s * m.lora_B.double() @ m.lora_A.double())[:4]
        torch.testing.assert_close(adapter_sv, top, atol=1e-5, rtol=1e-5)  # (an fp32 SVD)
        residual_sv = torch.linalg.svdvals(m.base_weight().double())[:4]
        torch.testing.assert_close(residual_sv, torch.linalg.svdvals(w)[4:8], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).logits, base(_ids()).logits, atol=1e-4, rtol=0)
    # --pissa-niter (randomized SVD): W is still reconstructed exactly (the residual absorbs the approximation),
    # and the adapter still holds most of the top-r energy
    w = originals[next(iter(originals))]
    a0, b0, residual = pissa_factors(w, 4, 2.0, niter=4)
    torch.testing.assert_close(residual + 2.0 * b0 @ a0, w, atol=1e-5, rtol=0)
    energy = torch.linalg.svdvals(2.0 * b0 @ a0).pow(2).sum() / torch.linalg.svdvals(w)[:4].pow(2).sum()
    assert 0.9 < energy <= 1 + 1e-5


@pytest.mark.parametrize("variant", ["oft", "pissa"])
def test_peft_loads_oft_and_pissa_adapters_with_the_same_logits(random_model_dir, tmp_path, variant):
    """Saved after training steps, loaded by PEFT onto the original base model: the same logits (PiSSA as the
    rank-2r LoRA of W's change, as PEFT's own conversion writes it)."""
    import peft

    model = _model(random_model_dir)
    extra = {"adapter": "oft", "oft_block_size": 8} if variant == "oft" else {"init_lora_weights": "pissa"}
    args = Args(model=str(random_model_dir), lora_r=4, lora_alpha=8, **extra)
    targets = OFT_TARGETS if variant == "oft" else "all-linear"
    wrapped = add_lora(model, target_names(model, targets), args)
    _train_a_few_steps(model, wrapped)
    save_adapter(tmp_path / "adapter", wrapped, args)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == ("OFT" if variant == "oft" else "LORA")
    peft_model = peft.PeftModel.from_pretrained(_model(random_model_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        ours = model(_ids()).logits
        assert not torch.allclose(ours, _model(random_model_dir)(_ids()).logits, atol=1e-3)  # training moved it
        torch.testing.assert_close(peft_model(_ids()).logits, ours, atol=1e-4, rtol=1e-4)
    # and our own loader rebuilds the same model from the saved directory
    again = _model(random_model_dir)
    again_wrapped = add_lora(again, target_names(again, targets), args)
    load_adapter(tmp_path / "adapter", again_wrapped)
    with torch.no_grad():
        torch.testing.assert_close(again(_ids()).logits, ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "variant",
    [["--adapter", "oft", "--oft-block-size", "8", "--target-modules", OFT_TARGETS], ["--init-lora-weights", "pissa"]],
)
def test_cli_oft_and_pissa_with_merge(tmp_path, random_model_dir, variant):
    run_script(
        ROOT / "lora.py", "--model", random_model_dir, "--eval-prompts", "", "--max-steps", "3", "--batch-size", "8",
        "--micro-batch-size", "4", "--merge", "--output-dir", tmp_path, "--run-name", "run", *variant,
    )  # fmt: skip
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert rows[-1]["train/lora_update_ratio"] > 0
    import peft

    merged = AutoModelForCausalLM.from_pretrained(run / "merged").eval()
    peft_model = peft.PeftModel.from_pretrained(_model(random_model_dir), run / "final").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(_ids()).logits, peft_model(_ids()).logits, atol=1e-4, rtol=1e-4)
