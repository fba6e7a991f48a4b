"""analysis/forgetting.py and analysis/interpolate.py end to end on tiny runs, and their errors on bad input. Marked
slow: they train three 2-step runs (the quick loop keeps the pure functions and one CLI test per script)."""

import json
import sys

import pytest
from conftest import ROOT, TINY_BASE, read_metrics, run_script

sys.path.insert(0, str(ROOT / "analysis"))


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """The forgetting pipeline itself trains two methods for 2 steps each and writes its table and plot."""
    out = tmp_path_factory.mktemp("forgetting")
    proc = run_script(
        ROOT / "analysis" / "forgetting.py", "--methods", "sft", "lora", "grpo", "--lr-multipliers", "1",
        "--max-steps", "2", "--extra=--kl-prompts 8 --kl-samples 2", "--output", out,
    )  # fmt: skip
    assert "wrote" in proc.stdout
    return out


@pytest.mark.slow
def test_forgetting_trains_reads_and_writes_the_frontier(grid):
    table = (grid / "forgetting.md").read_text()
    for method in ("sft", "lora", "grpo"):
        rows = [line for line in table.splitlines() if line.startswith(f"| {method} |")]
        assert len(rows) == 2, method  # step 0 and step 2
        assert rows[0].split("|")[4].strip() == "+0.000"  # the gain at step 0
    assert "| imitation (SFT, PEFT) | 4 |" in table and "| on-policy RL (GRPO, PPO) | 2 | too few points" in table
    pytest.importorskip("matplotlib")  # in [dev]; [plots] for users
    assert (grid / "forgetting.png").stat().st_size > 10_000


@pytest.mark.slow
def test_forgetting_reads_existing_runs_and_fits_by_hand(grid, tmp_path):
    import forgetting

    runs = [grid / "runs" / f"{m}_lr1x" for m in ("sft", "lora", "grpo")]  # the grid's order
    proc = run_script(ROOT / "analysis" / "forgetting.py", "--runs", *runs, "--output", tmp_path)
    assert (tmp_path / "forgetting.md").read_text() == (grid / "forgetting.md").read_text()
    assert "from 3 runs" in proc.stdout
    a, b, r2 = forgetting.fit_line([0.0, 1.0, 2.0], [1.0, 3.0, 5.0])  # y = 1 + 2x exactly
    assert (a, b, r2) == pytest.approx((1.0, 2.0, 1.0))
    assert forgetting.fit_line([0.0, 1.0], [0.0, 1.0]) is None


@pytest.mark.parametrize(
    "setup,message",
    [
        (lambda d: None, "no such directory"),
        (lambda d: d.mkdir(), "no args.json"),
        (lambda d: (d.mkdir(), (d / "args.json").write_text("{}"), (d / "metrics.jsonl").write_text("{\n")),
         "metrics.jsonl line 1 is not JSON"),
        (lambda d: (d.mkdir(), (d / "args.json").write_text("{}"), (d / "metrics.jsonl").write_text('{"step": 1}\n')),
         "no step-0 evaluation"),
    ],
    ids=["missing", "not-a-run", "malformed", "no-evaluation"],
)  # fmt: skip
def test_a_bad_run_directory_gets_one_line(tmp_path, setup, message):
    run = tmp_path / "run"
    setup(run)
    proc = run_script(ROOT / "analysis" / "forgetting.py", "--runs", run, "--output", tmp_path / "out", check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --runs {run}") and message in last


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "lora"])
def test_interpolation_ends_at_both_models(grid, tmp_path, method):
    """alpha 0 is the base (KL 0, its accuracy), alpha 1 the fine-tuned model (a full model, or an adapter merged)."""
    run = grid / "runs" / f"{method}_lr1x"
    proc = run_script(
        ROOT / "analysis" / "interpolate.py", "--base", TINY_BASE, "--finetuned", run / "final", "--alphas", "0", "0.5",
        "1", "--kl-prompts", "8", "--kl-samples", "2", "--output", tmp_path,
    )  # fmt: skip
    assert "wrote" in proc.stdout
    lines = (tmp_path / "interpolate.md").read_text().splitlines()
    rows = [line.split("|") for line in lines if line.startswith(("| 0", "| 1"))]
    assert [r[1].strip() for r in rows] == ["0.0", "0.5", "1.0"]
    base = json.loads((TINY_BASE / "build_eval.json").read_text())
    logged = read_metrics(run)
    assert float(rows[0][2]) == pytest.approx(base["eval/accuracy"]) and float(rows[0][4]) == 0
    assert float(rows[2][2]) == pytest.approx(logged[-1]["eval/accuracy"], abs=0.006)  # greedy; one flip at most


def test_interpolation_refuses_a_model_of_another_shape(tmp_path, random_model_dir):
    proc = run_script(
        ROOT / "analysis" / "interpolate.py", "--base", TINY_BASE, "--finetuned", random_model_dir, "--alphas", "0",
        "--output", tmp_path, check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "does not have --base" in proc.stderr.strip().splitlines()[-1]
