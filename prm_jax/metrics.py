"""ProcessBench-style step-error metrics, shared by training-time eval and evaluation.

A solution's *first error* is the index of its earliest wrong step, or -1 when every step is right.
A PRM predicts it as the first step whose reward falls below a threshold. Over a set of solutions:
acc_err = accuracy on solutions with an error, acc_ok = accuracy on error-free ones, and
F1 = 2·acc_err·acc_ok / (acc_err + acc_ok) (the harmonic mean ProcessBench reports).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence


def first_error_index(values: Sequence[float], threshold: float = 0.5) -> int:
    """Index of the first value below `threshold` (a wrong step), or -1 if there is none."""
    for index, value in enumerate(values):
        if value < threshold:
            return index
    return -1


@dataclasses.dataclass(frozen=True)
class StepErrorScores:
    acc_err: float  # accuracy on solutions whose label != -1 (nan when there are none)
    acc_ok: float  # accuracy on solutions whose label == -1 (nan when there are none)
    f1: float
    n_err: int
    n_ok: int

    def as_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


def step_error_scores(pairs: Iterable[tuple[int, int]]) -> StepErrorScores:
    """Scores (prediction, label) pairs of first-error indices.

    With an empty class its accuracy is undefined (nan) and F1 is 0: a subset without erroneous
    (or without error-free) solutions cannot show that a critic does both jobs, and ProcessBench's
    harmonic mean treats a missing side as failing it rather than skipping it.
    """
    err_hits = err_total = ok_hits = ok_total = 0
    for prediction, label in pairs:
        if label == -1:
            ok_total += 1
            ok_hits += prediction == -1
        else:
            err_total += 1
            err_hits += prediction == label
    acc_err = err_hits / err_total if err_total else float("nan")
    acc_ok = ok_hits / ok_total if ok_total else float("nan")
    if not err_total or not ok_total or acc_err + acc_ok == 0:
        f1 = 0.0
    else:
        f1 = 2 * acc_err * acc_ok / (acc_err + acc_ok)
    return StepErrorScores(acc_err, acc_ok, f1, err_total, ok_total)
