"""Shared plumbing and numerics for the cleanpost scripts (see DESIGN.md): model I/O, data, log-probs,
generation, tracking and the tiny world. The algorithms themselves live in the scripts."""

import os


def die(message: str) -> None:
    """Stop the run with one clear line (exit code 1) — the bad-input policy of DESIGN.md. Under torchrun every
    rank reads the same inputs and stops at the same check; rank 0 alone prints the line."""
    raise SystemExit(f"error: {message}" if os.environ.get("RANK", "0") == "0" else 1)
