"""What every stage runner gets: the config, the workdir layout, its shard, and lazily built tools.

Backends and the grading pool are expensive (a model load, worker processes), so they are built
on first use and shared by the stages of one invocation; tests and benchmarks inject their own
(a scripted backend, an in-process grader) through the constructor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections

from data_pipeline.config import MODEL_FIELDS
from data_pipeline.grading import GradingPool
from data_pipeline.schemas import ErrorRecord, GradeRecord
from data_pipeline.shards import Layout, Shard, exclusive_lock, read_json
from prm_jax.files import atomic_write_json
from prm_jax.generation.types import GenerationBackend
from prm_jax.jsonl import AppendOnlyWriter, iter_records

_log = logging.getLogger("data_pipeline")


class SynthesisError(RuntimeError):
    """A condition that stops the run cleanly with a message (bad input under on_error="stop",
    a stage run before its inputs exist, a workdir started with other settings)."""


@dataclasses.dataclass
class StageContext:
    """What the stages share: the config, the workdir layout, this shard, and the models and grading
    pool, built on first use. Backends and a pool passed in are the caller's; the ones built here
    are stopped by `close` (a vLLM engine holds its GPUs until then)."""

    config: ml_collections.ConfigDict
    layout: Layout
    shard: Shard
    policy: GenerationBackend | None = None
    judge: GenerationBackend | None = None
    grader: GradingPool | None = None
    # Builds a backend from a model section (`data_pipeline.backends.build_backend` when None; the
    # Ray runner builds a pool of engines on Ray workers from the same section).
    build: Callable[[Any, int], GenerationBackend] | None = None
    _built: list[Any] = dataclasses.field(default_factory=list, repr=False)

    def _build(self, section: Any) -> GenerationBackend:
        if self.build is not None:
            return self.build(section, self.config.seed)
        from data_pipeline.backends import build_backend

        return build_backend(section, seed=self.config.seed)

    def policy_backend(self) -> GenerationBackend:
        if self.policy is None:
            self.policy = self._build(self.config.policy)
            self._built.append(self.policy)
        return self.policy

    def judge_backend(self) -> GenerationBackend:
        if self.judge is None:
            judge_cfg = self.config.judge
            same = not judge_cfg.model_path or _same_model(judge_cfg, self.config.policy)
            if same:
                self.judge = self.policy_backend()
            else:
                # The judge stage comes after the policy's stages: free the policy's engine (and its
                # GPUs) before a second one starts.
                if self.policy is not None and self.policy in self._built:
                    self._release(self.policy)
                    self.policy = None
                self.judge = self._build(judge_cfg)
                self._built.append(self.judge)
        return self.judge

    def grading_pool(self) -> GradingPool:
        if self.grader is None:
            g = self.config.grading
            self.grader = GradingPool(**g)
            self._built.append(self.grader)
        return self.grader

    def close(self) -> None:
        """Stop every backend and pool this context built (not the ones passed in)."""
        while self._built:
            self._release(self._built[-1])

    def _release(self, thing: Any) -> None:
        self._built.remove(thing)
        close = getattr(thing, "close", None)
        if close is not None:
            close()

    # ------------------------------------------------------------------ helpers

    def error(self, writer: Any, record: ErrorRecord) -> None:
        """Record an error, or stop the run with it under `on_error="stop"`."""
        if self.config.on_error == "stop":
            where = f"{record.source}: " if record.source else ""
            raise SynthesisError(
                f"{where}{record.error}: {record.message} (stage {record.stage}; set "
                "--config.on_error=record to write error records and continue)"
            )
        writer.write(record)

    def require_done(self, stage: str) -> dict[str, Any]:
        marker = self.layout.done(stage, self.shard)
        if not marker.exists():
            raise SynthesisError(
                f"stage {stage!r} has not finished shard {self.shard.name} (no {marker}); "
                f"run --stage={stage} for this shard first"
            )
        return read_json(marker)

    def is_done(self, stage: str) -> bool:
        return self.layout.done(stage, self.shard).exists()

    def append_stage(
        self,
        stage: str,
        parse: Callable[[dict], Any],
        body: Callable[..., None],
        *,
        after: str | None = None,
        with_errors: bool = False,
    ) -> None:
        """Runs a stage that appends records to its shard file, the way every such stage runs.

        Skipped when its done marker exists; refused until `after` is done; run under the shard's
        lock with crash-safe append writers (`body(writer)`, or `body(writer, errors)` with
        `with_errors`), where `body` writes only the records the writer lacks. The done marker
        (record and error counts) is written last, so a killed stage resumes where it stopped.
        """
        if self.is_done(stage):
            _log.info("%s: %s already done", stage, self.shard.name)
            return
        if after is not None:
            self.require_done(after)
        fsync_every = self.config.io.fsync_every
        with contextlib.ExitStack() as stack:
            stack.enter_context(exclusive_lock(self.layout.lock(stage, self.shard)))
            counts = {}
            if with_errors:
                path = self.layout.errors(stage, self.shard)
                errors = stack.enter_context(AppendOnlyWriter(path, ErrorRecord.from_json, fsync_every=fsync_every))
            path = self.layout.records(stage, self.shard)
            writer = stack.enter_context(AppendOnlyWriter(path, parse, fsync_every=fsync_every))
            before = len(writer.ids)
            self._generation_reports()  # start this stage's window
            if with_errors:
                body(writer, errors)
                counts["errors"] = len(errors.ids)
            else:
                body(writer)
            counts = {"records": len(writer.ids), **counts}
            self._record_generation_report(stage, len(writer.ids) - before)
        atomic_write_json(self.layout.done(stage, self.shard), counts)

    def _generation_reports(self) -> list[dict[str, Any]]:
        """What the concurrent backends in use did since they were last asked (workers, batches,
        retries, busy time); in-process backends report nothing."""
        reports = []
        for backend in dict.fromkeys(b for b in (self.policy, self.judge) if b is not None):
            take = getattr(backend, "take_report", None)
            if take is not None:
                report = take()
                if report.get("batches"):
                    reports.append(report)
        return reports

    def _record_generation_report(self, stage: str, records: int) -> None:
        """Add this stage's worker and timing figures to `W/ray_summary.json` (never to records)."""
        reports = self._generation_reports()
        if not reports:
            return
        path = self.layout.ray_summary
        # Shards of one workdir (--num_shards with --runner=ray) update the file in turn, not over each other.
        with exclusive_lock(path.with_name(path.name + ".lock"), wait=True):
            summary = read_json(path) if path.exists() else {}
            self._add_reports(summary, stage, records, reports)
            atomic_write_json(path, summary)

    def _add_reports(self, summary: dict, stage: str, records: int, reports: list[dict[str, Any]]) -> None:
        path = self.layout.ray_summary
        for report in reports:  # one: a stage generates with one model
            wall = report.get("wall_s") or 0.0
            rate = round(records / wall, 3) if wall else None
            key = stage if self.shard.count == 1 else f"{stage}/{self.shard.name}"
            if len(reports) > 1:
                key += f"/{report.get('model')}"
            summary[key] = {"shard": self.shard.name, "records": records, "records_per_s": rate, **report}
            _log.info(
                "%s: %d records in %.1f s on %d workers (%s records/s, %d batches, %d retried, %d worker "
                "failures); details in %s",
                stage,
                records,
                wall,
                len(report.get("workers", [])),
                rate,
                report.get("batches", 0),
                report.get("retries", 0),
                report.get("worker_failures", 0),
                path,
            )

    def per_graded_response(
        self,
        stage: str,
        parse: Callable[[dict], Any],
        start: Callable[[], Callable[[Iterator[Any]], Iterator[Any]]],
        *,
        verb: str,
    ) -> None:
        """A stage that turns each graded response into one record (mc, judge) via `append_stage`.

        `start()` builds the worker (it loads a backend, so only when a response is pending) and
        returns its function from graded responses to records, in order.
        """
        grades = self.layout.records("grade", self.shard)

        def body(writer: AppendOnlyWriter) -> None:
            pending = sum(r.id not in writer.ids for _, r in iter_records(grades, GradeRecord.from_json))
            _log.info(
                "%s: %s: %d responses to %s (%d already done)", stage, self.shard.name, pending, verb, len(writer.ids)
            )
            if pending:
                process = start()
                todo = (r for _, r in iter_records(grades, GradeRecord.from_json) if r.id not in writer.ids)
                with self.progress(pending, stage, "response") as bar:
                    for record in process(todo):
                        writer.write(record)
                        bar.update(1)

        self.append_stage(stage, parse, body, after="grade")

    @contextlib.contextmanager
    def progress(self, total: int, desc: str, unit: str) -> Iterator[Any]:
        """A tqdm bar with rate and ETA (disabled by io.progress=False)."""
        from tqdm import tqdm

        bar = tqdm(
            total=total,
            desc=f"{desc} [{self.shard.name}]",
            unit=unit,
            dynamic_ncols=True,
            disable=not self.config.io.progress,
            file=sys.stderr,
            mininterval=1.0,
        )
        try:
            yield bar
        finally:
            bar.close()


def _same_model(a: Any, b: Any) -> bool:
    """Whether two model sections describe one backend (same model, server and engine settings),
    which then serves both: two engines of one model would double its memory for nothing."""

    def plain(value: Any) -> Any:
        return value.to_dict() if hasattr(value, "to_dict") else value

    return all(plain(a[name]) == plain(b[name]) for name in MODEL_FIELDS)
