"""Stage 4, judge: an LLM names each response's earliest wrong step.

The judge (any backend; paper: Qwen2.5-72B-Instruct) reads one of the critique prompts of
`prm_jax.critique` as the user turn of its chat template (`judge.prompt`):

* `processbench`: steps wrapped as `<paragraph_i>`, indexed from 0, the answer an index in
  `\\boxed{}`; the last box is the verdict (several boxes: the last wins, as ProcessBench
  parses). A sample without a box, with a non-integer box or with an index outside
  `[-1, num_steps)` gives no verdict.
* `paper`: the paper's judge prompt (App. C): 1-based `<paragraph_k>`, an analysis and a
  Correct/Incorrect conclusion per paragraph; the earliest Incorrect paragraph is the first
  error, all Correct is -1; missing, conflicting or out-of-range conclusions give no verdict.

The parser belongs to the prompt (`prm_jax.critique.classify_verdict`); the reason for a
missing verdict is recorded per sample and counted in the summary.

Several samples (`judge.num_samples > 1`, sampled at `judge.temperature > 0` as one `n` request)
give one verdict by `prm_jax.critique.critic_vote`, the vote ProcessBench evaluation uses too: a
plurality of the parsed verdicts, ties to the first sampled. Without any parsed verdict the
record's reason is the most common failure among its samples.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import ml_collections

from data_pipeline.backends import context_length, prompt_lengths
from data_pipeline.config import default_config, section_values
from data_pipeline.context import StageContext
from data_pipeline.dispatch import Generation, Task, drive
from data_pipeline.ids import stable_seed
from data_pipeline.schemas import GradeRecord, JudgeRecord
from prm_jax.critique import PROMPTS, classify_verdict, critic_vote, critique_messages
from prm_jax.generation.types import GenerationBackend, SamplingParams

_log = logging.getLogger(__name__)


def judge_verdict(verdicts: Sequence[int | None], reasons: Sequence[str]) -> tuple[int | None, str | None]:
    """`(first_error, None)` by `critic_vote`, or `(None, why)`: the most common failure reason."""
    first_error = critic_vote(verdicts)
    if first_error is not None:
        return first_error, None
    return None, collections.Counter(reasons).most_common(1)[0][0] if reasons else "no_box"


@dataclasses.dataclass(frozen=True)
class JudgeSettings:
    """The `judge` section of the synthesis config; its defaults are stated there only."""

    num_samples: int
    temperature: float
    top_p: float
    max_tokens: int
    batch_size: int
    keep_text: bool
    prompt: str  # prm_jax.critique.PROMPTS
    base_seed: int

    def __post_init__(self) -> None:
        if self.prompt not in PROMPTS:
            raise ValueError(f"judge.prompt={self.prompt!r}; choose one of {list(PROMPTS)}")

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict | None = None, **overrides: Any) -> JudgeSettings:
        """From a synthesis config (`default_config()` when None), then `overrides`."""
        config = default_config() if config is None else config
        return dataclasses.replace(cls(**section_values(cls, config.judge), base_seed=config.seed), **overrides)


class Judge:
    def __init__(self, backend: GenerationBackend, settings: JudgeSettings) -> None:
        self.backend = backend
        self.settings = settings
        self.context_length = context_length(backend)

    def _skipped(self, record: GradeRecord, reason: str) -> JudgeRecord:
        return JudgeRecord(
            id=record.id,
            problem_id=record.problem_id,
            status="skipped",
            skip_reason=reason,
            num_steps=len(record.steps),
            verdicts=(),
            reasons=(),
            first_error=None,
            no_verdict_reason=None,
        )

    def judge_batch(self, records: Sequence[GradeRecord]) -> list[JudgeRecord]:
        """The records of one batch (one generate call on this judge's backend)."""
        return list(drive(self.backend, [self.batch_task(records)], ordered=True))

    def batch_task(self, records: Sequence[GradeRecord]) -> Task:
        """One batch as a `dispatch` task: one generate call, then the batch's records in input order."""
        s = self.settings
        out: dict[str, JudgeRecord] = {}
        todo, prompts = [], []
        for record in records:
            if not record.steps:
                out[record.id] = self._skipped(record, "no_steps")
                continue
            todo.append(record)
            # Messages: each backend renders them (`render_prompt`), or a chat server applies its template.
            prompts.append(critique_messages(record.problem, record.steps, s.prompt))
        if self.context_length is not None and todo:
            lengths = prompt_lengths(self.backend, prompts)
            fits = [length < self.context_length for length in lengths]
            for record, ok in zip(todo, fits):
                if not ok:
                    out[record.id] = self._skipped(record, "prompt_too_long")
            todo = [r for r, ok in zip(todo, fits) if ok]
            prompts = [p for p, ok in zip(prompts, fits) if ok]
        params = [
            SamplingParams(
                n=s.num_samples,
                temperature=s.temperature,
                top_p=s.top_p,
                max_tokens=s.max_tokens,
                seed=stable_seed(s.base_seed, "judge", r.id),
            )
            for r in todo
        ]
        outputs = (yield Generation(prompts, params, tuple(r.id for r in todo))) if todo else []
        for record, output in zip(todo, outputs):
            texts = [c.text for c in output.completions]
            parsed = [classify_verdict(t, len(record.steps), prompt=s.prompt) for t in texts]
            verdicts = tuple(v for v, _ in parsed)
            reasons = tuple(r for _, r in parsed)
            first_error, why = judge_verdict(verdicts, reasons)
            out[record.id] = JudgeRecord(
                id=record.id,
                problem_id=record.problem_id,
                status="judged",
                skip_reason=None,
                num_steps=len(record.steps),
                verdicts=verdicts,
                reasons=reasons,
                first_error=first_error,
                no_verdict_reason=why,
                texts=tuple(texts) if s.keep_text else None,
            )
        for r in records:
            yield out[r.id]

    def judge(self, records: Iterable[GradeRecord]) -> Iterator[JudgeRecord]:
        """Records for `records` in input order, `batch_size` per generate call (several calls at
        once on a concurrent backend)."""
        return drive(
            self.backend, (self.batch_task(b) for b in _batches(records, self.settings.batch_size)), ordered=True
        )


def _batches(records: Iterable[GradeRecord], size: int) -> Iterator[list[GradeRecord]]:
    batch: list[GradeRecord] = []
    for record in records:
        batch.append(record)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_judge(ctx: StageContext) -> None:
    def start() -> Callable[[Iterator[GradeRecord]], Iterator[JudgeRecord]]:
        return Judge(ctx.judge_backend(), JudgeSettings.from_config(ctx.config)).judge

    ctx.per_graded_response("judge", JudgeRecord.from_json, start, verb="judge")
