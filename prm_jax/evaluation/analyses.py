"""The paper's bias analyses of a PRM's step rewards.

* **Where the minimum falls.** A process reward model should put its lowest score on the first
  wrong step, wherever that is; a model that drifted towards outcome scoring puts it on the
  **final step**, where the answer is (the paper's Fig. 8: 17.5% of responses for
  Qwen2.5-Math-PRM-7B and 18.0% for 72B, against Skywork-PRM-7B 42.2%, Math-Shepherd-PRM-7B 44.5%
  and the implicit EurusPRMs 52.9% and 54.6%). `min_position_stats` reports that share
  and a histogram of the minimum's relative position (0 = first step, 1 = final step).
  Responses with a single step are excluded (their minimum is trivially the final step) and
  counted; ties go to the **first** minimal step (an earlier step as low as the final one means
  the final step is not where the model singled out a problem).
* **Correct answer, flawed process.** ProcessBench solutions whose final answer is right but whose
  process has an error (`final_answer_correct` and `label != -1`) are what an outcome-biased
  model misses. `flawed_process_detection` reports, per subset, the share the PRM flags
  with any error (`flagged`) and with the exact first wrong step (`exact`), and their
  unweighted mean over subsets as the paper's Table 5 does (`pooled_*`: every solution once).
* **Calibration.** Where steps have labels (ProcessBench: steps before the first error are correct,
  the first error is wrong, later steps are unlabelled; every step of an error-free solution is
  correct) the step reward should be the probability of correctness. `calibration` bins
  rewards into equal-width bins and reports per-bin mean reward, accuracy and count, and the
  expected calibration error `ECE = sum_b n_b / N * |accuracy_b - mean_reward_b|`. Labelled
  steps are mostly correct ones (every step before the first error), so read ECE next to the
  per-bin counts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "MinPositionStats",
    "min_position_stats",
    "FlawedProcessSubset",
    "FlawedProcessDetection",
    "flawed_process_detection",
    "labelled_steps",
    "Calibration",
    "calibration",
]


@dataclasses.dataclass(frozen=True)
class MinPositionStats:
    n_responses: int  # multi-step responses counted
    n_single_step: int  # excluded: a single step is trivially the final one
    final_step_share: float  # nan when no multi-step response was scored
    histogram_edges: list[float]
    histogram_counts: list[int]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def min_position_stats(rewards: Iterable[Sequence[float]], bins: int = 10) -> MinPositionStats:
    """Share of responses whose (first) minimal step reward is on the final step, and where it lies."""
    positions: list[float] = []
    final = single = 0
    for values in rewards:
        if len(values) < 2:
            single += 1
            continue
        index = int(np.argmin(np.asarray(values)))  # first occurrence on ties
        final += index == len(values) - 1
        positions.append(index / (len(values) - 1))
    counts, edges = np.histogram(positions, bins=bins, range=(0.0, 1.0))
    return MinPositionStats(
        n_responses=len(positions),
        n_single_step=single,
        final_step_share=final / len(positions) if positions else float("nan"),
        histogram_edges=[float(e) for e in edges],
        histogram_counts=[int(c) for c in counts],
    )


@dataclasses.dataclass(frozen=True)
class FlawedProcessSubset:
    n: int  # correct final answer, label != -1
    flagged: float  # share the critic flags with any error (nan when n == 0)
    exact: float  # share where the flagged step is the labelled first error

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class FlawedProcessDetection:
    """Per-subset detection and its unweighted mean over subsets (the paper's Table 5 averages
    subsets, so GSM8K's 400 solutions weigh as much as OmniMath's 1000); `pooled_*` count every
    solution once, a different (size-weighted) figure kept for reference."""

    n: int  # correct final answer, label != -1, over all subsets
    flagged: float  # unweighted mean over subsets with n > 0 (nan when none)
    exact: float  # unweighted mean over subsets with n > 0: the Table 5 figure
    pooled_flagged: float
    pooled_exact: float
    subsets: dict[str, FlawedProcessSubset]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def flawed_process_detection(items: Iterable[tuple[str, bool | None, int, int | None]]) -> FlawedProcessDetection:
    """From `(subset, final_answer_correct, label, prediction)`: detection on correct-answer,
    flawed-process solutions. Records without `final_answer_correct` are skipped; a `None`
    prediction (no verdict) counts as not flagged."""
    counts: dict[str, list[int]] = {}  # subset -> [n, flagged, exact]
    for subset, final_correct, label, prediction in items:
        if final_correct is not True or label == -1:
            continue
        c = counts.setdefault(subset, [0, 0, 0])
        c[0] += 1
        c[1] += prediction is not None and prediction != -1
        c[2] += prediction == label
    subsets = {name: FlawedProcessSubset(n, flagged / n, exact / n) for name, (n, flagged, exact) in counts.items()}
    n = sum(c[0] for c in counts.values())
    nan = float("nan")
    return FlawedProcessDetection(
        n=n,
        flagged=_mean([s.flagged for s in subsets.values()]),
        exact=_mean([s.exact for s in subsets.values()]),
        pooled_flagged=sum(c[1] for c in counts.values()) / n if n else nan,
        pooled_exact=sum(c[2] for c in counts.values()) / n if n else nan,
        subsets=subsets,
    )


def labelled_steps(rewards: Sequence[float], label: int) -> Iterable[tuple[float, int]]:
    """`(reward, correct)` for the steps a first-error label decides (see the module docstring)."""
    last = len(rewards) - 1 if label == -1 else label
    for i in range(last + 1):
        yield float(rewards[i]), int(label == -1 or i < label)


@dataclasses.dataclass(frozen=True)
class Calibration:
    n_steps: int
    ece: float  # nan when no step is labelled
    bin_edges: list[float]
    bin_counts: list[int]
    bin_mean_reward: list[float | None]  # None for an empty bin
    bin_accuracy: list[float | None]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def calibration(steps: Iterable[tuple[float, int]], bins: int = 10) -> Calibration:
    """Reliability bins and ECE of `(reward, correct)` pairs; rewards of exactly 1.0 fall in the
    last bin."""
    pairs = np.asarray(list(steps), dtype=np.float64).reshape(-1, 2)
    rewards, correct = pairs[:, 0], pairs[:, 1]
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, rewards, side="right") - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    mean_reward: list[float | None] = []
    accuracy: list[float | None] = []
    ece = 0.0
    for b in range(bins):
        if counts[b] == 0:
            mean_reward.append(None)
            accuracy.append(None)
            continue
        conf = float(rewards[index == b].mean())
        acc = float(correct[index == b].mean())
        mean_reward.append(conf)
        accuracy.append(acc)
        ece += counts[b] / len(rewards) * abs(acc - conf)
    return Calibration(
        n_steps=int(len(rewards)),
        ece=float(ece) if len(rewards) else float("nan"),
        bin_edges=[float(e) for e in edges],
        bin_counts=[int(c) for c in counts],
        bin_mean_reward=mean_reward,
        bin_accuracy=accuracy,
    )
