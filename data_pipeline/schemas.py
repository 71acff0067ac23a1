"""The record types of every synthesis stage file, validated on read.

Each stage file holds exactly one record type (one JSON object per line); readers validate every
line and raise `prm_jax.jsonl.DataError` naming `file:line` and the field. Stage
outputs are consumed by later stages and by other nodes days later, so a corrupted or
hand-edited file must fail loudly at the line to fix rather than skew labels silently.

Record types and the files that hold them (`W` is the workdir, `S` a shard name):

* `Problem` -- the normalised input problem (built by `problems.py`, not stored);
* `SampleRecord` -- `W/sample/S.jsonl`: one problem and its N policy responses;
* `GradeRecord` -- `W/grade/S.jsonl`: one response with its steps and its grade;
* `MCRecord` -- `W/mc/S.jsonl`: Monte Carlo step labels of one response;
* `JudgeRecord` -- `W/judge/S.jsonl`: the LLM judge's verdict on one response;
* `ErrorRecord` -- `W/<stage>/S.errors.jsonl`: input or output that could not be used.

The consensus output is a PRM training file (`prm_jax.data.records` format plus metadata keys).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from prm_jax.critique import VERDICT_REASONS as CRITIQUE_VERDICT_REASONS
from prm_jax.jsonl import Fields

__all__ = [
    "Problem",
    "Response",
    "SampleRecord",
    "GradeRecord",
    "StepLabel",
    "MCCost",
    "MCRecord",
    "JudgeRecord",
    "ErrorRecord",
    "GRADE_STATUSES",
    "VERDICT_REASONS",
]

#: Grade outcomes. Only "correct" counts as correct; "timeout" (the hard per-item limit was hit),
#: "error" (the grader raised or its worker died) and "bad_gold" (the gold answer does not parse)
#: are counted separately so grading trouble is visible in the summary rather than hidden in
#: "incorrect".
GRADE_STATUSES = ("correct", "incorrect", "no_answer", "empty", "timeout", "error", "bad_gold")
FINISH_REASONS = ("stop", "length")
#: Why one judge sample gave, or did not give, a verdict.
VERDICT_REASONS = CRITIQUE_VERDICT_REASONS  # one list, owned by the parsers
#: Why a set of judge samples has no verdict after voting.
# "no_majority": written only by runs from before critic_vote (a strict majority); still readable.
NO_VERDICT_REASONS = VERDICT_REASONS[1:] + ("no_majority",)
MC_SKIP_REASONS = ("no_steps", "truncated", "bad_gold", "grade_timeout", "grade_error", "prompt_too_long")
JUDGE_SKIP_REASONS = ("no_steps", "prompt_too_long")


class _Record:
    """Shared JSON plumbing: `to_json` is the dataclass as plain JSON types."""

    kind: ClassVar[str]

    def to_json(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True)
class Problem(_Record):
    """A normalised input problem: `answer` is the bare gold answer (no `####`, no box)."""

    kind: ClassVar[str] = "problem"
    id: str
    problem: str
    answer: str
    source: str  # file:line of the input, for error messages and audits

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Problem:
        f = Fields(obj)
        return cls(
            f.string("id", non_empty=True),
            f.string("problem", non_empty=True),
            f.string("answer", non_empty=True),
            f.string("source"),
        )


@dataclasses.dataclass(frozen=True)
class Response(_Record):
    """One policy response: its text, the steps (split on blank lines) and the boxed answer."""

    index: int
    text: str
    steps: tuple[str, ...]
    answer: str | None  # content of the last \\boxed{}; None when there is none
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (hit max_tokens: truncated)
    num_tokens: int

    @classmethod
    def from_fields(cls, f: Fields) -> Response:
        return cls(
            f.integer("index", minimum=0),
            f.string("text"),
            f.strings("steps", item="step"),
            f.string("answer", optional=True),
            f.string("finish_reason", choices=FINISH_REASONS),
            f.integer("num_tokens", minimum=0),
        )


@dataclasses.dataclass(frozen=True)
class SampleRecord(_Record):
    """One problem and its N responses: the unit of one `n = N` sampling request."""

    kind: ClassVar[str] = "sample"
    id: str  # the problem id
    problem: str
    gold: str
    seed: int  # the request seed; response j was drawn with seed + j
    responses: tuple[Response, ...]

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> SampleRecord:
        f = Fields(obj)
        responses = tuple(Response.from_fields(r) for r in f.objects("responses"))
        if [r.index for r in responses] != list(range(len(responses))):
            raise f.fail("responses", "response indices must be 0, 1, ..., N-1 in order")
        return cls(
            f.string("id", non_empty=True),
            f.string("problem"),
            f.string("gold"),
            f.integer("seed", minimum=0),
            responses,
        )


@dataclasses.dataclass(frozen=True)
class GradeRecord(_Record):
    """One response with its grade; carries everything the MC, judge and consensus stages need."""

    kind: ClassVar[str] = "grade"
    id: str  # response id: "<problem id>#<index>"
    problem_id: str
    index: int
    problem: str
    gold: str
    steps: tuple[str, ...]
    answer: str | None
    finish_reason: str
    num_tokens: int
    status: str  # one of GRADE_STATUSES
    correct: bool  # status == "correct", stored for readers of the raw file

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> GradeRecord:
        f = Fields(obj)
        record = cls(
            f.string("id", non_empty=True),
            f.string("problem_id", non_empty=True),
            f.integer("index", minimum=0),
            f.string("problem"),
            f.string("gold"),
            f.strings("steps", item="step"),
            f.string("answer", optional=True),
            f.string("finish_reason", choices=FINISH_REASONS),
            f.integer("num_tokens", minimum=0),
            f.string("status", choices=GRADE_STATUSES),
            f.boolean("correct"),
        )
        if record.correct != (record.status == "correct"):
            raise f.fail("correct", f"correct={record.correct} contradicts status={record.status!r}")
        return record


@dataclasses.dataclass(frozen=True)
class StepLabel(_Record):
    """The MC estimate of one step.

    For a rolled-out step: `n` completions from the prefix ending at the step, `n_correct` of
    them reached the gold answer; `soft = n_correct / n`; `hard = 1` iff `n_correct >= 1`
    (the paper's best threshold). The last step is not rolled out: the prefix is the whole
    response, so its label is the response's own grade (`n = 0`, soft/hard 1 or 0).
    """

    n_correct: int
    n: int
    soft: float
    hard: int
    rolled_out: bool
    timeouts: int = 0  # completions whose grading hit the hard timeout (counted as incorrect)

    @classmethod
    def from_fields(cls, f: Fields) -> StepLabel:
        label = cls(
            f.integer("n_correct", minimum=0),
            f.integer("n", minimum=0),
            f.probability("soft"),
            f.integer("hard", minimum=0, maximum=1),
            f.boolean("rolled_out"),
            f.integer("timeouts", minimum=0),
        )
        if label.rolled_out:
            if label.n == 0 or label.n_correct > label.n:
                raise f.fail("n_correct", f"{label.n_correct} correct of {label.n} completions")
            if abs(label.soft - label.n_correct / label.n) > 1e-9:
                raise f.fail("soft", f"soft={label.soft} != n_correct/n={label.n_correct}/{label.n}")
            if label.hard != int(label.n_correct >= 1):
                raise f.fail("hard", f"hard={label.hard} but n_correct={label.n_correct}")
        elif label.n != 0 or label.soft != float(label.hard):
            raise f.fail("soft", "a step that was not rolled out has n=0 and soft == hard")
        return label


@dataclasses.dataclass(frozen=True)
class MCCost(_Record):
    """Generation actually run for one response, beside what the full expansion would have run."""

    prefixes: int = 0  # step prefixes rolled out (one n=k request each)
    completions: int = 0
    generated_tokens: int = 0
    prefixes_full: int = 0  # prefixes the full expansion rolls out: every step but the last
    completions_full: int = 0

    @classmethod
    def from_fields(cls, f: Fields) -> MCCost:
        return cls(
            *(
                f.integer(name, minimum=0)
                for name in ("prefixes", "completions", "generated_tokens", "prefixes_full", "completions_full")
            )
        )


@dataclasses.dataclass(frozen=True)
class MCRecord(_Record):
    """Monte Carlo labels of one response.

    `labels` covers the steps that were labelled: with early stop, steps up to and including the
    first hard-negative step (later steps carry no label in the paper's recipe); without it,
    every step. `first_error` is the index of the first step with hard label 0, or -1; None when
    the response was skipped (`skip_reason` says why).
    """

    kind: ClassVar[str] = "mc"
    id: str
    problem_id: str
    status: str  # "labelled" | "skipped"
    skip_reason: str | None
    k: int
    num_steps: int
    labels: tuple[StepLabel, ...]
    first_error: int | None
    early_stopped: bool  # labelling stopped before the last step because of a negative step
    cost: MCCost

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> MCRecord:
        f = Fields(obj)
        labels = tuple(StepLabel.from_fields(x) for x in f.objects("labels"))
        cost = MCCost.from_fields(f.object("cost"))
        record = cls(
            f.string("id", non_empty=True),
            f.string("problem_id", non_empty=True),
            f.string("status", choices=("labelled", "skipped")),
            f.string("skip_reason", choices=MC_SKIP_REASONS, optional=True),
            f.integer("k", minimum=1),
            f.integer("num_steps", minimum=0),
            labels,
            f.integer("first_error", minimum=-1, optional=True),
            f.boolean("early_stopped"),
            cost,
        )
        if record.status == "skipped":
            if record.skip_reason is None or record.labels or record.first_error is not None:
                raise f.fail("status", "a skipped record has a skip_reason, no labels and no first_error")
            return record
        if record.skip_reason is not None:
            raise f.fail("skip_reason", "a labelled record has no skip_reason")
        if not 1 <= len(labels) <= record.num_steps:
            raise f.fail("labels", f"{len(labels)} labels for {record.num_steps} steps")
        hard = [x.hard for x in labels]
        expected = hard.index(0) if 0 in hard else -1
        if record.first_error != expected:
            raise f.fail("first_error", f"first_error={record.first_error} but the labels say {expected}")
        if len(labels) < record.num_steps and not (record.early_stopped and expected == len(labels) - 1):
            raise f.fail("labels", "only an early stop at the last labelled step may leave steps unlabelled")
        return record


@dataclasses.dataclass(frozen=True)
class JudgeRecord(_Record):
    """The LLM judge on one response: per-sample verdicts and the (majority) first error."""

    kind: ClassVar[str] = "judge"
    id: str
    problem_id: str
    status: str  # "judged" | "skipped"
    skip_reason: str | None
    num_steps: int
    verdicts: tuple[int | None, ...]  # per judge sample; None = no verdict
    reasons: tuple[str, ...]  # per judge sample, one of VERDICT_REASONS
    first_error: int | None  # the vote's result in [-1, num_steps); None = no verdict
    no_verdict_reason: str | None  # why first_error is None (NO_VERDICT_REASONS)
    texts: tuple[str, ...] | None = None  # raw judge outputs when judge.keep_text is on

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> JudgeRecord:
        f = Fields(obj)
        num_steps = f.integer("num_steps", minimum=0)
        verdicts = f.array("verdicts")
        for i, v in enumerate(verdicts):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not -1 <= v < num_steps):
                raise f.fail("verdicts", f"verdict {i} is {v!r}; expected null or an index in [-1, {num_steps})")
        reasons = f.strings("reasons")
        for i, r in enumerate(reasons):
            if r not in VERDICT_REASONS:
                raise f.fail("reasons", f"reason {i} is {r!r}, not one of {list(VERDICT_REASONS)}")
        texts = None if f.absent("texts") else f.strings("texts")
        record = cls(
            f.string("id", non_empty=True),
            f.string("problem_id", non_empty=True),
            f.string("status", choices=("judged", "skipped")),
            f.string("skip_reason", choices=JUDGE_SKIP_REASONS, optional=True),
            num_steps,
            tuple(verdicts),
            reasons,
            f.integer("first_error", minimum=-1, optional=True),
            f.string("no_verdict_reason", choices=NO_VERDICT_REASONS, optional=True),
            texts,
        )
        if len(record.reasons) != len(record.verdicts):
            raise f.fail("reasons", f"{len(record.reasons)} reasons for {len(record.verdicts)} verdicts")
        if record.first_error is not None and not record.first_error < num_steps:
            raise f.fail("first_error", f"{record.first_error} is out of range for {num_steps} steps")
        if (record.first_error is None) != (record.no_verdict_reason is not None) and record.status == "judged":
            raise f.fail("no_verdict_reason", "set exactly when first_error is null")
        if record.status == "skipped" and (record.skip_reason is None or record.verdicts):
            raise f.fail("status", "a skipped record has a skip_reason and no verdicts")
        return record


@dataclasses.dataclass(frozen=True)
class ErrorRecord(_Record):
    """Something that could not be used: a bad input line, an empty response, ...

    Errors are records (not log lines) so they are counted in the summary, survive restarts,
    and can be listed and fixed; `source` points at the input line when there is one.
    """

    kind: ClassVar[str] = "error"
    id: str  # unique in its file: the record id, or "<file name>:<line>" when the line had none
    stage: str
    error: str  # short machine-readable kind: malformed_json, missing_answer, empty_response, ...
    message: str
    record_id: str | None = None  # the problem or response the error is about, when known
    source: str | None = None  # file:line of the offending input, when it came from a file

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ErrorRecord:
        f = Fields(obj)
        return cls(
            f.string("id", non_empty=True),
            f.string("stage", non_empty=True),
            f.string("error", non_empty=True),
            f.string("message"),
            f.string("record_id", optional=True),
            f.string("source", optional=True),
        )
