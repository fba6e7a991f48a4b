"""Shared plumbing and numerics for the cleanpost scripts: model I/O, data, log-probs, generation, environments,
tracking and the tiny world. The algorithms themselves (losses, advantages, the training loops) live in the scripts."""

import os


def die(message: str) -> None:
    """Stop the run with one clear line, `error: ...`, naming the file, line, field or flag at fault, and exit code 1,
    with no traceback: bad input is caught before compute is spent. Under torchrun every rank reads the same inputs
    and stops at the same check; rank 0 alone prints the line."""
    raise SystemExit(f"error: {message}" if os.environ.get("RANK", "0") == "0" else 1)
