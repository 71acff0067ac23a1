"""Best-of-N: pick one of N sampled responses by its PRM score, next to maj@N and pass@N.

For each problem a policy sampled N responses, each graded correct or not. A PRM scores a
response by aggregating its step rewards:

* `product`: the product of step rewards (the paper's default; ranked in log space, the sum of
  `log(reward)`, so long responses do not all underflow to a tied 0.0),
* `min`: the weakest step,
* `last`: the final step's reward (an outcome-style score),
* `mean`: the average step reward.

`prm@N` is the accuracy of the top-scored response. Baselines: `maj@N`, the accuracy of the
most common final answer (self-consistency), and `pass@N`, whether any response is correct (the
ceiling any selector can reach). Results are per dataset and averaged **unweighted** over datasets,
as the paper averages its seven benchmarks.

Deterministic tie-breaking (documented because it changes numbers on small N):

* equal scores: the **lowest response index** wins (responses are in sampling order);
* equal vote counts: the answer whose **first occurrence has the lowest index** wins;
* a response without an extractable answer does not vote; if none has one, maj@N counts the
  problem as wrong;
* the voted answer's correctness is that of its first (lowest-index) response; if responses in
  the same answer class disagree on `correct` (a grader that compares differently), the
  problem is counted in `n_inconsistent_votes` so such data can be spotted.

Final answers for voting: a response's `final_answer` field when present (what the grader
extracted), else the last `\\boxed{}` of its last step (`prm_jax.critique.last_boxed`).
Answers vote together when they are equal **as the grader compares them**
(`prm_jax.answers.equivalent_answers`, math-verify: `0.5`, `\\frac12` and
`\\frac {1} {2}` are one vote): each answer joins the class of the first earlier answer it equals
(that answer plays the gold), else opens its own class (`answer_classes`).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

import numpy as np

from prm_jax.answers import equivalent_answers
from prm_jax.critique import last_boxed
from prm_jax.evaluation.records import BoNResponse

__all__ = [
    "AGGREGATIONS",
    "aggregate",
    "select_best",
    "normalize_answer",
    "response_answer",
    "answer_classes",
    "majority_vote",
    "ProblemOutcome",
    "score_problem",
    "BoNScores",
    "bon_scores",
]

AGGREGATIONS = ("product", "min", "last", "mean")
_LOG_FLOOR = 1e-30  # log(0) would make every response containing a 0.0 step tie at -inf


def aggregate(rewards: Sequence[float], how: str) -> float:
    """One response score from its step rewards; `product` is returned as the log-product.

    Rewards are finite: `prm_jax.evaluation.scorer.score_stream` refuses any other, for every task."""
    if not rewards:
        raise ValueError("a response needs at least one step reward")
    values = np.asarray(rewards, dtype=np.float64)
    if how == "product":
        return float(np.sum(np.log(np.maximum(values, _LOG_FLOOR))))
    if how == "min":
        return float(values.min())
    if how == "last":
        return float(values[-1])
    if how == "mean":
        return float(values.mean())
    raise ValueError(f"unknown aggregation {how!r}; choose from {AGGREGATIONS}")


def select_best(scores: Sequence[float]) -> int:
    """Index of the highest score; ties go to the lowest index."""
    best = 0
    for i, score in enumerate(scores):
        if score > scores[best]:
            best = i
    return best


def normalize_answer(answer: str | None) -> str | None:
    """An answer for voting: all whitespace removed; None (and empty answers) do not vote."""
    if answer is None:
        return None
    normalized = "".join(answer.split())
    return normalized or None


def response_answer(response: BoNResponse) -> str | None:
    """The answer a response votes for: its `final_answer`, else the last box of its last step."""
    if response.final_answer is not None:
        return normalize_answer(response.final_answer)
    return normalize_answer(last_boxed(response.steps[-1]))


def answer_classes(
    answers: Sequence[str | None], equivalent: Callable[[str, str], bool] = equivalent_answers
) -> list[int | None]:
    """For each answer, the index of the first answer it is equivalent to (itself when none
    earlier is); None for no answer. Equal indices = one vote."""
    classes: list[int | None] = []
    representatives: list[int] = []
    for i, answer in enumerate(answers):
        if answer is None:
            classes.append(None)
            continue
        match = next((r for r in representatives if equivalent(answers[r], answer)), None)
        if match is None:
            representatives.append(i)
            match = i
        classes.append(match)
    return classes


def majority_vote(answers: Sequence[Hashable | None]) -> int | None:
    """Index of the response representing the most common answer (first occurrence on ties);
    `answers` are compared with `==` (pass `answer_classes` to vote on equivalence)."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(i for i, a in enumerate(answers) if a is not None and counts[a] == best)


@dataclasses.dataclass(frozen=True)
class ProblemOutcome:
    """Everything Best-of-N decides for one problem (also written to predictions.jsonl)."""

    n: int
    selected: dict[str, int]  # aggregation -> chosen response index
    prm_correct: dict[str, bool]
    majority_index: int | None  # representative response of the voted answer (None: nobody voted)
    majority_answer: str | None
    maj_correct: bool
    pass_correct: bool
    inconsistent_vote: bool  # responses sharing the voted answer disagree on `correct`


def score_problem(
    correct: Sequence[bool],
    answers: Sequence[str | None],
    rewards: Sequence[Sequence[float]],
    aggregations: Sequence[str] = AGGREGATIONS,
    *,
    equivalent: Callable[[str, str], bool] = equivalent_answers,
) -> ProblemOutcome:
    """Best-of-N decisions for one problem from its responses' correctness, answers
    (`response_answer`) and step rewards, all in response order; answers vote by
    `equivalent` (see `answer_classes`)."""
    if not len(correct) == len(answers) == len(rewards):
        raise ValueError(f"{len(correct)} correctness flags, {len(answers)} answers, {len(rewards)} reward lists")
    if not correct:
        raise ValueError("a problem needs at least one response")
    selected: dict[str, int] = {}
    prm_correct: dict[str, bool] = {}
    for how in aggregations:
        index = select_best([aggregate(r, how) for r in rewards])
        selected[how] = index
        prm_correct[how] = bool(correct[index])
    classes = answer_classes(answers, equivalent)
    majority = majority_vote(classes)
    inconsistent = False
    if majority is not None:
        group = {bool(correct[i]) for i, c in enumerate(classes) if c == classes[majority]}
        inconsistent = len(group) > 1
    return ProblemOutcome(
        n=len(correct),
        selected=selected,
        prm_correct=prm_correct,
        majority_index=majority,
        majority_answer=None if majority is None else answers[majority],
        maj_correct=majority is not None and bool(correct[majority]),
        pass_correct=any(correct),
        inconsistent_vote=inconsistent,
    )


@dataclasses.dataclass(frozen=True)
class BoNScores:
    """Accuracies (fractions) of one dataset, or the unweighted average over datasets."""

    n_problems: int
    n_responses: int
    n: int | None  # responses per problem (None when it varies)
    prm_at_n: dict[str, float]
    maj_at_n: float
    pass_at_n: float
    n_inconsistent_votes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _dataset_scores(outcomes: Sequence[ProblemOutcome], aggregations: Sequence[str]) -> BoNScores:
    sizes = {o.n for o in outcomes}
    return BoNScores(
        n_problems=len(outcomes),
        n_responses=sum(o.n for o in outcomes),
        n=sizes.pop() if len(sizes) == 1 else None,
        prm_at_n={how: float(np.mean([o.prm_correct[how] for o in outcomes])) for how in aggregations},
        maj_at_n=float(np.mean([o.maj_correct for o in outcomes])),
        pass_at_n=float(np.mean([o.pass_correct for o in outcomes])),
        n_inconsistent_votes=sum(o.inconsistent_vote for o in outcomes),
    )


def bon_scores(
    outcomes: Iterable[tuple[str, ProblemOutcome]], aggregations: Sequence[str] = AGGREGATIONS
) -> tuple[dict[str, BoNScores], BoNScores]:
    """Per-dataset scores (first-seen order) and their unweighted average over datasets."""
    by_dataset: dict[str, list[ProblemOutcome]] = {}
    for dataset, outcome in outcomes:
        by_dataset.setdefault(dataset, []).append(outcome)
    if not by_dataset:
        raise ValueError("no Best-of-N problems to score")
    datasets = {name: _dataset_scores(items, aggregations) for name, items in by_dataset.items()}
    sizes = {d.n for d in datasets.values()}
    average = BoNScores(
        n_problems=sum(d.n_problems for d in datasets.values()),
        n_responses=sum(d.n_responses for d in datasets.values()),
        n=sizes.pop() if len(sizes) == 1 else None,
        prm_at_n={how: float(np.mean([d.prm_at_n[how] for d in datasets.values()])) for how in aggregations},
        maj_at_n=float(np.mean([d.maj_at_n for d in datasets.values()])),
        pass_at_n=float(np.mean([d.pass_at_n for d in datasets.values()])),
        n_inconsistent_votes=sum(d.n_inconsistent_votes for d in datasets.values()),
    )
    return datasets, average


def product_score(log_product: float) -> float:
    """The product of step rewards from the log-product `aggregate(..., "product")` returns."""
    return math.exp(log_product)
