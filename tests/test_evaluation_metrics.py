"""Evaluation metrics by hand: ProcessBench F1 (empty classes, rounding, unweighted mean), the
threshold sweep, majority voting, Best-of-N aggregations and tie-breaking, and the analyses."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from prm_jax.critique import critic_vote
from prm_jax.evaluation.analyses import calibration, flawed_process_detection, labelled_steps, min_position_stats
from prm_jax.evaluation.best_of_n import (
    aggregate,
    answer_classes,
    bon_scores,
    majority_vote,
    normalize_answer,
    response_answer,
    score_problem,
    select_best,
)
from prm_jax.evaluation.processbench import (
    f1_at_thresholds,
    predict_first_error,
    processbench_scores,
    subset_scores,
    sweep_threshold,
)
from prm_jax.evaluation.records import BoNResponse
from prm_jax.evaluation.report import bon_markdown, percent, processbench_markdown, write_json

# ---------------------------------------------------------------------------- ProcessBench


def test_prediction_is_first_step_strictly_below_threshold() -> None:
    assert predict_first_error([0.9, 0.4, 0.2]) == 1
    assert predict_first_error([0.9, 0.5]) == -1  # 0.5 is not below 0.5
    assert predict_first_error([0.9, 0.5], threshold=0.6) == 1
    assert predict_first_error([0.1], threshold=0.0) == -1


def test_mixed_subset_by_hand() -> None:
    # error records: labels 1, 0, 2 -> predicted 1 (hit), 1 (miss), 2 (hit): acc_err = 2/3
    # correct records: both predicted -1: acc_ok = 1 -> F1 = 2 * 2/3 * 1 / (5/3) = 0.8
    s = subset_scores([(1, 1), (1, 0), (2, 2), (-1, -1), (-1, -1)])
    assert (s.n_err, s.n_ok) == (3, 2)
    assert s.acc_err == pytest.approx(2 / 3) and s.acc_ok == 1.0
    assert s.f1 == pytest.approx(0.8)


def test_all_correct_subset_has_undefined_error_accuracy_and_zero_f1() -> None:
    s = subset_scores([(-1, -1), (-1, -1), (0, -1)])
    assert s.n_err == 0 and s.n_ok == 3
    assert math.isnan(s.acc_err) and s.acc_ok == pytest.approx(2 / 3)
    assert s.f1 == 0.0  # an empty class fails the harmonic mean rather than being skipped


def test_all_wrong_subset_has_undefined_correct_accuracy_and_zero_f1() -> None:
    s = subset_scores([(0, 0), (2, 2), (-1, 1)])
    assert s.n_ok == 0 and math.isnan(s.acc_ok)
    assert s.acc_err == pytest.approx(2 / 3) and s.f1 == 0.0


def test_both_accuracies_zero_gives_zero_f1() -> None:
    s = subset_scores([(0, 1), (0, -1)])
    assert s.acc_err == 0.0 and s.acc_ok == 0.0 and s.f1 == 0.0


def test_unparseable_verdicts_are_counted_and_wrong_on_both_sides() -> None:
    s = subset_scores([(None, -1), (None, 2), (2, 2), (-1, -1)])
    assert s.n_unparseable == 2
    assert s.acc_err == 0.5 and s.acc_ok == 0.5 and s.f1 == pytest.approx(0.5)


def test_average_is_the_unweighted_mean_of_subset_f1s() -> None:
    small = [("small", 1, 1), ("small", 1, 0), ("small", 2, 2), ("small", -1, -1), ("small", -1, -1)]  # F1 0.8
    # 100 records with F1 0.5 (acc_err 0.5, acc_ok 0.5): a weighted mean would be ~0.514.
    big = [("big", 0, 0)] * 25 + [("big", -1, 0)] * 25 + [("big", -1, -1)] * 25 + [("big", 0, -1)] * 25
    scores = processbench_scores(small + big)
    assert list(scores.subsets) == ["small", "big"]  # first-seen order
    assert scores.subsets["big"].f1 == pytest.approx(0.5)
    assert scores.average_f1 == pytest.approx((0.8 + 0.5) / 2)


def test_results_json_writes_nan_as_null(tmp_path) -> None:
    scores = processbench_scores([("gsm8k", -1, -1), ("gsm8k", 0, -1)])
    write_json(
        tmp_path / "r.json", {"task": "processbench", **scores.as_dict(), "extra": [float("inf"), np.float32(0.25)]}
    )

    def refuse(token: str) -> None:
        raise AssertionError(f"non-standard JSON constant {token}")

    data = json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse)
    assert data["subsets"]["gsm8k"]["acc_err"] is None
    assert data["subsets"]["gsm8k"]["acc_ok"] == 0.5 and data["subsets"]["gsm8k"]["f1"] == 0.0
    assert data["extra"] == [None, 0.25]


@pytest.mark.parametrize(
    "value, text",
    [
        (2 / 3, "66.7"),
        (1 / 3, "33.3"),
        (0.8, "80.0"),
        (0.7345, "73.5"),
        (0.12345, "12.3"),
        (1.0, "100.0"),
        (0.0005, "0.1"),
        (0.0, "0.0"),
        (float("nan"), "-"),
        (None, "-"),
    ],
)
def test_percent_rounds_half_up_to_one_decimal(value, text) -> None:
    assert percent(value) == text


def test_markdown_shows_percentages_and_dashes_for_empty_classes() -> None:
    scores = processbench_scores([("gsm8k", 1, 1), ("gsm8k", 1, 0), ("gsm8k", 2, 2), ("gsm8k", -1, -1), ("math", 0, 0)])
    text = processbench_markdown({"task": "processbench", "mode": "prm", "threshold": 0.5, **scores.as_dict()})
    assert "| F1 | 80.0 | 0.0 | 40.0 |" in text
    assert "| correct acc | 100.0 | - |  |" in text


def test_critic_vote_ties_go_to_the_first_sampled() -> None:
    assert critic_vote([1, None, 2, 2, 1]) == 1
    assert critic_vote([2, 1, 1, 2]) == 2
    assert critic_vote([None, 3, 3, 1]) == 3
    assert critic_vote([None, None]) is None
    assert critic_vote([-1]) == -1


def test_threshold_sweep_by_hand() -> None:
    # correct iff: a) 0.7 < t <= 0.9, b) t <= 0.6, c) 0.3 < t. Best F1 (2/3) on (0.3, 0.6].
    tuned = [([0.9, 0.7], 1), ([0.8, 0.6], -1), ([0.3, 0.9], 0)]
    other = [([0.4, 0.2], 0), ([0.5, 0.5], -1)]
    sweep = sweep_threshold({"gsm8k": tuned, "math": other}, "gsm8k")
    assert sweep.threshold == pytest.approx(0.45)  # midpoint of the optimal piece
    assert sweep.scores.subsets["gsm8k"].f1 == pytest.approx(2 / 3)
    # applied to math: [0.4, 0.2] -> 0 (hit); [0.5, 0.5] -> -1 (hit)
    assert sweep.scores.subsets["math"].f1 == 1.0
    assert sweep.scores.average_f1 == pytest.approx((2 / 3 + 1) / 2)
    with pytest.raises(ValueError, match="omnimath"):
        sweep_threshold({"gsm8k": tuned}, "omnimath")


def test_sweep_matches_brute_force_on_random_rewards() -> None:
    rng = np.random.default_rng(0)
    items = []
    for _ in range(60):
        n = int(rng.integers(1, 8))
        items.append((rng.random(n).round(2).tolist(), int(rng.integers(-1, n))))

    def naive(t: float) -> float:
        return subset_scores((predict_first_error(r, t), label) for r, label in items).f1

    grid = np.linspace(0, 1, 1001)
    np.testing.assert_allclose(f1_at_thresholds(items, grid), [naive(t) for t in grid], atol=1e-12)
    sweep = sweep_threshold({"s": items}, "s")
    assert sweep.scores.subsets["s"].f1 == pytest.approx(naive(sweep.threshold))
    assert sweep.scores.subsets["s"].f1 >= max(naive(t) for t in grid) - 1e-12


# ---------------------------------------------------------------------------- Best-of-N


def test_aggregations_by_hand() -> None:
    assert aggregate([0.5, 0.8], "product") == pytest.approx(math.log(0.4))
    assert aggregate([0.5, 0.8], "min") == 0.5
    assert aggregate([0.5, 0.8], "last") == 0.8
    assert aggregate([0.5, 0.8], "mean") == pytest.approx(0.65)
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate([0.5], "max")
    # Non-finite rewards never reach aggregate: score_stream refuses them (tests/test_trust_evaluation.py).


def test_each_aggregation_picks_its_own_winner() -> None:
    rewards = [
        [1.0, 0.91],  # product .91 (best), min .91, last .91, mean .955
        [0.95, 0.95],  # product .9025, min .95 (best), last .95, mean .95
        [0.5, 0.99],  # product .495, min .5, last .99 (best), mean .745
        [0.99, 0.99, 0.99, 0.99, 0.92],  # product .888, min .92, last .92, mean .976 (best)
    ]
    outcome = score_problem([True, False, False, True], [None] * 4, rewards)
    assert outcome.selected == {"product": 0, "min": 1, "last": 2, "mean": 3}
    assert outcome.prm_correct == {"product": True, "min": False, "last": False, "mean": True}
    assert outcome.pass_correct and not outcome.maj_correct and outcome.majority_index is None


def test_score_ties_go_to_the_lowest_index_and_product_does_not_underflow() -> None:
    assert select_best([0.5, 0.9, 0.9, 0.1]) == 1
    long_low, long_less_low = [1e-3] * 2000, [2e-3] * 2000
    assert math.prod(long_low) == math.prod(long_less_low) == 0.0  # a plain product would tie
    outcome = score_problem([False, True], [None, None], [long_low, long_less_low], ["product"])
    assert outcome.selected["product"] == 1


def test_majority_vote_with_ties_and_normalised_answers() -> None:
    responses = [
        BoNResponse(("x", "so \\boxed{ 1 }"), correct=True),
        BoNResponse(("\\boxed{2}",), correct=False),
        BoNResponse(("y",), correct=False, final_answer="2"),
        BoNResponse(("no answer here",), correct=False),
        BoNResponse(("z",), correct=True, final_answer=" 1"),
    ]
    answers = [response_answer(r) for r in responses]
    assert answers == ["1", "2", "2", None, "1"]
    assert majority_vote(answers) == 0  # "1" and "2" tie 2-2; "1" appeared first
    outcome = score_problem([r.correct for r in responses], answers, [[0.5]] * 5)
    assert outcome.majority_answer == "1" and outcome.maj_correct
    assert normalize_answer("\\frac {1} {2}") == normalize_answer("\\frac{1}{2}")
    assert majority_vote([None, None]) is None
    assert majority_vote(["3", "4", "4"]) == 1


def test_maj_votes_on_answers_the_grader_calls_equal() -> None:
    from prm_jax.answers import grade_answer

    # The grader calls 0.5 and \\frac12 equal; so must the vote: 3 votes for 1/2 beat 2 for 3.
    assert grade_answer("0.5", "\\frac12") == "correct"
    answers = ["3", "0.5", "\\frac12", "3", "\\dfrac{1}{2}"]
    assert answer_classes(answers) == [0, 1, 1, 0, 1]
    outcome = score_problem([False, True, True, False, True], answers, [[0.5]] * 5)
    assert outcome.majority_index == 1 and outcome.maj_correct and not outcome.inconsistent_vote
    assert outcome.majority_answer == "0.5"
    assert answer_classes(["2", None, "x^{", "x^{", "3"]) == [0, None, 2, 2, 4]  # unparseable: string equality


def test_inconsistent_vote_groups_are_counted() -> None:
    outcome = score_problem([False, True, True], ["7", "7", "8"], [[0.5]] * 3)
    assert outcome.majority_index == 0 and not outcome.maj_correct and outcome.inconsistent_vote


def test_bon_scores_per_dataset_and_unweighted_average() -> None:
    a1 = score_problem([False, True], ["1", "2"], [[0.9], [0.2]], ["min"])  # prm wrong, maj wrong, pass right
    a2 = score_problem([True, True], ["5", "5"], [[0.3], [0.4]], ["min"])  # all right
    b1 = score_problem([False, False], ["1", "1"], [[0.1], [0.9]], ["min"])  # all wrong
    datasets, average = bon_scores([("a", a1), ("a", a2), ("b", b1)], ["min"])
    assert datasets["a"].prm_at_n == {"min": 0.5} and datasets["a"].maj_at_n == 0.5 and datasets["a"].pass_at_n == 1.0
    assert datasets["b"].pass_at_n == 0.0 and datasets["b"].n == 2
    assert average.prm_at_n["min"] == pytest.approx(0.25)  # (0.5 + 0) / 2, not 1/3
    assert average.pass_at_n == pytest.approx(0.5) and average.n_problems == 3
    text = bon_markdown(
        {
            "aggregations": ["min"],
            "datasets": {k: v.as_dict() for k, v in datasets.items()},
            "average": average.as_dict(),
        }
    )
    assert "| prm@2 (min) | 50.0 | 0.0 | 25.0 |" in text and "| pass@2 | 100.0 | 0.0 | 50.0 |" in text


# ---------------------------------------------------------------------------- analyses


def test_min_position_share_and_histogram() -> None:
    stats = min_position_stats([[0.9, 0.2], [0.1, 0.5, 0.6], [0.5], [0.3, 0.3], [0.8, 0.4, 0.9]], bins=4)
    # final: first only; [0.3, 0.3] ties -> first step; [0.5] excluded
    assert stats.n_responses == 4 and stats.n_single_step == 1
    assert stats.final_step_share == pytest.approx(1 / 4)
    assert stats.histogram_counts == [2, 0, 1, 1]  # positions 1.0, 0.0, 0.0, 0.5
    assert math.isnan(min_position_stats([[0.5]]).final_step_share)


def test_flawed_process_detection() -> None:
    items = [
        ("a", True, 2, 2),  # flagged, exact
        ("a", True, 1, 0),  # flagged, wrong step
        ("a", True, 1, -1),  # missed
        ("a", True, 0, None),  # no verdict: missed
        ("a", True, -1, 0),  # not flawed: ignored
        ("a", False, 1, 1),  # wrong answer: ignored
        ("a", None, 1, 1),  # unknown: ignored
    ]
    d = flawed_process_detection(items)
    assert d.n == 4 and d.flagged == 0.5 and d.exact == 0.25
    assert d.pooled_flagged == 0.5 and d.pooled_exact == 0.25
    assert math.isnan(flawed_process_detection([]).flagged)


def test_flawed_process_accuracy_is_the_unweighted_mean_of_subsets() -> None:
    # Table 5 of the paper averages subsets: a small subset weighs as much as a large one.
    items = [("gsm8k", True, 1, 1)] * 1 + [("gsm8k", True, 1, 0)] * 1  # 1/2 exact
    items += [("math", True, 2, 2)] * 9 + [("math", True, 2, -1)] * 1  # 9/10 exact
    d = flawed_process_detection(items)
    assert d.exact == pytest.approx((0.5 + 0.9) / 2)  # 0.7, not the pooled 10/12
    assert d.pooled_exact == pytest.approx(10 / 12)
    assert d.subsets["gsm8k"].n == 2 and d.subsets["math"].exact == pytest.approx(0.9)
    assert d.as_dict()["subsets"]["math"]["n"] == 10


def test_labelled_steps_and_calibration_by_hand() -> None:
    assert list(labelled_steps([0.9, 0.8, 0.1, 0.7], 2)) == [(0.9, 1), (0.8, 1), (0.1, 0)]
    assert list(labelled_steps([0.9, 0.8], -1)) == [(0.9, 1), (0.8, 1)]
    steps = [(0.95, 1), (0.85, 1), (0.15, 0), (0.05, 1), (1.0, 0)]
    cal = calibration(steps, bins=2)
    # bin [0, 0.5): rewards .15, .05 (mean .1), accuracy .5; bin [0.5, 1]: .95, .85, 1.0 (mean .9333), accuracy 2/3
    assert cal.bin_counts == [2, 3]
    assert cal.bin_mean_reward[0] == pytest.approx(0.1) and cal.bin_accuracy[1] == pytest.approx(2 / 3)
    assert cal.ece == pytest.approx(2 / 5 * 0.4 + 3 / 5 * abs(2 / 3 - 2.8 / 3))
    empty = calibration([], bins=3)
    assert empty.n_steps == 0 and math.isnan(empty.ece) and empty.bin_accuracy == [None] * 3


def test_docs_quote_figure_8_of_the_paper() -> None:
    """Fig. 8: 17.5% (PRM-7B) and 18.0% (72B); 17.3% is RLHFlow-Deepseek's, and the 42-55% group
    is Skywork-PRM-7B, Math-Shepherd-PRM-7B and the implicit EurusPRMs, not MC-trained PRMs only."""
    from pathlib import Path

    import prm_jax.evaluation.analyses as analyses

    root = Path(__file__).resolve().parents[1]
    for text in (analyses.__doc__, (root / "docs" / "design.md").read_text(encoding="utf-8")):
        assert "17.3%" not in text and "44-55%" not in text and "44–55%" not in text
        assert "17.5%" in text and "18.0%" in text and "42.2%" in text and "44.5%" in text
