"""The forgetting frontier: what each post-training method gains on the new skill and what it costs the old ones.

    python analysis/forgetting.py                                   # train the grid on the tiny world, then plot
    python analysis/forgetting.py --methods sft grpo --lr-multipliers 1
    python analysis/forgetting.py --runs runs/sft__1__1733 runs/grpo__1__1734    # existing run directories

Every method runs through its own script's command line with the script's defaults, at each learning rate of
`--lr-multipliers` times the script's default, one run after another in fresh processes. Each evaluation of each
run (step 0, every `--eval-every` of the script, the last step) is one point: its held-out target accuracy
(`eval/accuracy`), general accuracy (`eval/general_accuracy`, the other skills), and drift from the initial model
(`eval/kl_to_init`, k3 on the model's own samples of held-out target prompts, and `eval/weight_drift`), which every
training script logs the same way (common/drift.py). Writes, in `--output`:

    forgetting.md    one row per point, and a least-squares line per method family of general-accuracy drop
                     against eval/kl_to_init (the "RL's Razor" relation: forgetting tracks the KL to the base
                     measured on the new task's prompts; Shenfeld et al. 2025)
    forgetting.png   left: target accuracy gain vs general accuracy, one curve per method (its runs' points in
                     step order); right: general-accuracy drop vs eval/kl_to_init with the fitted line per family
                     (needs matplotlib: pip install -e ".[plots]"; without it only the table is written)
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parent.parent

# method -> (script, extra flags, family). Each script's default learning rate is read from its Args.
METHODS = {
    "sft": ("sft", [], "imitation (SFT, PEFT)"),
    "lora": ("lora", [], "imitation (SFT, PEFT)"),
    "lora-pissa": ("lora", ["--init-lora-weights", "pissa"], "imitation (SFT, PEFT)"),
    "oft": ("lora", ["--adapter", "oft"], "imitation (SFT, PEFT)"),
    "dpo": ("dpo", [], "preference (DPO)"),
    "grpo": ("grpo", [], "on-policy RL (GRPO, PPO)"),
    "ppo": ("ppo", [], "on-policy RL (GRPO, PPO)"),
    "opd": ("opd", [], "on-policy distillation"),
}


@dataclass
class Args:
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """methods to train: sft, lora (r=16), lora-pissa, oft, dpo, grpo, ppo, opd"""
    lr_multipliers: list[float] = field(default_factory=lambda: [0.1, 1.0])
    """each method runs at these multiples of its script's default learning rate"""
    runs: list[str] = field(default_factory=list)
    """existing run directories to read instead of training (any script that logs eval/kl_to_init)"""
    output: str = "analysis/results"
    """where forgetting.md, forgetting.png and (when training) the runs/ go"""
    max_steps: int | None = None
    """override every script's --max-steps (a smoke test of the pipeline; the defaults are the tiny-world runs)"""
    extra: str = ""
    """more flags for every training command, one string (e.g. --extra='--kl-samples 8')"""


def default_lr(script: str) -> float:
    sys.path.insert(0, str(ROOT))
    module = __import__(script)
    return module.Args.learning_rate


def train(args: Args, out: Path) -> list[Path]:
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: --methods {', '.join(unknown)}: not one of {', '.join(METHODS)}")
    runs = []
    for method in args.methods:
        script, flags, _ = METHODS[method]
        for mult in args.lr_multipliers:
            lr = default_lr(script) * mult
            name = f"{method}_lr{mult:g}x"
            run = out / "runs" / name
            runs.append(run)
            if (run / "final").exists():  # a finished run of an earlier invocation
                print(f"{name}: done before, reading it", flush=True)
                continue
            cmd = [sys.executable, f"{script}.py", *flags, "--learning-rate", f"{lr:g}", *shlex.split(args.extra)]
            cmd += ["--max-steps", str(args.max_steps)] if args.max_steps else []
            cmd += ["--output-dir", str(out / "runs"), "--run-name", name]
            if run.exists():  # a run killed before its end: resume it
                cmd = [sys.executable, f"{script}.py", "--resume", str(run)]
            t0 = time.time()
            proc = subprocess.run(
                cmd, check=False, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
            if proc.returncode != 0:
                raise SystemExit(f"error: {' '.join(cmd)} failed:\n{proc.stderr.strip().splitlines()[-1]}")
            print(f"{name}: {time.time() - t0:.0f} s", flush=True)
    return runs


def read_run(run: Path) -> dict:
    """A run directory's method, learning rate and evaluation points; one clear line if it is not a usable run."""
    run = Path(run)
    if not run.is_dir():
        raise SystemExit(f"error: --runs {run}: no such directory")
    for name in ("args.json", "metrics.jsonl"):
        if not (run / name).is_file():
            raise SystemExit(f"error: --runs {run}: no {name} (not a run directory of one of the training scripts)")
    try:
        saved = json.loads((run / "args.json").read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: --runs {run}: args.json is not JSON ({e})") from None
    points = []
    for i, line in enumerate((run / "metrics.jsonl").read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise SystemExit(f"error: --runs {run}: metrics.jsonl line {i} is not JSON") from None
        if "eval/accuracy" in row and "eval/general_accuracy" in row:
            points.append(row)
    if not points or points[0].get("step") != 0:
        raise SystemExit(f"error: --runs {run}: no step-0 evaluation with eval/accuracy and eval/general_accuracy")
    script = saved.get("script", "?")
    method = script
    if script == "lora":
        pissa = saved.get("init_lora_weights") == "pissa"
        method = "oft" if saved.get("adapter") == "oft" else "lora-pissa" if pissa else "lora"
    family = METHODS.get(method, (None, None, script))[2]
    return {"run": run, "method": method, "family": family, "lr": saved.get("learning_rate"), "points": points}


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float, float] | None:
    """Least-squares y = a + b x and its R^2; None with fewer than 3 points or no spread in x."""
    n = len(xs)
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return a, b, 1 - ss_res / ss_tot if ss_tot else 1.0


def table(runs: list[dict]) -> str:
    lines = [
        (
            "| method | lr | step | target gain | `eval/accuracy` | `eval/general_accuracy` | general drop "
            "| `eval/kl_to_init` | `eval/weight_drift` |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        first = r["points"][0]
        for p in r["points"]:
            kl = p.get("eval/kl_to_init")
            drift = p.get("eval/weight_drift")
            lines.append(
                f"| {r['method']} | {r['lr']:g} | {p['step']} | {p['eval/accuracy'] - first['eval/accuracy']:+.3f} "
                f"| {p['eval/accuracy']:.3f} | {p['eval/general_accuracy']:.3f} "
                f"| {first['eval/general_accuracy'] - p['eval/general_accuracy']:+.3f} "
                f"| {'—' if kl is None else f'{kl:.4f}'} | {'—' if drift is None else f'{drift:.4f}'} |"
            )
    fits = ["", "| family | points | general drop = a + b * kl_to_init | R^2 |", "|---|---|---|---|"]
    for family, (xs, ys) in families(runs).items():
        fit = fit_line(xs, ys)
        fits.append(
            f"| {family} | {len(xs)} | "
            + (f"a = {fit[0]:+.4f}, b = {fit[1]:+.4f} | {fit[2]:.2f} |" if fit else "too few points | — |")
        )
    return "\n".join(lines + fits) + "\n"


def families(runs: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    out: dict[str, tuple[list[float], list[float]]] = {}
    for r in runs:
        first = r["points"][0]
        for p in r["points"]:
            if "eval/kl_to_init" in p:
                xs, ys = out.setdefault(r["family"], ([], []))
                xs.append(p["eval/kl_to_init"])
                ys.append(first["eval/general_accuracy"] - p["eval/general_accuracy"])
    return out


def plot(runs: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors, labelled = {}, set()
    for r in runs:
        first = r["points"][0]
        color = colors.setdefault(r["method"], f"C{len(colors)}")
        gains = [p["eval/accuracy"] - first["eval/accuracy"] for p in r["points"]]
        general = [p["eval/general_accuracy"] for p in r["points"]]
        label = None if r["method"] in labelled else r["method"]  # one legend entry a method, whatever its lrs
        labelled.add(r["method"])
        lowest = min(q["lr"] for q in runs if q["method"] == r["method"])
        style = "--o" if r["lr"] == lowest and len({q["lr"] for q in runs if q["method"] == r["method"]}) > 1 else "-o"
        left.plot(gains, general, style, color=color, ms=3, lw=1, alpha=0.85, label=label)
        left.plot(gains[-1:], general[-1:], "o", color=color, ms=6)  # the run's end
    left.set(xlabel="target accuracy gain (eval/accuracy - step 0)", ylabel="general accuracy (other skills)")
    left.set_title("what each method gains and keeps (points: evaluations; dashed: lower lr)", fontsize=9)
    left.legend(fontsize=7, loc="lower left")
    fam_colors = {}
    for family, (xs, ys) in families(runs).items():
        color = fam_colors.setdefault(family, f"C{len(fam_colors)}")
        right.scatter(xs, ys, s=10, color=color, label=family)
        fit = fit_line(xs, ys)
        if fit:
            x0, x1 = min(xs), max(xs)
            right.plot([x0, x1], [fit[0] + fit[1] * x0, fit[0] + fit[1] * x1], color=color, lw=1)
    right.set(xlabel="eval/kl_to_init (nats/token, on held-out target prompts)", ylabel="general accuracy drop")
    right.set_title("forgetting against the KL to the initial model", fontsize=9)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def main(args: Args) -> None:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    run_dirs = [Path(r) for r in args.runs] if args.runs else train(args, out)
    runs = [read_run(r) for r in run_dirs]
    (out / "forgetting.md").write_text(table(runs))
    wrote_plot = plot(runs, out / "forgetting.png")
    print(
        f"wrote {out / 'forgetting.md'}"
        + (f" and {out / 'forgetting.png'}" if wrote_plot else " (no plot: pip install -e '.[plots]')")
        + f" from {len(runs)} runs in {time.time() - t0:.0f} s"
    )


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__.split("\n\n")[0]))
