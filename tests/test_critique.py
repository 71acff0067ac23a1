"""Critique prompt layout and verdict parsing."""

import pytest

from prm_jax.critique import classify_verdict, critique_prompt, last_boxed, parse_first_error


def test_prompt_tags_steps_from_zero() -> None:
    prompt = critique_prompt("What is 1+1?", ["1 + 1 = 3", "So 3."])
    assert "[Math Problem]\n\nWhat is 1+1?" in prompt
    assert "<paragraph_0>\n1 + 1 = 3\n</paragraph_0>\n\n<paragraph_1>\nSo 3.\n</paragraph_1>" in prompt
    assert prompt.endswith("in \\boxed{}.")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The first error is in paragraph 1. \\boxed{1}", 1),
        ("All good. \\boxed{-1}", -1),
        ("\\boxed{0} wait, actually \\boxed{2}", 2),  # several boxes: the last one counts
        ("answer: \\boxed{ $1$ }", 1),
        ("\\boxed{\\text{1}}", 1),
        ("no box at all: 1", None),
        ("\\boxed{one}", None),  # not an integer
        ("\\boxed{1.5}", None),
        ("\\boxed{3}", None),  # out of range for 3 steps
        ("\\boxed{-2}", None),
        ("\\boxed{1", None),  # unbalanced
    ],
)
def test_parse_first_error(text, expected) -> None:
    assert parse_first_error(text, num_steps=3) == expected


def test_last_boxed_handles_nested_braces() -> None:
    assert last_boxed("x \\boxed{\\frac{1}{2}} y") == "\\frac{1}{2}"


@pytest.mark.parametrize(
    "text, lenient, official",
    [
        ("\\boxed{1}", 1, 1),
        ("\\boxed{ 2 }", 2, 2),  # int() strips spaces, as ProcessBench's does
        ("answer: \\boxed{ $1$ }", 1, None),  # ProcessBench: int("$1$") fails
        ("\\boxed{\\text{1}}", 1, None),  # its pattern stops at the first "}": "\\text{1"
        ("\\boxed {1}", 1, None),  # its pattern needs "\\boxed{"
        ("\\fbox{1}", 1, None),
        ("\\boxed{0} then \\boxed{-1}", -1, -1),
        ("\\boxed{7}", None, None),  # out of range: no verdict either way
    ],
)
def test_official_parse_is_processbench_extract_answer(text, lenient, official) -> None:
    assert parse_first_error(text, num_steps=3) == lenient
    assert parse_first_error(text, num_steps=3, official=True) == official


def test_paper_prompt_numbers_paragraphs_from_one_and_asks_for_conclusions() -> None:
    prompt = critique_prompt("What is 1+1?", ["1 + 1 = 3", "So 3."], prompt="paper")
    assert "<paragraph_1>\n1 + 1 = 3\n</paragraph_1>\n\n<paragraph_2>\nSo 3.\n</paragraph_2>" in prompt
    assert "<paragraph_0>" not in prompt and "\\boxed" not in prompt
    assert "<analysis_k>" in prompt and "<conclusion_k>" in prompt and "Incorrect" in prompt
    with pytest.raises(ValueError, match="unknown critique prompt"):
        critique_prompt("p", ["s"], prompt="other")


def _paper_answer(*conclusions: str) -> str:
    return "\n".join(
        f"<analysis_{k}>\nchecked\n</analysis_{k}>\n<conclusion_{k}>{c}</conclusion_{k}>"
        for k, c in enumerate(conclusions, 1)
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        (_paper_answer("Correct", "Incorrect"), (1, "ok")),  # paragraph 2 (1-based) = index 1
        (_paper_answer("Correct", "Correct", "Correct"), (-1, "ok")),
        (_paper_answer("Incorrect"), (0, "ok")),  # stopped after the first error: fine
        (_paper_answer("Correct", "Incorrect", "Incorrect"), (1, "ok")),  # the earliest Incorrect
        ("<conclusion_2> incorrect </conclusion_2>", (None, "incomplete")),  # paragraph 1 unexamined
        (_paper_answer("Correct", "Correct"), (None, "incomplete")),  # paragraph 3 never concluded
        ("All paragraphs are fine. \\boxed{-1}", (None, "no_conclusion")),  # the other prompt's answer
        ("<conclusion_4>Incorrect</conclusion_4>", (None, "out_of_range")),
        ("<conclusion_1>Correct</conclusion_1><conclusion_1>Incorrect</conclusion_1>", (None, "conflicting")),
        ("<conclusion_1>Maybe</conclusion_1>", (None, "no_conclusion")),
    ],
)
def test_paper_parser(text, expected) -> None:
    assert classify_verdict(text, num_steps=3, prompt="paper") == expected
    assert parse_first_error(text, num_steps=3, prompt="paper") == expected[0]
