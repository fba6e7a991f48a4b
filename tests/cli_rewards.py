"""Reward functions for command-line tests (importable as `tests.cli_rewards:NAME` from the repository root)."""


def length(prompts, completions, answers):
    """Spread on a random model's completions (the realistic tier's GRPO run needs nonzero advantages)."""
    return [len(c) / 10 for c in completions]


def alternating(prompts, completions, answers):
    """1, 0, 1, 0, ...: every group of an even size has reward spread, whatever was sampled."""
    return [float(i % 2 == 0) for i in range(len(completions))]


CALLS = [0]


def fails_later(prompts, completions, answers):
    """Fine for the start-up check (the first call), then raises: a reward function failing mid-run."""
    CALLS[0] += 1
    if CALLS[0] > 1:
        raise KeyError("grader offline")
    return [0.0] * len(completions)
