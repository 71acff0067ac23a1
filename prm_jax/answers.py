"""Final-answer equivalence with math-verify: the one comparison grading and voting share.

`data_pipeline.grading` grades a response by comparing its answer with the gold here (inside
killable worker processes), and Best-of-N's maj@N groups responses whose answers compare equal
here, so `0.5` and `\\frac12` vote together exactly when the grader would call them equal. It
lives in `prm_jax` because evaluation (`prm_jax`) must not import `data_pipeline`.

Both sides are wrapped in `\\boxed{}` so math-verify's LaTeX extraction reads exactly the answer.
That holds only for an answer whose braces balance (`answer_problem`, the one answer-validity rule
of the problem reader, the grader and the vote): `\\boxed{` + `x}{y` + `}` is a box around `x`,
and `\\boxed{` + `\\frac{1}{` + `}` a box that never closes, so such a gold is `bad_gold` and
such an answer matches nothing, instead of grading by what the re-balanced text happens to say.
A cheap string normalisation (dollar signs, spacing commands, `\\left`/`\\right`, `\\dfrac`)
decides the common case without sympy. Comparison errors inside math-verify count as "not equal"
(its `raise_on_error=False`): one candidate interpretation failing is routine there.

Timeouts: sympy can hang on adversarial input (a power tower). `grade_answer` runs with
math-verify's own timeouts off, for callers that enforce a hard wall-clock limit themselves (the
grading pool kills its worker). `equivalent_answers` takes `timeout_s` for math-verify's
`signal.alarm` timeouts, which only work on the main thread; off it they are off too.
"""

from __future__ import annotations

import functools
import threading

__all__ = [
    "CORRECT",
    "INCORRECT",
    "BAD_GOLD",
    "answer_problem",
    "normalized_answer",
    "grade_answer",
    "equivalent_answers",
]

CORRECT, INCORRECT, BAD_GOLD = "correct", "incorrect", "bad_gold"

_FAST_PATH_DROP = ("$", " ", "\\!", "\\,", "\\;", "\\left", "\\right")


def answer_problem(text: str) -> str | None:
    """Why `text` cannot be read as a bare final answer (a gold, or a response's box content), or None.

    An answer must be non-blank and its braces must balance the way `\\boxed{...}` counts them
    (every `{` and `}`, escaped or not; `\\{1,2\\}` balances): only then does the box this module
    wraps around it end where the answer ends. The message completes "the answer ...".
    """
    if not text.strip():
        return "is empty"
    depth = 0
    for position, char in enumerate(text):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth < 0:
                return f"has unbalanced braces: the '}}' at character {position + 1} closes no '{{'"
    if depth:
        return f"has unbalanced braces: {depth} '{{' never closed"
    return None


def normalized_answer(text: str) -> str:
    """The string fast path: equal normalised strings are equal answers without asking sympy."""
    for token in _FAST_PATH_DROP:
        text = text.replace(token, "")
    return text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").strip()


@functools.lru_cache(maxsize=8192)
def _parsed(answer: str, timeout_s: int | None) -> tuple:
    from math_verify import parse

    return tuple(parse("\\boxed{" + answer + "}", parsing_timeout=timeout_s))


def _verify(gold: tuple, answer: tuple, timeout_s: int | None) -> bool:
    from math_verify import verify

    return bool(verify(list(gold), list(answer), timeout_seconds=timeout_s))


def grade_answer(gold: str, answer: str) -> str:
    """math-verify's verdict on `answer` against `gold` (both bare answers, e.g. box contents):
    `correct`, `incorrect` or `bad_gold` (the gold fails `answer_problem` or does not parse); an
    answer failing `answer_problem` is `incorrect`. No timeout here: call it where a hard limit is
    enforced (`data_pipeline.grading.GradingPool`) or on trusted input."""
    if answer_problem(gold) is not None:
        return BAD_GOLD
    if answer_problem(answer) is not None:
        return INCORRECT
    gold_parsed = _parsed(gold, None)
    if not gold_parsed:
        return BAD_GOLD
    predicted = _parsed(answer, None)
    if not predicted:
        return INCORRECT
    return CORRECT if _verify(gold_parsed, predicted, None) else INCORRECT


def equivalent_answers(reference: str, answer: str, *, timeout_s: int | None = 5) -> bool:
    """Whether `answer` equals `reference` as the grader compares them (`reference` plays the
    gold). An answer that fails `answer_problem` or does not parse equals only its own normalised
    string; a math-verify timeout or error counts as not equal."""
    if normalized_answer(reference) == normalized_answer(answer):
        return True
    if answer_problem(reference) is not None or answer_problem(answer) is not None:
        return False
    if threading.current_thread() is not threading.main_thread():
        timeout_s = None  # signal.alarm cannot be armed off the main thread
    try:
        ref, other = _parsed(reference, timeout_s), _parsed(answer, timeout_s)
        return bool(ref and other) and _verify(ref, other, timeout_s)
    except Exception:  # noqa: BLE001 - math-verify's TimeoutException, sympy errors
        return False
