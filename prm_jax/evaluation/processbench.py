"""ProcessBench: step-wise error identification scored the way the benchmark scores it.

A critic (a PRM through a threshold, an LLM through the critique prompt, or any external system
through a predictions file) names the earliest wrong step of each solution, or -1. Per subset:

* `acc_err`: accuracy on solutions with an error (`label != -1`), the prediction must be the
  exact step;
* `acc_ok`: accuracy on error-free solutions (`label == -1`), the prediction must be -1;
* `f1 = 2 * acc_err * acc_ok / (acc_err + acc_ok)`, and the headline `average_f1` is the
  **unweighted** mean of the subset F1s (GSM8K's 400 records weigh as much as Omni-MATH's 1,000).

Conventions (kept from `prm_jax.metrics`, which training-time eval shares):

* a subset with an empty class has that class's accuracy undefined (`nan`, written as `null`
  in results.json) and **F1 = 0**: it cannot show that a critic does both jobs, and the harmonic
  mean treats the missing side as failed rather than skipping it; `acc_err + acc_ok == 0` also
  gives F1 = 0;
* a record without a usable verdict (an unparseable critic answer, a `null` prediction) is
  counted in `n_unparseable` and scored as wrong on whichever side its label falls.

Threshold sweep (how ProcessBench treats PRMs whose scale is not centred on 0.5): the threshold that
maximises F1 on one subset (GSM8K by convention) is applied to every subset. The search is exact:
for one solution, "first step with reward < t equals the label" holds on one interval of t
(`prefix_min[label] < t <= prefix_min[label - 1]`; `t <= min(rewards)` for error-free ones), so
F1 is piecewise constant with breakpoints at prefix minima, and every piece is tried.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from prm_jax.metrics import first_error_index, step_error_scores

__all__ = [
    "DEFAULT_THRESHOLD",
    "SubsetScores",
    "ProcessBenchScores",
    "predict_first_error",
    "subset_scores",
    "processbench_scores",
    "ThresholdSweep",
    "f1_at_thresholds",
    "f1_curves",
    "sweep_threshold",
]

DEFAULT_THRESHOLD = 0.5
_NO_VERDICT = -2  # never equals a label, so an unparseable answer is wrong on either side


@dataclasses.dataclass(frozen=True)
class SubsetScores:
    """Scores of one subset; accuracies are fractions in [0, 1] (nan for an empty class)."""

    f1: float
    acc_err: float
    acc_ok: float
    n_err: int
    n_ok: int
    n_unparseable: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ProcessBenchScores:
    """Per-subset scores (in first-seen order) and their unweighted mean F1."""

    subsets: dict[str, SubsetScores]
    average_f1: float

    def as_dict(self) -> dict[str, Any]:
        return {"subsets": {k: v.as_dict() for k, v in self.subsets.items()}, "average_f1": self.average_f1}


def predict_first_error(rewards: Sequence[float], threshold: float = DEFAULT_THRESHOLD) -> int:
    """The PRM's verdict: the first step whose reward is below `threshold`, else -1."""
    return first_error_index(rewards, threshold)


def subset_scores(pairs: Iterable[tuple[int | None, int]]) -> SubsetScores:
    """Scores `(prediction, label)` pairs; a `None` prediction is unparseable (wrong)."""
    unparseable = 0
    checked: list[tuple[int, int]] = []
    for prediction, label in pairs:
        if prediction is None:
            unparseable += 1
            prediction = _NO_VERDICT
        checked.append((prediction, label))
    s = step_error_scores(checked)
    return SubsetScores(s.f1, s.acc_err, s.acc_ok, s.n_err, s.n_ok, unparseable)


def processbench_scores(rows: Iterable[tuple[str, int | None, int]]) -> ProcessBenchScores:
    """Scores `(subset, prediction, label)` rows; subsets keep the order they first appear in."""
    by_subset: dict[str, list[tuple[int | None, int]]] = {}
    for subset, prediction, label in rows:
        by_subset.setdefault(subset, []).append((prediction, label))
    subsets = {name: subset_scores(pairs) for name, pairs in by_subset.items()}
    average = float(np.mean([s.f1 for s in subsets.values()])) if subsets else float("nan")
    return ProcessBenchScores(subsets, average)


# ---------------------------------------------------------------------------- threshold sweep


@dataclasses.dataclass
class _Intervals:
    """Per-solution intervals of t on which "first reward < t" equals the label."""

    err_low: np.ndarray  # error solutions: correct iff err_low < t <= err_high
    err_high: np.ndarray
    ok_high: np.ndarray  # error-free solutions: correct iff t <= ok_high

    @classmethod
    def build(cls, items: Iterable[tuple[Sequence[float], int]]) -> _Intervals:
        low, high, ok = [], [], []
        for rewards, label in items:
            prefix_min = np.minimum.accumulate(np.asarray(rewards, dtype=np.float64))
            if label == -1:
                ok.append(prefix_min[-1])
            else:
                low.append(prefix_min[label])
                high.append(prefix_min[label - 1] if label > 0 else math.inf)
        return cls(np.sort(np.asarray(low)), np.sort(np.asarray(high)), np.sort(np.asarray(ok)))

    def f1(self, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(f1, acc_err, acc_ok) at each threshold, with metrics.step_error_scores' conventions."""
        t = np.asarray(thresholds, dtype=np.float64)
        n_err, n_ok = len(self.err_low), len(self.ok_high)
        # #(low < t) - #(high < t) counts low < t <= high because low <= high for every solution.
        err_hits = np.searchsorted(self.err_low, t, side="left") - np.searchsorted(self.err_high, t, side="left")
        ok_hits = n_ok - np.searchsorted(self.ok_high, t, side="left")
        with np.errstate(invalid="ignore", divide="ignore"):
            acc_err = err_hits / n_err if n_err else np.full(t.shape, np.nan)
            acc_ok = ok_hits / n_ok if n_ok else np.full(t.shape, np.nan)
            f1 = np.where(acc_err + acc_ok > 0, 2 * acc_err * acc_ok / (acc_err + acc_ok), 0.0)
        if not n_err or not n_ok:
            f1 = np.zeros(t.shape)
        return f1, np.asarray(acc_err, dtype=np.float64), np.asarray(acc_ok, dtype=np.float64)

    def breakpoints(self) -> np.ndarray:
        values = np.concatenate([self.err_low, self.err_high, self.ok_high])
        return np.unique(values[np.isfinite(values)])


def f1_at_thresholds(items: Iterable[tuple[Sequence[float], int]], thresholds: Sequence[float]) -> np.ndarray:
    """F1 of one subset at each threshold (vectorised; for sweep curves and plots)."""
    return _Intervals.build(items).f1(np.asarray(thresholds))[0]


@dataclasses.dataclass(frozen=True)
class ThresholdSweep:
    """The best threshold on the tuning subset and the scores it gives on every subset."""

    tuned_on: str
    threshold: float
    scores: ProcessBenchScores

    def as_dict(self) -> dict[str, Any]:
        return {"tuned_on": self.tuned_on, "threshold": self.threshold, **self.scores.as_dict()}


def _candidates(breakpoints: np.ndarray) -> np.ndarray:
    """One threshold inside every piece where F1 is constant: the pieces are (b_k, b_k+1]."""
    if breakpoints.size == 0:
        return np.asarray([DEFAULT_THRESHOLD])
    first = breakpoints[0] / 2 if breakpoints[0] > 0 else breakpoints[0]  # t <= b_0: nothing flagged
    middles = (breakpoints[:-1] + breakpoints[1:]) / 2
    last = breakpoints[-1]
    above = (last + 1.0) / 2 if last < 1.0 else np.nextafter(last, np.inf)  # everything flagged
    return np.concatenate([[first], middles, [above]])


def f1_curves(
    rewards_by_subset: Mapping[str, Sequence[tuple[Sequence[float], int]]], grid_points: int = 101
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """F1 of every subset against the threshold, for plots.

    The thresholds are a regular grid on [0, 1] plus one point inside every piece where some
    subset's F1 is constant, so narrow optima (rewards bunched near one value) are not missed.
    """
    intervals = {name: _Intervals.build(items) for name, items in rewards_by_subset.items()}
    points = [np.linspace(0.0, 1.0, grid_points)] + [_candidates(i.breakpoints()) for i in intervals.values()]
    thresholds = np.unique(np.concatenate(points))
    thresholds = thresholds[(thresholds >= 0.0) & (thresholds <= 1.0)]
    return thresholds, {name: i.f1(thresholds)[0] for name, i in intervals.items()}


def sweep_threshold(
    rewards_by_subset: Mapping[str, Sequence[tuple[Sequence[float], int]]], tuned_on: str
) -> ThresholdSweep:
    """Tune the threshold on `tuned_on` (max F1) and score every subset with it.

    Ties between equally good thresholds go to the one closest to the default 0.5, then to the
    smaller one, so the result does not depend on the order of candidates.
    """
    if tuned_on not in rewards_by_subset:
        raise ValueError(f"cannot tune the threshold on subset {tuned_on!r}: the data has {sorted(rewards_by_subset)}")
    intervals = _Intervals.build(rewards_by_subset[tuned_on])
    candidates = _candidates(intervals.breakpoints())
    f1 = intervals.f1(candidates)[0]
    order = np.lexsort((candidates, np.abs(candidates - DEFAULT_THRESHOLD), -f1))
    threshold = float(candidates[order[0]])
    rows = (
        (subset, predict_first_error(rewards, threshold), label)
        for subset, items in rewards_by_subset.items()
        for rewards, label in items
    )
    return ThresholdSweep(tuned_on, threshold, processbench_scores(rows))
