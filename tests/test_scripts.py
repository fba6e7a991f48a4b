"""Every script's Args: each flag has a one-line docstring (tyro turns it into --help), --help runs, and tour.sh runs
them all in order."""

import dataclasses
import importlib
import inspect
import os
import subprocess
import sys

import pytest
from conftest import ROOT, run_script

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


@pytest.mark.slow
def test_the_tour_runs_every_script_in_order_and_prints_one_table(tmp_path):
    """tour.sh, shortened to one step a script: every run succeeds and the table has one row each, in order."""
    env = {**os.environ, "TOUR_FLAGS": "--max-steps 1", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "tour.sh", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1].split()[0] for line in proc.stdout.splitlines() if ".py" in line]
    assert rows == ["sft.py", "reward_model.py", "ppo.py", "dpo.py", "grpo.py", "opd.py", "lora.py"]
    assert (tmp_path / "opd" / "args.json").read_text().count(str(tmp_path / "grpo" / "final")) == 1  # its teacher
    assert "total:" in proc.stdout
