"""One tiny-world row per algorithm variant: the variants tables of docs/grpo.md and docs/opd.md.

    python benchmarks/variants.py grpo          # GRPO, GSPO, CISPO, RLOO, REINFORCE++, overlong shaping
    python benchmarks/variants.py opd           # the four --objective values side by side
    python benchmarks/variants.py lora          # LoRA, PiSSA-initialized LoRA, OFT
    python benchmarks/variants.py grpo --only cispo rloo

Each variant is the real command line (`python grpo.py ...` / `python opd.py ...` with the script's defaults plus the
variant's flags), run one after the other in fresh processes (never two at once: on 2 CPU cores they slow each other
~8x), and its row is read back from the run's metrics.jsonl: the final held-out target accuracy, general accuracy,
the KL of the final rollout policy to the initial model (grpo: `train/kl` (k3) and `train/kl_k1`, measured on the last
step's rollout; opd: `train/reverse_kl` to the teacher), the drift from the initial model every script logs at its
last evaluation (`eval/kl_to_init`, k3 on the model's own samples, and `eval/weight_drift`), and the process's wall
time (including its evaluations).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import tyro

ROOT = Path(__file__).resolve().parent.parent

# name -> extra flags. grpo: every variant takes two updates per rollout batch (--num-iterations 2), the setting in
# which the ratio departs from 1 and the importance-sampling variants differ at all (with one update per batch the
# ratio is exactly 1 and GSPO and CISPO give GRPO's gradient).
VARIANTS = {
    "grpo": {
        "grpo": ["--num-iterations", "2"],
        "gspo": ["--num-iterations", "2", "--importance-sampling-level", "sequence"],
        "cispo": ["--num-iterations", "2", "--loss-type", "cispo"],
        "rloo": ["--num-iterations", "2", "--advantage", "rloo"],
        "reinforce++": ["--num-iterations", "2", "--advantage", "reinforce++"],
        "overlong": ["--num-iterations", "2", "--overlong-buffer", "3"],
    },
    "opd": {
        "sampled": ["--objective", "sampled"],
        "full": ["--objective", "full"],
        "forward-topk": ["--objective", "forward-topk"],
        "jsd": ["--objective", "jsd"],
    },
    "lora": {
        "lora": [],
        "pissa": ["--init-lora-weights", "pissa"],
        "oft": ["--adapter", "oft"],
    },
}


@dataclass
class Args:
    script: tyro.conf.Positional[Literal["grpo", "opd", "lora"]]
    """which script's variants"""
    only: list[str] = field(default_factory=list)
    """run only these variants (default: all)"""
    output_dir: str | None = None
    """where the runs go (default: a temporary directory)"""


def row(script: str, name: str, flags: list[str], out: Path) -> dict:
    cmd = [sys.executable, f"{script}.py", *flags, "--output-dir", str(out), "--run-name", name]
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    wall = time.time() - t0
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    if "train/kl" in last:
        kl = f"{last['train/kl']:.3f} / {last['train/kl_k1']:.3f}"
    elif "train/reverse_kl" in last:
        kl = f"{last['train/reverse_kl']:.3f}"
    else:
        kl = "—"
    drift = f"{last['eval/kl_to_init']:.3f} / {last['eval/weight_drift']:.4f}" if "eval/kl_to_init" in last else "—"
    return {
        "command": f"python {script}.py {' '.join(flags)}",
        "accuracy": last["eval/accuracy"],
        "general": last["eval/general_accuracy"],
        "kl": kl,
        "drift": drift,
        "wall_s": wall,
        "extra": {k: v for k, v in last.items() if k in ("rollout/overlong_penalty", "train/clip_frac_high")},
    }


def main(args: Args) -> None:
    variants = {k: v for k, v in VARIANTS[args.script].items() if not args.only or k in args.only}
    unknown = set(args.only) - set(VARIANTS[args.script])
    if unknown:
        raise SystemExit(f"error: --only {sorted(unknown)}: {args.script} has {list(VARIANTS[args.script])}")
    out = Path(args.output_dir or tempfile.mkdtemp(prefix="variants-"))
    kl_name = {"grpo": "train/kl (k3 / k1)", "opd": "train/reverse_kl", "lora": "-"}[args.script]
    print(
        f"| variant | command | eval/accuracy | eval/general_accuracy | {kl_name} | eval/kl_to_init / weight_drift "
        "| time |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, flags in variants.items():
        r = row(args.script, name, flags, out)
        m, s = divmod(round(r["wall_s"]), 60)
        print(
            f"| {name} | `{r['command']}` | {r['accuracy']:.3f} | {r['general']:.3f} | {r['kl']} | {r['drift']} "
            f"| {m} min {s} s |" + (f" {r['extra']}" if r["extra"] else ""),
            flush=True,
        )


if __name__ == "__main__":
    main(tyro.cli(Args))
