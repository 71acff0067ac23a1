"""Synthetic ProcessBench-like solutions shared by the scoring benchmarks: lengths vary as real ones
do, the words are arithmetic prose, nothing is downloaded."""

from __future__ import annotations

import numpy as np

WORDS = (
    "the sum of two and three is five so we add them then multiply by four divide subtract "
    "equation solve for x therefore answer each side value total number"
).split()


def synthetic_solutions(
    count: int,
    max_steps: int,
    rng: np.random.Generator,
    *,
    problem_words: tuple[int, int] = (3, 60),
    step_words: tuple[int, int] = (2, 30),
    fixed: bool = False,
) -> list[tuple[str, list[str]]]:
    """`count` (problem, steps): each step is `step_words` words and "= n"; `fixed`: every solution
    has `max_steps` steps, else uniform in 1..max_steps."""

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS, size=int(rng.integers(low, high + 1))))

    return [
        (
            f"What is {text(*problem_words)}?",
            [
                f"{text(*step_words)} = {rng.integers(0, 100)}"
                for _ in range(max_steps if fixed else int(rng.integers(1, max_steps + 1)))
            ],
        )
        for _ in range(count)
    ]
