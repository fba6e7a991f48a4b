"""Reward functions for command-line tests (importable as `tests.cli_rewards:NAME` from the repository root)."""


def length(prompts, completions, answers):
    """Spread on a random model's completions (the realistic tier's GRPO run needs nonzero advantages)."""
    return [len(c) / 10 for c in completions]


def alternating(prompts, completions, answers):
    """1, 0, 1, 0, ...: every group of an even size has reward spread, whatever was sampled."""
    return [float(i % 2 == 0) for i in range(len(completions))]
