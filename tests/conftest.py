import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never download; an unknown id fails at once
os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(ROOT))
TINY_BASE = ROOT / "assets" / "tiny-base"


def load_build_module():
    spec = importlib.util.spec_from_file_location("assets_build", ROOT / "assets" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["assets_build"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def chat_tokenizer(tmp_path_factory):
    """The tiny world's character-level ChatML tokenizer, built fresh (independent of the shipped weights)."""
    from common.model import load_tokenizer

    path = tmp_path_factory.mktemp("tok")
    load_build_module().build_tokenizer(path)
    return load_tokenizer(str(path))


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory):
    """A randomly initialized tiny Llama with the tiny-world tokenizer, saved in HF format."""
    from common.model import load_tokenizer

    build = load_build_module()
    path = tmp_path_factory.mktemp("random_model")
    tok = build.build_tokenizer(path)
    build.build_init_model(path, load_tokenizer(str(path)), build.Args(hidden_size=32, num_layers=2))
    del tok
    return path


def run_script(*args, check=True, timeout=900):
    """Run a script from the repository root as a user would; returns the CompletedProcess."""
    proc = subprocess.run(
        [sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
