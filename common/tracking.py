"""One tracker per run: a console progress bar, `metrics.jsonl` always, and wandb with `--track`.

Run names are `{script}__{seed}__{unix time}`; wandb honours `WANDB_MODE=offline` (and the other WANDB_* variables).
Under torchrun only rank 0 writes (bar, metrics.jsonl, wandb); the scripts reduce metrics over ranks before `log`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path

from tqdm.auto import tqdm

from common import dist


def default_run_name(script: str, seed: int) -> str:
    """`{script}__{seed}__{unix time}` — rank 0's time on every rank."""
    return dist.broadcast_object(f"{script}__{seed}__{int(time.time())}")


class Tracker:
    def __init__(self, run_dir: Path, args, *, script: str, total_steps: int, start_step: int = 0):
        self.run_dir = Path(run_dir)
        self.main = dist.is_main()
        self.metrics_file, self.wandb = None, None
        self.bar = tqdm(total=total_steps, initial=start_step, desc=script, dynamic_ncols=True, disable=not self.main)
        if not self.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config = asdict(args) if is_dataclass(args) else dict(vars(args))
        # A resumed run appends to the same file, after dropping rows logged past its checkpoint by the stopped run.
        path = self.run_dir / "metrics.jsonl"
        if start_step > 0 and path.exists():
            rows = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= start_step]
            path.write_text("".join(line + "\n" for line in rows))
        self.metrics_file = path.open("a")
        if getattr(args, "track", False):
            import wandb

            self.wandb = wandb.init(
                project=args.wandb_project,
                entity=args.wandb_entity,
                name=self.run_dir.name,
                id=self.run_dir.name,
                resume="allow",
                config=config,
                dir=str(self.run_dir),
            )

    def log(self, metrics: dict, step: int) -> None:
        """Log one metrics dict for optimizer step `step` (log once per step; see STYLE.md)."""
        if not self.main:
            return
        clean = {k: (float(v) if hasattr(v, "__float__") else v) for k, v in metrics.items()}
        self.metrics_file.write(json.dumps({"step": step, **clean}) + "\n")
        self.metrics_file.flush()
        if self.wandb is not None:
            self.wandb.log(clean, step=step)
        shown = {}
        for key, short in (("train/loss", "loss"), ("eval/accuracy", "acc"), ("perf/tokens_per_s", "tok/s")):
            if key in clean and isinstance(clean[key], float) and math.isfinite(clean[key]):
                shown[short] = f"{clean[key]:.4g}"
        if shown:
            self.bar.set_postfix(shown, refresh=False)

    def step(self, n: int = 1) -> None:
        self.bar.update(n)

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar (rank 0 only)."""
        if self.main:
            self.bar.write(message)

    def close(self) -> None:
        if self.metrics_file is None or self.metrics_file.closed:
            self.bar.close()
            return
        self.bar.close()
        self.metrics_file.close()
        if self.wandb is not None:
            self.wandb.finish()


def peak_memory_gb(device) -> float:
    """Peak accelerator memory allocated (CUDA), else the process's peak resident set size, in GB."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (1e9 if sys.platform == "darwin" else 1e6)
