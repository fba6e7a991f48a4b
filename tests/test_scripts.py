"""Every script's Args: each flag has a one-line docstring (tyro turns it into --help), and --help runs."""

import dataclasses
import importlib
import inspect

import pytest
from conftest import run_script

SCRIPTS = ["sft", "lora", "dpo", "reward_model", "grpo", "ppo", "opd"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_a_docstring(script):
    args_cls = importlib.import_module(script).Args
    lines = inspect.getsource(args_cls).splitlines()
    for f in dataclasses.fields(args_cls):
        i = next(k for k, line in enumerate(lines) if line.strip().startswith(f"{f.name}:"))
        assert lines[i + 1].strip().startswith('"""'), f"{script}.py --{f.name.replace('_', '-')} has no docstring"


@pytest.mark.parametrize("script", ["dpo", "reward_model", "lora", "ppo", "opd"])
def test_help_runs(script):
    out = run_script(f"{script}.py", "--help").stdout
    assert "--model" in out and "--learning-rate" in out
