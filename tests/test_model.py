"""Model and tokenizer loading, atomic saving, and the errors for unknown models."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.model import find_checkpoint, load_model, load_tokenizer, resolve_dtype, save_model


def test_saved_model_reloads_with_plain_transformers(random_model_dir, tmp_path):
    model = load_model(str(random_model_dir), dtype="float32", device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # not the initial weights
    tokenizer = load_tokenizer(str(random_model_dir))
    out = save_model(model, tokenizer, tmp_path / "final")
    assert (out / "model.safetensors").is_file() and not (tmp_path / "final.tmp").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, 99, (2, 12))
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(out).chat_template == tokenizer.chat_template
    # saving again over an existing directory replaces it whole
    save_model(model, tokenizer, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "final").iterdir())


def test_unknown_model_and_missing_path_give_one_clear_line(tmp_path):
    with pytest.raises(SystemExit, match=r"--model '\./no/such/model': no such directory"):
        load_model("./no/such/model")
    with pytest.raises(SystemExit, match=r"'no-such-org/no-such-model-xyz': no such directory, and not in the local"):
        load_model("no-such-org/no-such-model-xyz")  # (the tests run with HF_HUB_OFFLINE=1)


def test_a_typo_in_model_fails_fast_without_the_hub(monkeypatch):
    """No network and HF_HUB_OFFLINE unset: one line at once, not a minute of hub retries."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []

    def unreachable(*a, **k):
        calls.append(k.get("timeout"))
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    for typo in ("my-model-dir", "runs/typo"):
        with pytest.raises(SystemExit, match=rf"--model '{typo}': no such directory, not in the local hub cache, and"):
            load_model(typo)
    assert calls == [10, 10]  # one short request each

    class NotFound(huggingface_hub.errors.RepositoryNotFoundError):
        def __init__(self):  # (the real one is built from an HTTP response)
            Exception.__init__(self, "404")

    def missing(*a, **k):
        raise NotFound()

    monkeypatch.setattr(huggingface_hub, "model_info", missing)
    with pytest.raises(SystemExit, match=r"'my-other-typo': no such directory, and no such model on the hub"):
        load_model("my-other-typo")


def test_tokenizer_pad_fallback_warns(random_model_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(random_model_dir)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no pad token"):
        loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token and loaded.padding_side == "left"


def test_dtype_resolution():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(SystemExit, match="--dtype 'float8'"):
        resolve_dtype("float8", torch.device("cpu"))


def test_find_checkpoint_picks_the_newest(tmp_path):
    for step in (2, 10, 4):
        d = tmp_path / "checkpoints" / f"step_{step}"
        d.mkdir(parents=True)
        (d / "trainer_state.pt").write_bytes(b"")
    (tmp_path / "checkpoints" / "step_20.tmp").mkdir()  # an interrupted write is never picked
    assert find_checkpoint(tmp_path).name == "step_10"
    with pytest.raises(SystemExit, match="no checkpoint found"):
        find_checkpoint(tmp_path / "elsewhere")


def test_gradient_checkpointing_gives_the_same_gradient(random_model_dir):
    from common.logprobs import token_logprobs

    ids = torch.randint(4, 99, (2, 16))
    mask = torch.ones_like(ids)
    grads = []
    for checkpointing in (False, True):
        model = load_model(str(random_model_dir), dtype="float32", device="cpu", gradient_checkpointing=checkpointing)
        model.train()
        token_logprobs(model, ids, mask).sum().backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-7)


def test_auto_dtype_never_picks_emulated_bf16(monkeypatch):
    """A GPU that only emulates bf16 (e.g. a V100) trains in fp32 under `auto`; one with native bf16 in bf16."""
    native = {"value": False}
    monkeypatch.setattr(
        torch.cuda,
        "is_bf16_supported",
        lambda including_emulation=True: including_emulation or native["value"],  # emulation: "supported"
    )
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float32
    native["value"] = True
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("pure-bf16", torch.device("cpu")) == torch.bfloat16


def test_dropout_is_off_after_loading(tmp_path):
    """A checkpoint with dropout (GPT-2 style): two training-mode forwards give the same logits, so the log-probs of a
    training forward are those of the function that sampled."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    ids = torch.randint(0, 64, (2, 10))
    raw = GPT2LMHeadModel.from_pretrained(tmp_path).train()
    assert not torch.equal(raw(ids).logits, raw(ids).logits)  # dropout is there to turn off
    model = load_model(str(tmp_path), dtype="float32", device="cpu").train()
    torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_attn_implementation_and_chat_template_kwargs_flags(random_model_dir):
    model = load_model(str(random_model_dir), dtype="float32", device="cpu", attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    with pytest.raises(SystemExit, match=r"--attn-implementation 'no_such_kernel'"):
        load_model(str(random_model_dir), dtype="float32", device="cpu", attn_implementation="no_such_kernel")
    tok = load_tokenizer(str(random_model_dir), '{"enable_thinking": false}')
    assert tok.cleanpost_template_kwargs == {"enable_thinking": False}
    with pytest.raises(SystemExit, match="--chat-template-kwargs is not valid JSON"):
        load_tokenizer(str(random_model_dir), "{enable_thinking: false}")
    with pytest.raises(SystemExit, match="--chat-template-kwargs must be a JSON object"):
        load_tokenizer(str(random_model_dir), "[1, 2]")


def test_a_checkpoint_is_flushed_once_before_its_name_says_complete(random_model_dir, tmp_path, monkeypatch):
    """save_checkpoint fsyncs every file it wrote exactly once (the model's weights are not flushed twice, once by
    save_model and again for the checkpoint), and all of them before `step_N.tmp` is renamed to `step_N`."""
    import os

    from common.model import save_checkpoint

    model = load_model(str(random_model_dir), dtype="float32", device="cpu")
    tokenizer = load_tokenizer(str(random_model_dir))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    synced = []
    real_fsync = os.fsync

    def counting_fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if os.path.isfile(path):
            synced.append(path)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    ckpt = save_checkpoint(tmp_path, 3, model, tokenizer, optimizer, None)
    files = sorted(str(f) for f in ckpt.rglob("*") if f.is_file())
    tmp_dir = str(ckpt) + ".tmp"
    assert files and sorted(p.replace(tmp_dir, str(ckpt)) for p in synced) == files
    assert all(p.startswith(tmp_dir + "/") for p in synced)  # flushed under the .tmp name, before the rename
