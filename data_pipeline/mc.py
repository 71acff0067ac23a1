"""Stage 3, mc: Monte Carlo step labels from policy rollouts.

For a response with steps `s_0 .. s_{S-1}` and each step `i < S-1`, the policy continues the
prefix `s_0 .. s_i` `k` times as ONE request with `n = k` (the prefix is prefilled once and
shared; seeds `stable_seed(seed, "mc", response_id, i) + j`). The prompt is the policy prompt
with the assistant answer started by the prefix (layout in `data_pipeline.solutions`):

    <chat template: system, user = problem, assistant opened> s_0 \\n\\n s_1 \\n\\n ... s_i \\n\\n

A completion's final answer is the last `\\boxed{}` of `prefix + completion` (the solution it
completes), graded against the gold. Per step: `n_correct`; soft label `n_correct / k`; hard
label `n_correct >= 1` (the paper's best threshold). The last step is not rolled out: its
prefix is the whole response, so its label is the response's own grade (free). A response whose
grade is unknown (grading `timeout` or `error`) is therefore not labelled at all: skipped as
`grade_timeout` / `grade_error` and counted, never given a last-step 0 as if it were wrong.

Early stop (`mc.early_stop`, default on): steps are rolled out in order and a response stops at
its first hard-negative step, since later steps carry no label in the paper's recipe (training
truncates at the first error). The first error is then known without rolling out the rest;
`data_pipeline.schemas.MCCost` records what ran beside what the full expansion would
have run (`prefixes_full = S - 1`), and the summary adds them up. Without early stop every
prefix of a response is requested in one wave.

Batching: up to `mc.batch_responses` responses are in flight; each wave sends one request per
in-flight response (its next prefix), and a finished response is written and replaced by the
next one at once (continuous batching), so the backend sees full batches even though responses
stop at different depths. That loop is a `data_pipeline.dispatch` task (a lane); on engines in this
process one lane runs, on Ray workers (`data_pipeline.ray_runner`) `workers x in_flight_per_worker`
lanes share the queue of responses so that every engine has a wave to run. A record depends only
on its own requests (seeds per response and step), not on which lane or wave carried them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import ml_collections

from data_pipeline.backends import context_length, prompt_lengths
from data_pipeline.config import default_config, section_values
from data_pipeline.context import StageContext
from data_pipeline.dispatch import Generation, Task, drive, lanes
from data_pipeline.grading import CORRECT, ERROR, TIMEOUT, GradingPool
from data_pipeline.ids import stable_seed
from data_pipeline.schemas import GradeRecord, MCCost, MCRecord, StepLabel
from data_pipeline.solutions import STEP_BREAK, continuation_prompt, final_answer, policy_prompt
from prm_jax.generation.types import GenerationBackend, SamplingParams

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MCSettings:
    """The `mc` section of the synthesis config; its defaults are stated there only."""

    k: int
    temperature: float
    top_p: float
    max_tokens: int
    early_stop: bool
    skip_truncated: bool
    batch_responses: int
    system_prompt: str
    base_seed: int

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict | None = None, **overrides: Any) -> MCSettings:
        """From a synthesis config (`default_config()` when None), then `overrides`."""
        config = default_config() if config is None else config
        settings = cls(
            **section_values(cls, config.mc), system_prompt=config.sample.system_prompt, base_seed=config.seed
        )
        return dataclasses.replace(settings, **overrides)


@dataclasses.dataclass
class _InFlight:
    record: GradeRecord
    head: str  # the rendered policy prompt, shared by all prefixes of the response
    labels: list[StepLabel] = dataclasses.field(default_factory=list)
    generated_tokens: int = 0
    prefixes: int = 0

    @property
    def num_steps(self) -> int:
        return len(self.record.steps)


class MCLabeler:
    """Labels graded responses by MC rollouts with early stop; yields records as they finish."""

    def __init__(self, backend: GenerationBackend, grader: GradingPool, settings: MCSettings) -> None:
        self.backend = backend
        self.grader = grader
        self.settings = settings
        self.context_length = context_length(backend)

    # ------------------------------------------------------------------ per response

    def _skip_reason(self, record: GradeRecord, head: str) -> str | None:
        if not record.steps:
            return "no_steps"
        if record.status == "bad_gold":
            return "bad_gold"
        if record.status in (TIMEOUT, ERROR):
            # The last step's label is the response's own grade; an unknown grade is not "wrong".
            return f"grade_{record.status}"
        if self.settings.skip_truncated and record.finish_reason == "length":
            return "truncated"
        if self.context_length is not None and len(record.steps) > 1:
            longest = continuation_prompt(None, "", record.steps[:-1], rendered_problem=head)
            if prompt_lengths(self.backend, [longest])[0] >= self.context_length:
                return "prompt_too_long"
        return None

    def _cost(self, state: _InFlight) -> MCCost:
        full = max(state.num_steps - 1, 0)
        return MCCost(
            prefixes=state.prefixes,
            completions=state.prefixes * self.settings.k,
            generated_tokens=state.generated_tokens,
            prefixes_full=full,
            completions_full=full * self.settings.k,
        )

    def _skipped(self, record: GradeRecord, reason: str) -> MCRecord:
        full = max(len(record.steps) - 1, 0)
        return MCRecord(
            id=record.id,
            problem_id=record.problem_id,
            status="skipped",
            skip_reason=reason,
            k=self.settings.k,
            num_steps=len(record.steps),
            labels=(),
            first_error=None,
            early_stopped=False,
            cost=MCCost(prefixes_full=full, completions_full=full * self.settings.k),
        )

    def _finished(self, state: _InFlight) -> MCRecord | None:
        """The record when the response needs no more rollouts (adding the free last-step label)."""
        labels = state.labels
        if labels and labels[-1].hard == 0 and self.settings.early_stop:
            pass  # stopped at the first hard-negative step
        elif len(labels) == state.num_steps - 1:
            correct = int(state.record.correct)
            labels.append(StepLabel(n_correct=0, n=0, soft=float(correct), hard=correct, rolled_out=False))
        elif len(labels) < state.num_steps:
            return None
        hard = [x.hard for x in labels]
        first_error = hard.index(0) if 0 in hard else -1
        return MCRecord(
            id=state.record.id,
            problem_id=state.record.problem_id,
            status="labelled",
            skip_reason=None,
            k=self.settings.k,
            num_steps=state.num_steps,
            labels=tuple(labels),
            first_error=first_error,
            early_stopped=len(labels) < state.num_steps,
            cost=self._cost(state),
        )

    # ------------------------------------------------------------------ waves

    def _wave(self, active: list[_InFlight]) -> Task:
        """One wave as a generate call: each in-flight response's next prefix (all of its prefixes
        without early stop), the completions graded, a label appended per prefix."""
        s = self.settings
        requests = []  # (state, step index)
        for state in active:
            start = len(state.labels)
            stop = start + 1 if s.early_stop else state.num_steps - 1
            requests += [(state, i) for i in range(start, stop)]
        prompts = [
            continuation_prompt(None, "", st.record.steps[: i + 1], rendered_problem=st.head) for st, i in requests
        ]
        params = [
            SamplingParams(
                n=s.k,
                temperature=s.temperature,
                top_p=s.top_p,
                max_tokens=s.max_tokens,
                seed=stable_seed(s.base_seed, "mc", st.record.id, i),
            )
            for st, i in requests
        ]
        outputs = yield Generation(prompts, params, tuple(dict.fromkeys(st.record.id for st, _ in requests)))
        pairs = []
        for (state, i), output in zip(requests, outputs):
            prefix = STEP_BREAK.join(state.record.steps[: i + 1]) + STEP_BREAK
            pairs += [(state.record.gold, final_answer(prefix + c.text)) for c in output.completions]
        statuses = iter(self.grader.grade_many(pairs))
        for (state, _), output in zip(requests, outputs):
            graded = [next(statuses) for _ in output.completions]
            n_correct = sum(g == CORRECT for g in graded)
            n = len(graded)
            state.prefixes += 1
            state.generated_tokens += sum(len(c.token_ids) for c in output.completions)
            state.labels.append(
                StepLabel(
                    n_correct=n_correct,
                    n=n,
                    soft=n_correct / n,
                    hard=int(n_correct >= 1),
                    rolled_out=True,
                    timeouts=sum(g == TIMEOUT for g in graded),
                )
            )

    def lane(self, queue: Iterator[GradeRecord], heads: dict[str, str]) -> Task:
        """A continuous-batching labeller as a `dispatch` task: up to `batch_responses` responses in
        flight, refilled from `queue` (which several lanes may share) as responses finish; yields
        MC records (skipped ones included) in completion order. `heads` caches the rendered policy
        prompt per problem text (responses share it)."""
        s = self.settings
        active: list[_InFlight] = []
        exhausted = False
        while True:
            while not exhausted and len(active) < s.batch_responses:
                record = next(queue, None)
                if record is None:
                    exhausted = True
                    break
                head = heads.get(record.problem)
                if head is None:
                    if len(heads) > 4096:
                        heads.clear()
                    head = heads[record.problem] = policy_prompt(
                        self.backend.tokenizer, record.problem, s.system_prompt
                    )
                reason = self._skip_reason(record, head)
                if reason is not None:
                    yield self._skipped(record, reason)
                    continue
                state = _InFlight(record, head)
                done = self._finished(state)
                if done is not None:
                    yield done
                else:
                    active.append(state)
            if not active:
                return
            yield from self._wave(active)
            still = []
            for state in active:
                done = self._finished(state)
                if done is None:
                    still.append(state)
                else:
                    yield done
            active = still

    def label(self, records: Iterable[GradeRecord]) -> Iterator[MCRecord]:
        """MC records for `records` (skipped ones included), in completion order: one lane on an
        in-process backend, `dispatch.lanes` lanes sharing the queue on a concurrent one."""
        queue = iter(records)
        heads: dict[str, str] = {}
        tasks = [self.lane(queue, heads) for _ in range(lanes(self.backend))]
        return drive(self.backend, tasks, ordered=False)


def run_mc(ctx: StageContext) -> None:
    def start() -> Callable[[Iterator[GradeRecord]], Iterator[MCRecord]]:
        return MCLabeler(ctx.policy_backend(), ctx.grading_pool(), MCSettings.from_config(ctx.config)).label

    ctx.per_graded_response("mc", MCRecord.from_json, start, verb="label")
