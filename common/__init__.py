"""Shared plumbing and numerics for the cleanpost scripts: model I/O, data, log-probs, generation, environments,
tracking and the tiny world. The algorithms themselves (losses, advantages, the training loops) live in the scripts."""

import os

BEFORE_DIE = []  # what `die` runs first: an open run's Tracker.close, so the bar is not drawn after the line


def die(message: str) -> None:
    """Stop the run with one clear line, `error: ...`, naming the file, line, field or flag at fault, and exit code 1,
    with no traceback: bad input is caught before compute is spent. Under torchrun every rank reads the same inputs
    and stops at the same check; rank 0 alone prints the line. Mid-run (a user's reward function or environment
    failing, a non-finite loss) the open tracker is closed first, so the line is the last of the output."""
    while BEFORE_DIE:
        BEFORE_DIE.pop()()
    raise SystemExit(f"error: {message}" if os.environ.get("RANK", "0") == "0" else 1)
