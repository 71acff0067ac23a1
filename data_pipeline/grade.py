"""Stage 2, grade: each response's final answer against the gold, with math-verify.

Output: one `GradeRecord` per response (`W/grade/<shard>.jsonl`) carrying the problem,
gold, steps and grade, which is everything the MC, judge and consensus stages read, so they
depend on one upstream file. Grading runs in the `data_pipeline.grading.GradingPool`
(hard per-item timeout); a timeout is graded `"timeout"` (incorrect, counted).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from data_pipeline.context import StageContext
from data_pipeline.grading import GradingPool
from data_pipeline.ids import response_id
from data_pipeline.schemas import GradeRecord, SampleRecord
from prm_jax.jsonl import AppendOnlyWriter, iter_records

_log = logging.getLogger(__name__)

#: Responses graded per pool call: large enough to keep every worker busy.
_BATCH = 512


def grade_samples(
    samples: Iterable[SampleRecord], grader: GradingPool, *, skip: set[str] | frozenset[str] = frozenset()
) -> list[GradeRecord]:
    """Grade records for every response of `samples` whose id is not in `skip`."""
    todo = [
        (sample, response)
        for sample in samples
        for response in sample.responses
        if response_id(sample.id, response.index) not in skip
    ]
    pairs = [(sample.gold, response.answer) for sample, response in todo if response.steps]
    statuses = iter(grader.grade_many(pairs))
    records = []
    for sample, response in todo:
        status = next(statuses) if response.steps else "empty"
        records.append(
            GradeRecord(
                id=response_id(sample.id, response.index),
                problem_id=sample.id,
                index=response.index,
                problem=sample.problem,
                gold=sample.gold,
                steps=response.steps,
                answer=response.answer,
                finish_reason=response.finish_reason,
                num_tokens=response.num_tokens,
                status=status,
                correct=status == "correct",
            )
        )
    return records


def run_grade(ctx: StageContext) -> None:
    samples_path = ctx.layout.records("sample", ctx.shard)

    def grade_all(writer: AppendOnlyWriter) -> None:
        total = sum(len(s.responses) for _, s in iter_records(samples_path, SampleRecord.from_json))
        with ctx.progress(total, "grade", "response") as bar:
            bar.update(len(writer.ids))
            batch: list[SampleRecord] = []
            size = 0

            def flush() -> None:
                for record in grade_samples(batch, ctx.grading_pool(), skip=writer.ids):
                    writer.write(record)
                bar.update(size)

            for _, sample in iter_records(samples_path, SampleRecord.from_json):
                pending = sum(response_id(sample.id, r.index) not in writer.ids for r in sample.responses)
                if not pending:
                    continue
                batch.append(sample)
                size += pending
                if size >= _BATCH:
                    flush()
                    batch, size = [], 0
            if batch:
                flush()

    ctx.append_stage("grade", GradeRecord.from_json, grade_all, after="sample")
