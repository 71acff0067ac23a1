"""Problem readers: our JSONL, GSM8K and MATH files, normalised to `Problem`.

Formats (JSONL, one object per line, UTF-8):

* `jsonl`: `{"id": str, "problem": str, "answer": str}` (our format; `id` required).
* `gsm8k`: `{"question": str, "answer": str}`; the gold is the text after the last
  `####` of `answer` (GSM8K's answers are a worked solution ending in `#### 42`).
* `math`: `{"problem": str, "solution": str}` (Hendrycks MATH); the gold is the last
  `\\boxed{}` of `solution`; an `answer` field (MATH-500) wins when present.

Any of the three gold spellings is accepted in any format's answer field (plain `42`,
`... #### 42`, `... \\boxed{42}`), see `gold_answer`. Ids: `id` when present, else
`unique_id` (MATH-500), else derived from the content (`gsm8k-<hash>`/`math-<hash>`),
which is stable when the file is reordered or split.

Bad lines never disappear silently: each becomes an `ErrorRecord` (malformed JSON, not an
object, a missing or empty problem or answer, a gold failing the grader's answer rule
(`prm_jax.answers.answer_problem`: unbalanced braces), a problem holding the step separator or a
chat control token (`prm_jax.tokenization.text_problem`, the rule training records follow: such a
problem would fake a turn boundary in every prompt and make the trainer refuse prm_train.jsonl),
a wrong type, a duplicate id) in input order, which
the sample stage counts and writes (or stops on, with `on_error="stop"`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_pipeline.config import PROBLEM_FORMATS
from data_pipeline.ids import content_id
from data_pipeline.schemas import ErrorRecord, Problem
from prm_jax.answers import answer_problem
from prm_jax.critique import last_boxed
from prm_jax.jsonl import RecordTooLongError, scan_lines
from prm_jax.tokenization import text_problem

FORMATS = PROBLEM_FORMATS


def gold_answer(raw: str) -> str | None:
    """The bare gold answer of a plain, GSM8K (`#### x`) or MATH (`\\boxed{x}`) answer string."""
    text = raw.strip()
    if "####" in text:
        text = text.rsplit("####", 1)[1].strip()
    elif "\\boxed" in text or "\\fbox" in text:
        boxed = last_boxed(text)
        if boxed is None:
            return None
        text = boxed.strip()
    if len(text) >= 2 and text.startswith("$") and text.endswith("$"):
        text = text.strip("$").strip()
    return text or None


class _BadLine(Exception):
    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


def _string(obj: dict[str, Any], name: str, *, required: bool = True) -> str | None:
    if name not in obj or obj[name] is None:
        if required:
            raise _BadLine(
                "missing_answer" if name in ("answer", "solution") else "missing_field", f"field {name!r} is missing"
            )
        return None
    value = obj[name]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and name in ("answer", "id"):
        return str(value)  # numeric golds (and ids) are common in hand-made files
    if not isinstance(value, str):
        raise _BadLine("bad_field", f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def _problem_from_object(obj: dict[str, Any], fmt: str, source: str) -> Problem:
    if fmt == "jsonl":
        record_id = _string(obj, "id")
        problem = _string(obj, "problem")
        raw_answer = _string(obj, "answer")
    elif fmt == "gsm8k":
        problem = _string(obj, "question")
        raw_answer = _string(obj, "answer")
        record_id = _string(obj, "id", required=False) or content_id("gsm8k", problem or "")
        if raw_answer is not None and "####" not in raw_answer:
            raise _BadLine("missing_answer", "a GSM8K answer ends with '#### <answer>'; this one has no '####'")
    elif fmt == "math":
        problem = _string(obj, "problem")
        raw_answer = _string(obj, "answer", required=False)
        if raw_answer is None:
            raw_answer = _string(obj, "solution")
            if raw_answer is not None and last_boxed(raw_answer) is None:
                raise _BadLine("missing_answer", "a MATH solution holds its answer in \\boxed{}; this one has none")
        record_id = (
            _string(obj, "id", required=False)
            or _string(obj, "unique_id", required=False)
            or content_id("math", problem or "")
        )
    else:
        raise ValueError(f"unknown problem format {fmt!r}; choose one of {FORMATS}")
    if not record_id or not record_id.strip():
        raise _BadLine("missing_field", "field 'id' is empty")
    if not problem or not problem.strip():
        raise _BadLine("missing_field", "the problem text is empty")
    why = text_problem(problem)  # the rule the trainer applies to prm_train.jsonl: refused here, not there
    if why is not None:
        raise _BadLine("control_token", f"the problem text {why}")
    gold = gold_answer(raw_answer or "")
    if gold is None:
        raise _BadLine("missing_answer", f"no gold answer could be read from {raw_answer!r:.80}")
    why = answer_problem(gold)
    if why is not None:  # the grader's rule: such a gold would grade every answer wrongly
        raise _BadLine("bad_gold", f"the gold answer {gold!r:.80} {why}; fix the answer field")
    return Problem(id=record_id, problem=problem, answer=gold, source=source)


#: Longest problem line read (problems are a few KB): a longer one becomes a `too_long` error
#: record after reading at most this many bytes of it, never parsed, prompted or tokenized.
MAX_PROBLEM_BYTES = 1 << 20


def read_problems(
    path: str | Path, fmt: str = "jsonl", *, max_line_bytes: int = MAX_PROBLEM_BYTES
) -> Iterator[Problem | ErrorRecord]:
    """Every non-blank line of a problem file as a `Problem` or an `ErrorRecord`.

    Duplicate ids: the first occurrence is the problem, later ones are `duplicate_id` errors.
    A line longer than `max_line_bytes` is a `too_long` error (bounded cost).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown problem format {fmt!r}; choose one of {FORMATS}")
    path = Path(path)
    seen: dict[str, str] = {}
    for line in scan_lines(path, max_line_bytes=max_line_bytes):
        source = f"{path}:{line.number}"
        line_id = f"{path.name}:{line.number}"
        try:
            if line.error is not None:
                kind = "too_long" if isinstance(line.error, RecordTooLongError) else "malformed_json"
                raise _BadLine(kind, line.error.message)
            problem = _problem_from_object(line.obj, fmt, source)
        except _BadLine as bad:
            yield ErrorRecord(
                id=line_id, stage="input", error=bad.error, message=bad.message, record_id=None, source=source
            )
            continue
        if problem.id in seen:
            yield ErrorRecord(
                id=line_id,
                stage="input",
                error="duplicate_id",
                message=f"id {problem.id!r} already used at {seen[problem.id]}",
                record_id=problem.id,
                source=source,
            )
            continue
        seen[problem.id] = source
        yield problem
