"""The tiny world's generators, verifier and accuracy aggregation."""

import random

import pytest

import common.generation
from common import tinyworld
from common.rewards import evaluate, is_correct
from common.tinyworld import SKILLS, make_task, make_tasks, needs_carry


def test_generators_are_deterministic_and_answers_are_right():
    for skill in SKILLS:
        a = [make_task(skill, random.Random(7)) for _ in range(3)]
        b = [make_task(skill, random.Random(7)) for _ in range(3)]
        assert a == b
    t = make_task("arithmetic", random.Random(0))
    x, y = map(int, t["prompt"][len("What is ") : -1].split("+"))
    assert t["answer"] == str(x + y) and 10 <= x <= 99 and 10 <= y <= 99
    t = make_task("reverse", random.Random(0))
    assert t["answer"] == t["prompt"].split(": ")[1][::-1]
    t = make_task("uppercase", random.Random(0))
    assert t["answer"] == t["prompt"].split(": ")[1].upper()
    with pytest.raises(ValueError, match="unknown skill"):
        make_task("juggling", random.Random(0))


def test_make_tasks_distinct_and_excluding():
    tasks = make_tasks("larger", 50, seed=1)
    prompts = [t["prompt"] for t in tasks]
    assert len(set(prompts)) == 50
    others = make_tasks("larger", 50, seed=2, exclude=set(prompts))
    assert not set(prompts) & {t["prompt"] for t in others}


def test_verifier_normalizes_whitespace_and_final_period_only():
    assert is_correct(" 85 ", "85") and is_correct("85.", "85") and is_correct("a  b", "a b")
    assert not is_correct("85 apples", "85") and not is_correct("ABC", "abc") and not is_correct("", "0")


def test_needs_carry_by_hand():
    assert needs_carry({"prompt": "What is 47+38?"})  # 7+8 carries
    assert needs_carry({"prompt": "What is 61+48?"})  # 6+4 carries into the hundreds
    assert not needs_carry({"prompt": "What is 41+38?"})
    brute = sum(not needs_carry({"prompt": f"What is {a}+{b}?"}) for a in range(10, 100) for b in range(10, 100))
    assert brute == 55 * 36  # units pairs summing < 10 (55) times tens pairs in 1..9 summing < 10 (36)


def test_evaluate_aggregates_by_skill(monkeypatch):
    records = [
        {"prompt": "p1", "answer": "1", "skill": "arithmetic"},
        {"prompt": "p2", "answer": "2", "skill": "arithmetic"},
        {"prompt": "p3", "answer": "cba", "skill": "reverse"},
        {"prompt": "p4", "answer": "9", "skill": "larger"},
        {"prompt": "p5", "answer": "8", "skill": "larger"},
        {"prompt": "p6", "answer": "7", "skill": "larger"},
    ]
    answers = {"p1": "1", "p2": "3", "p3": "cba", "p4": "9", "p5": "0", "p6": "0"}
    monkeypatch.setattr(
        common.generation, "generate", lambda m, t, prompts, **kw: {"texts": [answers[p] for p in prompts]}
    )

    class Dummy:
        training = False

        def eval(self):
            pass

        def train(self, mode=True):
            pass

    m = evaluate(Dummy(), None, records, target_skill="arithmetic")
    assert m["eval/accuracy"] == 0.5  # 1 of 2 arithmetic
    assert m["eval/accuracy/reverse"] == 1.0 and m["eval/accuracy/larger"] == pytest.approx(1 / 3)
    assert m["eval/general_accuracy"] == pytest.approx(2 / 4)  # mean over the 4 general records
    # another verifier (--eval-reward-fn): the metrics are its mean reward per skill, with the batch size passed on
    seen = {}

    def fake_generate(m, t, prompts, **kw):
        seen.update(kw)
        return {"texts": [answers[p] for p in prompts]}

    monkeypatch.setattr(common.generation, "generate", fake_generate)
    graded = evaluate(
        Dummy(),
        None,
        records,
        target_skill="arithmetic",
        reward_fn=lambda prompts, completions, golds: [0.25 * len(c) + (c == g) for c, g in zip(completions, golds)],
        batch_size=3,
        max_new_tokens=5,
    )
    assert graded["eval/accuracy"] == pytest.approx((1.25 + 0.25) / 2)  # p1 right (1 char), p2 wrong (1 char)
    assert graded["eval/accuracy/reverse"] == pytest.approx(0.75 + 1)
    assert graded["eval/general_accuracy"] == pytest.approx((1.75 + 1.25 + 0.25 + 0.25) / 4)
    assert seen["batch_size"] == 3 and seen["max_new_tokens"] == 5 and seen["greedy"] is True
    assert tinyworld.TARGET_SKILL == "arithmetic"
