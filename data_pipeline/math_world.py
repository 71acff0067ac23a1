"""The embedded default's world: seeded multi-step arithmetic with an exact step checker.

A problem chains additions/subtractions ("Compute 37 + 45 - 12."). The difficulty is set by
`generate_problems`' operand range, number of operations and cap on the running total; the
defaults draw two-digit numbers, while the embedded demo (`launch.demo_pipeline`) uses 2-3
operations on single digits with totals in [0, 9], which a 4-layer policy learns on a CPU in
about two minutes (with two-digit numbers it learns the format but not the arithmetic).
A solution takes one operation per step ("37 + 45 = 82", "82 - 12 = 70") and ends with
"The answer is \\boxed{70}.". Because every step has the form `a op b = c`, the checker can say
exactly which step is the first wrong one, so every synthesized label can be compared with the
truth. A step is right when it applies the problem's next operation to the previous step's result
(the first operand for step 0) and computes it correctly; a later step that continues correctly
from an earlier mistake is still right locally, but the first error is what ProcessBench scores.

`noisy_solution` writes the policy's fine-tuning data with realistic mistakes: a wrong carry
(off by ten), an off-by-one, swapped digits, a propagated error, and a right answer reached
through a wrong step (two mistakes that cancel).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

from prm_jax.files import atomic_write_lines

STEP_PATTERN = re.compile(r"^\s*(-?\d+)\s*([+-])\s*(\d+)\s*=\s*(-?\d+)\s*$")
ANSWER_PATTERN = re.compile(r"^\s*The answer is \\boxed\{(-?\d+)\}\.?\s*$")


@dataclasses.dataclass(frozen=True)
class WorldProblem:
    id: str
    first: int
    operations: tuple[tuple[str, int], ...]  # ("+", 45), ("-", 12), ...

    @property
    def text(self) -> str:
        return "Compute " + " ".join([str(self.first)] + [f"{op} {n}" for op, n in self.operations]) + "."

    @property
    def answer(self) -> int:
        value = self.first
        for op, n in self.operations:
            value = value + n if op == "+" else value - n
        return value

    def record(self) -> dict:
        """The standard problem JSONL record."""
        return {"id": self.id, "problem": self.text, "answer": str(self.answer)}


def generate_problems(
    count: int,
    seed: int,
    *,
    prefix: str = "world",
    min_ops: int = 2,
    max_ops: int = 3,
    operand_min: int = 10,
    operand_max: int = 99,
    max_value: int | None = None,
) -> list[WorldProblem]:
    """`count` seeded problems. The first number and every operand are drawn from
    [operand_min, operand_max]; with `max_value` the running total stays within [0, max_value]
    (the operator is forced where only one keeps it there), which sets the world's difficulty:
    the embedded demo uses single-digit operands and totals below 20."""
    rng = random.Random(seed)
    problems = []
    for index in range(count):
        value = rng.randint(operand_min, operand_max)
        first, operations = value, []
        for _ in range(rng.randint(min_ops, max_ops)):
            n = rng.randint(operand_min, operand_max)
            can_sub = value - n >= 0
            can_add = max_value is None or value + n <= max_value
            if not can_add and not can_sub:
                n = rng.randint(operand_min, min(operand_max, value)) if value >= operand_min else operand_min
                can_sub, can_add = value - n >= 0, value + n <= max_value
            op = "-" if can_sub and (not can_add or rng.random() < 0.5) else "+"
            value = value + n if op == "+" else value - n
            operations.append((op, n))
        problems.append(WorldProblem(f"{prefix}-{seed}-{index:05d}", first, tuple(operations)))
    return problems


def reference_solution(problem: WorldProblem) -> list[str]:
    steps, value = [], problem.first
    for op, n in problem.operations:
        result = value + n if op == "+" else value - n
        steps.append(f"{value} {op} {n} = {result}")
        value = result
    steps.append(f"The answer is \\boxed{{{value}}}.")
    return steps


MISTAKES = ("carry", "off_by_one", "swap")


def _mistake(rng: random.Random, value: int, kinds: Sequence[str] = MISTAKES) -> int:
    """A wrong result for `value`: a wrong carry (off by ten), an off-by-one slip, or swapped
    digits (a single digit has none to swap: off by ten), the kind drawn from `kinds`."""
    kind = rng.choice(kinds)
    if kind == "carry":
        wrong = value + rng.choice([-10, 10])
    elif kind == "off_by_one":
        wrong = value + rng.choice([-1, 1])
    elif kind == "swap":
        digits = str(abs(value))
        wrong = (
            int(digits[::-1]) * (1 if value >= 0 else -1) if len(digits) > 1 and digits[0] != digits[-1] else value + 10
        )
    else:
        raise ValueError(f"unknown mistake kind {kind!r}; expected one of {MISTAKES}")
    return wrong if wrong != value else value + 1


def noisy_solution(
    problem: WorldProblem, rng: random.Random, error_rate: float = 0.3, mistakes: Sequence[str] = MISTAKES
) -> list[str]:
    """A solution with, at probability `error_rate`, one mistake of a kind in `mistakes`
    (propagated to the answer), or, a quarter of the time when a step follows it, two that cancel
    (the next step undoes it: the right answer through a wrong step)."""
    steps, value = [], problem.first
    ops = problem.operations
    error_at = rng.randrange(len(ops)) if rng.random() < error_rate else -1
    cancel_at = -1
    if error_at != -1 and error_at + 1 < len(ops) and rng.random() < 0.25:
        cancel_at = error_at + 1  # the next step undoes the mistake: right answer, wrong process
    offset = 0
    for index, (op, n) in enumerate(ops):
        result = value + n if op == "+" else value - n
        if index == error_at:
            wrong = _mistake(rng, result, mistakes)
            offset = wrong - result
            result = wrong
        elif index == cancel_at:
            result -= offset
        steps.append(f"{value} {op} {n} = {result}")
        value = result
    steps.append(f"The answer is \\boxed{{{value}}}.")
    return steps


def first_error(problem: WorldProblem, steps: Sequence[str]) -> int:
    """Index of the first wrong step, or -1 when every step is right (the exact checker).

    A step is wrong when it does not parse, uses the wrong operand or operator, computes wrongly,
    or (as the last step) states an answer other than the last computed value. A solution that
    stops before its answer is wrong at its last step (labels must point at a step that exists);
    extra steps after the answer are wrong.
    """
    value = problem.first
    operations = list(problem.operations)
    for index, step in enumerate(steps):
        if index < len(operations):
            match = STEP_PATTERN.match(step)
            if not match:
                return index
            a, op, b, c = int(match[1]), match[2], int(match[3]), int(match[4])
            expected_op, expected_n = operations[index]
            if a != value or op != expected_op or b != expected_n:
                return index
            if c != (a + b if op == "+" else a - b):
                return index
            value = c
        elif index == len(operations):
            match = ANSWER_PATTERN.match(step)
            if not match or int(match[1]) != value:
                return index
        else:
            return index
    if len(steps) <= len(operations):
        return max(len(steps) - 1, 0)
    return -1


ERROR_KINDS = ("unparsed", "operand", "out_of_range", "in_range", "stopped", "answer", "extra_step")


def error_kind(problem: WorldProblem, steps: Sequence[str], index: int, max_value: int | None = None) -> str:
    """What went wrong at step `index` (the first error): it does not parse ("unparsed"), uses a
    wrong operand or operator ("operand"), computes a result outside the world's range of running
    totals [0, max_value] ("out_of_range": an impossible value; without `max_value` only a
    negative one) or inside it ("in_range": a plausible slip), is right but the solution stops
    there ("stopped"), states a wrong answer ("answer"), or follows the answer ("extra_step")."""
    operations = problem.operations
    if index > len(operations):
        return "extra_step"
    if index == len(operations):
        return "answer"
    match = STEP_PATTERN.match(steps[index])
    if not match:
        return "unparsed"
    value = problem.first
    for step in steps[:index]:
        value = int(STEP_PATTERN.match(step)[4])
    a, op, b, c = int(match[1]), match[2], int(match[3]), int(match[4])
    if a != value or (op, b) != operations[index]:
        return "operand"
    if c == (a + b if op == "+" else a - b):
        return "stopped"
    return "in_range" if 0 <= c <= (max_value if max_value is not None else c) else "out_of_range"


def step_labels(problem: WorldProblem, steps: Sequence[str]) -> list[int]:
    """1 up to the first error, 0 from it on (the paper's convention)."""
    error = first_error(problem, steps)
    return [1 if error == -1 or i < error else 0 for i in range(len(steps))]


def write_problems(path: str | Path, problems: Sequence[WorldProblem]) -> Path:
    atomic_write_lines(path, (json.dumps(problem.record()) for problem in problems))
    return Path(path)


def parse_problem(text: str, problem_id: str = "") -> WorldProblem:
    """Recovers a WorldProblem from its text (the judge sees only the prompt)."""
    match = re.fullmatch(r"\s*Compute (\d+)((?: [+-] \d+)+)\.\s*", text)
    if not match:
        raise ValueError(f"not a world problem: {text!r}")
    pairs = re.findall(r" ([+-]) (\d+)", match[2])
    return WorldProblem(problem_id, int(match[1]), tuple((op, int(n)) for op, n in pairs))


# ---------------------------------------------------------------------------- the judge's role

_PROBLEM_IN_PROMPT = re.compile(r"\[Math Problem\]\s*(.*?)\s*\[Solution\]", re.DOTALL)
_PARAGRAPH = re.compile(r"<paragraph_(\d+)>\n(.*?)\n</paragraph_\1>", re.DOTALL)


class CheckerJudge:
    """A GenerationBackend that answers ProcessBench critique prompts with the exact checker.

    In the embedded world the LLM judge's role is played by the step checker, optionally wrong at
    `error_rate` (then it names a different, random step), so consensus filtering has a real
    disagreement to filter. It reads the problem and paragraphs back from the critique prompt, so
    it runs through the same judge stage and parser as an LLM.
    """

    def __init__(self, tokenizer, *, error_rate: float = 0.0, seed: int = 0):
        self.tokenizer = tokenizer
        self.error_rate = error_rate
        self.seed = seed

    def _prompt_text(self, prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        items = list(prompt)
        if items and isinstance(items[0], dict):  # the text every backend would render
            from prm_jax.tokenization import render_chat

            return render_chat(self.tokenizer, items)
        return self.tokenizer.decode([int(t) for t in items], skip_special_tokens=True)

    def verdict(self, text: str, sample_seed: int) -> int:
        problem_match = _PROBLEM_IN_PROMPT.search(text)
        if not problem_match:
            raise ValueError("CheckerJudge got a prompt that is not a critique prompt")
        problem = parse_problem(problem_match[1])
        steps = [body for _, body in _PARAGRAPH.findall(text)]
        truth = first_error(problem, steps)
        rng = random.Random(f"{self.seed}:{sample_seed}:{text}")
        if rng.random() < self.error_rate:
            others = [i for i in range(-1, len(steps)) if i != truth]
            return rng.choice(others) if others else truth
        return truth

    def generate(self, prompts, params):
        from prm_jax.generation.types import Completion, RequestOutput, per_prompt_params, render_prompt

        outputs = []
        for prompt, p in zip(prompts, per_prompt_params(params, len(prompts))):
            text = self._prompt_text(prompt)
            completions = []
            for j in range(p.n):
                index = self.verdict(text, p.seed + j)
                answer = (
                    f"The earliest error is in paragraph {index}. \\boxed{{{index}}}"
                    if index >= 0
                    else "No error found. \\boxed{-1}"
                )
                ids = tuple(self.tokenizer.encode(answer, add_special_tokens=False))
                completions.append(Completion(answer, ids, "stop"))
            prompt_ids = tuple(render_prompt(self.tokenizer, prompt))
            outputs.append(RequestOutput(prompt_ids, tuple(completions)))
        return outputs
