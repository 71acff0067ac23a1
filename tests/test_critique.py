"""Critique prompt layout and verdict parsing."""

import pytest

from prm_jax.critique import critique_prompt, last_boxed, parse_first_error


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
