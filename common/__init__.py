"""Shared plumbing and numerics for the cleanpost scripts (see DESIGN.md): model I/O, data, log-probs,
generation, tracking and the tiny world. The algorithms themselves live in the scripts."""


def die(message: str) -> None:
    """Stop the run with one clear line (exit code 1) — the bad-input policy of DESIGN.md."""
    raise SystemExit(f"error: {message}")
