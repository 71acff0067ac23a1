"""Synthetic inputs shared by the benchmarks (no flags here, so any of them may import it):
ProcessBench-like solutions for the scoring benchmarks (lengths vary as real ones do, the words are
arithmetic prose, nothing is downloaded), and packed training batches for the training ones."""

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


def synthetic_batch(rows: int, seq_len: int, vocab: int, segments: int, label_every: int, seed: int) -> dict:
    """A random batch in the Trainer's packed layout: `segments` equal segments per row and a
    supervised position every `label_every` tokens (bench.train_throughput, bench.gpu_validate)."""
    rng = np.random.default_rng(seed)
    bounds = np.linspace(0, seq_len, segments + 1).astype(int)
    segment_ids = np.zeros((rows, seq_len), np.int32)
    positions = np.zeros((rows, seq_len), np.int32)
    for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        segment_ids[:, a:b] = s + 1
        positions[:, a:b] = np.arange(b - a)
    loss_mask = np.zeros((rows, seq_len), np.float32)
    loss_mask[:, label_every - 1 :: label_every] = 1.0
    return {
        "input_ids": rng.integers(0, vocab, (rows, seq_len), dtype=np.int32),
        "segment_ids": segment_ids,
        "positions": positions,
        "loss_mask": loss_mask,
        "labels": (rng.random((rows, seq_len)) < 0.7).astype(np.float32),
        "targets": rng.integers(0, vocab, (rows, seq_len), dtype=np.int32),
    }
