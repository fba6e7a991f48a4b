"""Environments for command-line tests (importable as `tests.cli_envs:NAME` from the repository root)."""

import time


class Broken:
    """The factory itself raises."""

    def __init__(self, record):
        raise RuntimeError("no database connection")


class NotMessages:
    """reset() returns a string, not a list of messages."""

    def __init__(self, record):
        self.prompt = record["prompt"]

    def reset(self):
        return self.prompt

    def step(self, text):
        return None


class BadReply:
    """step() returns a malformed message (no content)."""

    def __init__(self, record):
        self.prompt = record["prompt"]

    def reset(self):
        return [{"role": "user", "content": self.prompt}]

    def step(self, text):
        return [{"role": "tool"}]


class Hangs:
    """step() never returns (within --env-timeout)."""

    def __init__(self, record):
        self.prompt = record["prompt"]

    def reset(self):
        return [{"role": "user", "content": self.prompt}]

    def step(self, text):
        time.sleep(3600)


class FailsLater:
    """Steps with the reference answer (the start-up check) pass; any other turn raises, mid-run."""

    def __init__(self, record):
        self.prompt, self.answer = record["prompt"], record["answer"]

    def reset(self):
        return [{"role": "user", "content": self.prompt}]

    def step(self, text):
        if text == str(self.answer):
            return 1.0
        raise KeyError("lookup failed")


class Echo:
    """Replies to every assistant turn with a tool message that repeats its length, for three turns; then ends with a
    reward of the turns' total length (so groups have spread)."""

    def __init__(self, record):
        self.prompt, self.lengths = record["prompt"], []

    def reset(self):
        return [{"role": "user", "content": self.prompt}]

    def step(self, text):
        self.lengths.append(len(text))
        if len(self.lengths) == 3:
            return sum(self.lengths) / 10
        return [{"role": "tool", "content": str(len(text))}]
