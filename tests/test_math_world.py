"""The embedded world: problems, the exact step checker, noisy solutions, the checker judge."""

import random

import pytest

from data_pipeline.math_world import (
    CheckerJudge,
    WorldProblem,
    error_kind,
    first_error,
    generate_problems,
    noisy_solution,
    parse_problem,
    reference_solution,
    step_labels,
)
from prm_jax.critique import critique_messages, parse_first_error
from prm_jax.generation.types import SamplingParams

PROBLEM = WorldProblem("p", 37, (("+", 45), ("-", 12)))


def test_problem_text_answer_and_reference() -> None:
    assert PROBLEM.text == "Compute 37 + 45 - 12." and PROBLEM.answer == 70
    assert reference_solution(PROBLEM) == ["37 + 45 = 82", "82 - 12 = 70", "The answer is \\boxed{70}."]
    assert parse_problem(PROBLEM.text) == WorldProblem("", 37, (("+", 45), ("-", 12)))
    problems = generate_problems(50, seed=3)
    assert problems == generate_problems(50, seed=3) and problems != generate_problems(50, seed=4)
    for p in problems:
        assert first_error(p, reference_solution(p)) == -1
        assert parse_problem(p.text, p.id) == p


@pytest.mark.parametrize(
    "steps, expected",
    [
        (["37 + 45 = 82", "82 - 12 = 70", "The answer is \\boxed{70}."], -1),
        (["37 + 45 = 72", "72 - 12 = 60", "The answer is \\boxed{60}."], 0),  # wrong carry, propagated
        (["37 + 45 = 82", "82 - 12 = 71", "The answer is \\boxed{71}."], 1),
        (["37 + 45 = 82", "82 + 12 = 94", "The answer is \\boxed{94}."], 1),  # wrong operator
        (["37 + 45 = 82", "80 - 12 = 68", "The answer is \\boxed{68}."], 1),  # wrong operand
        (["37 + 45 = 82", "82 - 12 = 70", "The answer is \\boxed{71}."], 2),
        (["37 + 45 = 92", "92 - 12 = 70", "The answer is \\boxed{70}."], 0),  # right answer, wrong step
        (["37 + 45 is 82", "82 - 12 = 70", "The answer is \\boxed{70}."], 0),  # unparseable
        (["37 + 45 = 82", "82 - 12 = 70"], 1),  # stops before the answer
        (["37 + 45 = 82", "82 - 12 = 70", "The answer is \\boxed{70}.", "Done."], 3),
    ],
)
def test_exact_checker(steps, expected) -> None:
    assert first_error(PROBLEM, steps) == expected
    labels = step_labels(PROBLEM, steps)
    assert labels == [1 if expected == -1 or i < expected else 0 for i in range(len(steps))]


def test_noisy_solutions_make_each_kind_of_mistake() -> None:
    rng = random.Random(0)
    problems = generate_problems(400, seed=1)
    errors, right_answer_wrong_process = 0, 0
    for p in problems:
        steps = noisy_solution(p, rng, error_rate=0.5)
        error = first_error(p, steps)
        if error != -1:
            errors += 1
            if steps[-1] == f"The answer is \\boxed{{{p.answer}}}.":
                right_answer_wrong_process += 1
            assert error < len(p.operations)  # mistakes are in computation steps, the answer follows
    assert 150 < errors < 250 and right_answer_wrong_process > 10


def test_noisy_solution_mistake_kinds() -> None:
    rng = random.Random(0)
    problems = generate_problems(300, seed=2, operand_min=1, operand_max=9, max_value=9)
    offsets = set()
    for p in problems:
        steps = noisy_solution(p, rng, error_rate=1.0, mistakes=("carry",))
        error = first_error(p, steps)
        assert 0 <= error < len(p.operations)
        a, op, b, _, c = steps[error].split()
        offsets.add(int(c) - (int(a) + int(b) if op == "+" else int(a) - int(b)))
        assert not 0 <= int(c) <= 9  # in this world a wrong carry leaves the range of running totals
    assert offsets == {-10, 10}
    with pytest.raises(ValueError, match="unknown mistake kind 'typo'"):
        noisy_solution(problems[0], rng, error_rate=1.0, mistakes=("typo",))


@pytest.mark.parametrize(
    "steps, kind",
    [
        (["7 + 2 = 19", "19 - 5 = 14", "The answer is \\boxed{14}."], "out_of_range"),
        (["7 + 2 = 9", "9 - 5 = -6", "The answer is \\boxed{-6}."], "out_of_range"),
        (["7 + 2 = 8", "8 - 5 = 3", "The answer is \\boxed{3}."], "in_range"),
        (["7 + 2 = 9", "9 + 5 = 14", "The answer is \\boxed{14}."], "operand"),
        (["7 + 2 = 9", "8 - 5 = 3", "The answer is \\boxed{3}."], "operand"),
        (["7 + 2 is 9", "9 - 5 = 4", "The answer is \\boxed{4}."], "unparsed"),
        (["7 + 2 = 9", "9 - 5 = 4", "The answer is \\boxed{5}."], "answer"),
        (["7 + 2 = 9", "9 - 5 = 4", "The answer is \\boxed{4}.", "Done."], "extra_step"),
        (["7 + 2 = 9"], "stopped"),
    ],
)
def test_error_kind(steps, kind) -> None:
    problem = WorldProblem("p", 7, (("+", 2), ("-", 5)))
    assert error_kind(problem, steps, first_error(problem, steps), max_value=9) == kind


def test_checker_judge_answers_critique_prompts() -> None:
    class Tok:
        def encode(self, text, add_special_tokens=False):
            return [ord(c) % 256 for c in text]

    steps = ["37 + 45 = 82", "82 - 12 = 71", "The answer is \\boxed{71}."]
    judge = CheckerJudge(Tok())
    out = judge.generate([critique_messages(PROBLEM.text, steps)], SamplingParams(n=3, max_tokens=8))
    assert [parse_first_error(c.text, len(steps)) for c in out[0].completions] == [1, 1, 1]
    noisy = CheckerJudge(Tok(), error_rate=1.0, seed=1)
    verdicts = [
        parse_first_error(c.text, len(steps))
        for c in noisy.generate([critique_messages(PROBLEM.text, steps)], SamplingParams(n=5, max_tokens=8))[
            0
        ].completions
    ]
    assert all(v is not None and v != 1 for v in verdicts)
