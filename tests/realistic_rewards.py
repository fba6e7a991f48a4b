"""A reward with spread on a random model's completions (the realistic tier's GRPO run needs nonzero advantages)."""


def length(prompts, completions, answers):
    return [len(c) / 10 for c in completions]
