"""The run directory and one tracker per run: a console progress bar, `metrics.jsonl` always, wandb with `--track`.

`open_run` makes a new run's directory (never an existing one) or reopens a run for `--resume` with its saved
arguments. Run names are `{script}__{seed}__{unix time}` (with `_2`, `_3`... when that name is taken); wandb honours
`WANDB_MODE=offline` (and the other WANDB_* variables). Under torchrun only rank 0 writes (bar, metrics.jsonl, wandb,
args.json); the scripts reduce metrics over ranks before `log`.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path

from tqdm.auto import tqdm

from common import BEFORE_DIE, die, dist

# Flags a resumed run may change: when and how it evaluates, saves and logs, and how far it goes. Every other flag
# defines the run (its data, model, optimization, sampling, evaluation content) and keeps its saved value.
RESUME_MAY_CHANGE = {
    "resume",
    "max_steps",
    "eval_every",
    "eval_batch_size",
    "save_every",
    "track",
    "wandb_project",
    "wandb_entity",
    "num_proc",
    "output_dir",
}


def _is_new(run_dir: Path) -> bool:
    """A directory that no run has written to: absent, or made by a start that stopped before its first metric."""
    return not run_dir.exists() or not any(
        (run_dir / name).exists() for name in ("metrics.jsonl", "checkpoints", "final")
    )


def _make_run_dir(output_dir: str, run_name: str | None, script: str, seed: int) -> Path:
    """Rank 0 creates the directory (`mkdir` without exist_ok: two runs started in the same second get two names);
    every rank gets its path."""
    path = None
    if dist.is_main():
        base = Path(output_dir) / (run_name or f"{script}__{seed}__{int(time.time())}")
        if run_name is not None:
            if not _is_new(base):
                die(
                    f"--run-name {run_name!r}: {base} holds a run already; continue it with --resume {base}, or "
                    "choose another --run-name"
                )
            base.mkdir(parents=True, exist_ok=True)
            path = base
        else:
            base.parent.mkdir(parents=True, exist_ok=True)
            for k in range(1, 10_000):
                candidate = base if k == 1 else base.with_name(f"{base.name}_{k}")
                try:
                    candidate.mkdir()
                    path = candidate
                    break
                except FileExistsError:
                    continue
        made = path

        def remove_if_unused():  # a start that stopped (a bad flag, a crash) before its first metric leaves nothing
            if _is_new(made) and made.exists():
                shutil.rmtree(made, ignore_errors=True)

        atexit.register(remove_if_unused)
    return Path(dist.broadcast_object(str(path) if path else None))


def _cli_flags(script: str) -> set[str] | None:
    """The fields named on the command line (`--max-steps 9`, `--max_steps=9`, `--no-track`), when this process
    runs `script` from its command line; None when `main` is called from Python."""
    if Path(sys.argv[0]).stem != script:
        return None
    names = set()
    for token in sys.argv[1:]:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0].replace("-", "_")
            names.add(name)
            if name.startswith("no_"):
                names.add(name[3:])
    return names


def _as_json(value):
    return json.loads(json.dumps(value))


def _last_logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    last = 0
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            try:
                last = max(last, int(json.loads(line).get("step", 0)))
            except (ValueError, AttributeError):
                continue
    return last


def _check_flags(args) -> None:
    """Flags every script shares, checked before anything is loaded (each a traceback from deep inside torch or
    transformers otherwise, after the data and the model were loaded)."""
    for name, low, why in (
        ("learning_rate", 0.0, "a positive number"),
        ("max_new_tokens", 0, "at least 1"),
        ("eval_max_new_tokens", 0, "at least 1"),
        ("max_length", 1, "at least 2 (a prompt token and a token to learn)"),
        ("is_cap", 1.0, "greater than 1 (importance weights are capped at it, sequences kept within [1/cap, cap])"),
        ("generation_max_tokens", -1, "0 (no bound) or a number of tokens"),
    ):
        value = getattr(args, name, None)
        if value is not None and value <= low:
            die(f"--{name.replace('_', '-')} must be {why}, got {value}")


def open_run(args, script: str, *, total_steps=None):
    """The run's directory, checkpoint and arguments: `(args, ckpt, run_dir)`.

    A new run (no `--resume`) gets a directory no run has written to (an existing `--run-name` is an error) and its
    arguments in `args.json`. `--resume RUN` (a run directory, or one of its `checkpoints/step_N`) continues that run
    exactly: its saved `args.json` gives every flag; a flag named on the command line that differs from the saved
    value is allowed if it is in `RESUME_MAY_CHANGE` (and logged, and saved) and refused with one line otherwise. A
    run of another script is refused; a finished run (final/ written, every step logged) says so and exits 0.
    `total_steps(args)`: the run's last step (default `args.max_steps`). Called from Python (not from the script's
    command line), a field whose value is its default counts as not given."""
    total_steps = total_steps or (lambda a: a.max_steps)
    _check_flags(args)
    if not args.resume:
        run_dir = _make_run_dir(args.output_dir, args.run_name, script, args.seed)
        if dist.is_main():
            _write_args(run_dir, script, args)
        return args, None, run_dir

    from common.model import find_checkpoint

    path = Path(args.resume)
    run_dir = path.parent.parent if (path / "trainer_state.pt").is_file() else path
    saved_file = run_dir / "args.json"
    if not saved_file.is_file():
        die(f"--resume {args.resume!r}: {saved_file} not found (not the directory of a cleanpost run)")
    try:
        saved = json.loads(saved_file.read_text())
    except json.JSONDecodeError as e:
        die(f"--resume {args.resume!r}: {saved_file} is not valid JSON ({e.msg}, line {e.lineno})")
    fields = {f.name: f for f in dataclasses.fields(args)}
    saved_script = saved.pop("script", None) or (run_dir.name.split("__")[0] if "__" in run_dir.name else None)
    if (saved_script is not None and saved_script != script) or set(saved) - set(fields):
        die(f"--resume {args.resume!r} is a run of {saved_script or 'another script'}.py, not of {script}.py")
    given = _cli_flags(script)
    updates, changed = {}, []
    for name, field in fields.items():
        if name not in saved:
            continue  # a flag added since the run started keeps its (given or default) value
        current, before = getattr(args, name), saved[name]
        if isinstance(before, list):  # JSON has lists only
            before = tuple(before) if "tuple" in str(field.type) else before
        if field.default is not dataclasses.MISSING:
            default = field.default
        else:
            default = field.default_factory() if field.default_factory is not dataclasses.MISSING else None
        named = name in given if given is not None else _as_json(current) != _as_json(default)
        if not named or _as_json(current) == _as_json(before):
            updates[name] = before
        elif name in RESUME_MAY_CHANGE:
            changed.append(f"--{name.replace('_', '-')} {before} -> {current}")
        else:
            die(
                f"--{name.replace('_', '-')} {current!r} differs from the run's {before!r} ({saved_file}): a resumed "
                "run keeps the flags that define it (start a new run to change it); it may change only "
                + ", ".join(f"--{n.replace('_', '-')}" for n in sorted(RESUME_MAY_CHANGE - {"resume", "output_dir"}))
            )
    updates.pop("resume", None)
    args = dataclasses.replace(args, **updates)
    last = _last_logged_step(run_dir)
    if (run_dir / "final").is_dir() and last >= total_steps(args):
        if dist.is_main():
            print(f"{run_dir} finished at step {last} (final/ written): nothing to resume")
        dist.close()
        raise SystemExit(0)
    ckpt = find_checkpoint(args.resume)
    if dist.is_main():
        if changed:
            print("resume: " + ", ".join(changed))
        _write_args(run_dir, script, args)  # atomic: the other processes may still be reading the old one
    return args, ckpt, run_dir


def update_args(run_dir: Path, script: str, args, **values):
    """`args` with `values` (a default resolved once the model is loaded, e.g. --generation-max-tokens), saved to
    args.json so that a resumed run uses the same value instead of resolving it again."""
    args = dataclasses.replace(args, **values)
    if dist.is_main():
        _write_args(Path(run_dir), script, args)
    return args


def _write_args(run_dir: Path, script: str, args) -> None:
    """args.json, replaced in one step: with a truncate-and-write, another torchrun process of a resume can read it
    empty and stop on the JSON (the likely cause of one CI failure: rank 1 of a 2-process --resume exited with 1,
    its message cut off, while rank 0 loaded the checkpoint; not reproduced in 2 reruns)."""
    tmp = run_dir / "args.json.tmp"
    tmp.write_text(json.dumps({"script": script, **asdict(args)}, indent=2) + "\n")
    os.replace(tmp, run_dir / "args.json")


class Tracker:
    def __init__(self, run_dir: Path, args, *, script: str, total_steps: int, start_step: int = 0):
        self.run_dir = Path(run_dir)
        self.main = dist.is_main()
        self.metrics_file, self.wandb = None, None
        self.bar = tqdm(total=total_steps, initial=start_step, desc=script, dynamic_ncols=True, disable=not self.main)
        BEFORE_DIE.append(self.close)  # a `die` mid-run closes the bar first
        if not self.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config = asdict(args) if is_dataclass(args) else dict(vars(args))
        # A resumed run appends to the same file, after dropping rows logged past its checkpoint by the stopped run
        # (and a last line cut short by a kill), so no step appears twice.
        path = self.run_dir / "metrics.jsonl"
        if start_step > 0 and path.exists():
            kept, past, partial = [], 0, 0
            for line in path.read_text(errors="replace").splitlines():
                try:
                    step = int(json.loads(line).get("step", 0))
                except (ValueError, AttributeError):
                    partial += 1  # a row whose write was cut short
                    continue
                if step <= start_step:
                    kept.append(line)
                else:
                    past += 1
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(path)
            if partial:
                self.write(f"resume: dropped {partial} incomplete line(s) of {path} (a write cut short by a kill)")
            if past:
                self.write(f"resume: dropped {past} row(s) of {path} logged after step {start_step} by the stopped run")
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
        """Log one metrics dict for optimizer step `step`: one call per step, so every metric of a step shares its x."""
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

    def check_finite(self, loss: float, grad_norm: float, step: int) -> None:
        """Stop the run before the optimizer step of `step` when its loss or gradient norm is NaN or inf (one line,
        the last of the output: `die` closes this tracker first); no update is applied and no checkpoint written."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            die(
                f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step}; no update applied, no "
                "checkpoint written (try a lower --learning-rate)"
            )

    def close(self) -> None:
        if self.close in BEFORE_DIE:
            BEFORE_DIE.remove(self.close)
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
