"""Stage 5, consensus: keep responses whose MC and judge first errors agree; training records; summary.

A response is kept (`consensus.mode = "agree"`, the paper's filter) when its MC first error
equals the judge's (both -1 counts as agreement). Its training record is
`{id, problem, steps, labels}` (the `prm_jax.data.records` PRM format) ending at the first
error: all steps when it is -1, else `steps[: first_error + 1]` whose last label is 0. Labels
are the MC hard labels (default; the paper's final recipe) or the soft ones
(`label_type = "soft"`: `n_correct / k` as JSON floats). Extra keys (`problem_id`,
`first_error`, `final_answer_correct`, `label_source`) ride along; readers ignore them.
Ablations: `mode = "mc"` keeps every MC-labelled response, `mode = "judge"` labels with the
judge alone (1 before its first error, 0 at it), and `mc_threshold` re-thresholds the hard MC labels
(`n_correct / k > mc_threshold`; the MC first error moves with it, in "agree" mode too).

Every response is accounted for: kept, or dropped with a reason (MC skipped and why, judge
skipped, no verdict, disagreement), and the counts of every stage go into the summary, computed
from the stage files themselves so that resumed and multi-node runs count exactly once.

Per shard: `W/consensus/shards/<shard>.jsonl` (sorted by id) and `<shard>.counts.json`.
Merge (`--stage=merge`, or the end of `--stage=all` once every shard has its counts):
`W/consensus/prm_train.jsonl` (all shards, sorted by id, validated with
`read_prm_records` before it is renamed into place) and `W/summary.json`. Both are pure
functions of the stage files, rewritten in full on every run, so rerunning them is harmless.
"""

from __future__ import annotations

import collections
import heapq
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_pipeline.context import StageContext, SynthesisError
from data_pipeline.schemas import ErrorRecord, GradeRecord, JudgeRecord, MCRecord, SampleRecord
from data_pipeline.shards import Layout, Shard, read_json, read_records_if_exists
from prm_jax.data.records import PRMRecord, read_prm_records
from prm_jax.files import atomic_write_json, atomic_write_lines
from prm_jax.jsonl import iter_objects, iter_records

_log = logging.getLogger(__name__)

#: Buckets of the MC-vs-judge agreement matrix (first-error index; "none" = no judge verdict).
_MAX_BUCKET = 10


def _bucket(first_error: int | None) -> str:
    if first_error is None:
        return "none"
    return str(first_error) if first_error < _MAX_BUCKET else f"{_MAX_BUCKET}+"


def mc_hard_labels(mc: MCRecord, threshold: float = 0.0) -> list[int]:
    """The hard labels of a labelled MC record at `threshold`: a rolled-out step is 1 when
    `n_correct / n > threshold` (0: any completion correct, the label the MC stage stored); the last
    step, not rolled out, keeps its grade."""
    if threshold == 0:
        return [x.hard for x in mc.labels]
    return [int(x.n_correct > threshold * x.n) if x.rolled_out else x.hard for x in mc.labels]


def mc_first_error(mc: MCRecord, threshold: float = 0.0) -> int | None:
    """The first step whose hard label at `threshold` is 0, or -1 (None for a skipped record).

    A higher threshold only moves the first error earlier, so an early-stopped record (labelled up to
    its first step with no correct completion) has every label this needs.
    """
    if mc.status != "labelled":
        return None
    if threshold == 0:
        return mc.first_error
    return next((i for i, hard in enumerate(mc_hard_labels(mc, threshold)) if hard == 0), -1)


def decide(
    mc: MCRecord | None, judge: JudgeRecord | None, mode: str, mc_threshold: float = 0.0
) -> tuple[int | None, str]:
    """`(first_error, "kept")` for a kept response, else `(None, drop reason)`."""
    if mode != "judge":
        if mc is None:
            return None, "mc_missing"
        if mc.status == "skipped":
            return None, f"mc_skipped:{mc.skip_reason}"
        mc_first = mc_first_error(mc, mc_threshold)
        if mode == "mc":
            return mc_first, "kept"
    if judge is None:
        return None, "judge_missing"
    if judge.status == "skipped":
        return None, f"judge_skipped:{judge.skip_reason}"
    if judge.first_error is None:
        return None, f"no_verdict:{judge.no_verdict_reason}"
    if mode == "judge":
        return judge.first_error, "kept"
    if mc_first != judge.first_error:
        return None, "disagree"
    return mc_first, "kept"


def training_record(
    grade: GradeRecord, mc: MCRecord | None, first_error: int, *, mode: str, label_type: str, mc_threshold: float = 0.0
) -> dict[str, Any]:
    """The PRM training record of a kept response, ending at its first error."""
    length = len(grade.steps) if first_error == -1 else first_error + 1
    if mode == "judge":
        labels: list[int | float] = [1] * length
        if first_error != -1:
            labels[-1] = 0
    else:
        chosen = mc.labels[:length]
        if len(chosen) != length:
            raise ValueError(f"{grade.id}: {len(chosen)} MC labels for {length} steps")
        labels = mc_hard_labels(mc, mc_threshold)[:length] if label_type == "hard" else [float(x.soft) for x in chosen]
    record = {
        "id": grade.id,
        "problem": grade.problem,
        "steps": list(grade.steps[:length]),
        "labels": labels,
        "problem_id": grade.problem_id,
        "first_error": first_error,
        "final_answer_correct": grade.correct,
        "label_source": mode,
    }
    PRMRecord(id=record["id"], problem=record["problem"], steps=record["steps"], labels=labels)  # validate
    return record


# ---------------------------------------------------------------------------- counting


def _nested() -> collections.defaultdict:
    return collections.defaultdict(int)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in sorted(value.items())}
    return value


def shard_consensus(
    layout: Layout, shard: Shard, mode: str, label_type: str, mc_threshold: float = 0.0
) -> tuple[list[dict], dict]:
    """This shard's kept training records (sorted by id) and its counts (ints only, summable)."""
    sample_errors = read_records_if_exists(layout.errors("sample", shard), ErrorRecord.from_json)
    mcs = {r.id: r for _, r in iter_records(layout.records("mc", shard), MCRecord.from_json)} if mode != "judge" else {}
    judge_path = layout.records("judge", shard)
    judges = {r.id: r for _, r in iter_records(judge_path, JudgeRecord.from_json)} if judge_path.exists() else {}

    c: dict[str, Any] = {
        "input": {"errors": _nested()},
        "sample": {
            "problems": 0,
            "responses": 0,
            "empty_responses": 0,
            "truncated_responses": 0,
            "steps": 0,
            "errors": _nested(),
        },
        "grade": {"responses": 0, "status": _nested()},
        "mc": {
            "responses": len(mcs),
            "labelled": 0,
            "skipped": _nested(),
            "early_stopped": 0,
            "steps_labelled": 0,
            "prefixes_run": 0,
            "prefixes_full": 0,
            "completions_run": 0,
            "completions_full": 0,
            "generated_tokens": 0,
            "grading_timeouts": 0,
            "labels": {"positive": 0, "negative": 0},
        },
        "judge": {
            "responses": len(judges),
            "judged": 0,
            "skipped": _nested(),
            "verdicts": 0,
            "no_verdict": _nested(),
            "samples": 0,
            "sample_reasons": _nested(),
        },
        "consensus": {
            "candidates": 0,
            "kept": 0,
            "dropped": _nested(),
            "agreement": collections.defaultdict(_nested),
            "labels": {"steps": 0, "positive": 0, "negative": 0, "records_all_correct": 0, "records_with_error": 0},
        },
    }
    for error in sample_errors:
        bucket = c["input"]["errors"] if error.stage == "input" else c["sample"]["errors"]
        bucket[error.error] += 1
    for _, sample in iter_records(layout.records("sample", shard), SampleRecord.from_json):
        c["sample"]["problems"] += 1
        for response in sample.responses:
            c["sample"]["responses"] += 1
            c["sample"]["empty_responses"] += not response.steps
            c["sample"]["truncated_responses"] += response.finish_reason == "length"
            c["sample"]["steps"] += len(response.steps)
    m = c["mc"]
    for mc in mcs.values():
        m["prefixes_full"] += mc.cost.prefixes_full
        m["completions_full"] += mc.cost.completions_full
        if mc.status == "skipped":
            m["skipped"][mc.skip_reason] += 1
            continue
        m["labelled"] += 1
        m["early_stopped"] += mc.early_stopped
        m["steps_labelled"] += len(mc.labels)
        m["prefixes_run"] += mc.cost.prefixes
        m["completions_run"] += mc.cost.completions
        m["generated_tokens"] += mc.cost.generated_tokens
        m["grading_timeouts"] += sum(x.timeouts for x in mc.labels)
        m["labels"]["positive"] += sum(x.hard for x in mc.labels)
        m["labels"]["negative"] += sum(1 - x.hard for x in mc.labels)
    j = c["judge"]
    for judge in judges.values():
        if judge.status == "skipped":
            j["skipped"][judge.skip_reason] += 1
            continue
        j["judged"] += 1
        j["samples"] += len(judge.verdicts)
        for reason in judge.reasons:
            j["sample_reasons"][reason] += 1
        if judge.first_error is None:
            j["no_verdict"][judge.no_verdict_reason] += 1
        else:
            j["verdicts"] += 1

    kept = []
    k = c["consensus"]
    for _, grade in iter_records(layout.records("grade", shard), GradeRecord.from_json):
        c["grade"]["responses"] += 1
        c["grade"]["status"][grade.status] += 1
        k["candidates"] += 1
        mc, judge = mcs.get(grade.id), judges.get(grade.id)
        if mc is not None and mc.status == "labelled" and judge is not None and judge.status == "judged":
            k["agreement"][_bucket(mc_first_error(mc, mc_threshold))][_bucket(judge.first_error)] += 1
        first_error, outcome = decide(mc, judge, mode, mc_threshold)
        if first_error is None:
            k["dropped"][outcome] += 1
            continue
        record = training_record(grade, mc, first_error, mode=mode, label_type=label_type, mc_threshold=mc_threshold)
        kept.append(record)
        k["kept"] += 1
        labels = k["labels"]
        labels["steps"] += len(record["labels"])
        hard = record["labels"] if mode == "judge" else mc_hard_labels(mc, mc_threshold)[: len(record["labels"])]
        labels["positive"] += sum(hard)
        labels["negative"] += len(hard) - sum(hard)
        labels["records_with_error" if first_error != -1 else "records_all_correct"] += 1
    kept.sort(key=lambda r: r["id"])
    return kept, _plain(c)


def run_consensus(ctx: StageContext) -> None:
    layout, shard, cfg = ctx.layout, ctx.shard, ctx.config
    mode = cfg.consensus.mode
    needed = ["sample", "grade"] + (["mc"] if mode != "judge" else []) + (["judge"] if mode != "mc" else [])
    for stage in needed:
        ctx.require_done(stage)
    threshold = float(cfg.consensus.mc_threshold)
    kept, counts = shard_consensus(layout, shard, mode, cfg.consensus.label_type, threshold)
    atomic_write_lines(layout.records("consensus", shard), (_line(r) for r in kept))
    atomic_write_json(
        layout.done("consensus", shard),
        {
            "shard": shard.index,
            "num_shards": shard.count,
            "mode": mode,
            "label_type": cfg.consensus.label_type,
            "mc_threshold": threshold,
            "counts": counts,
        },
    )
    _log.info(
        "consensus: %s: kept %d of %d responses",
        shard.name,
        counts["consensus"]["kept"],
        counts["consensus"]["candidates"],
    )


# ---------------------------------------------------------------------------- merge and summary


def _add(total: dict, part: dict) -> dict:
    for key, value in part.items():
        if isinstance(value, dict):
            _add(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value
    return total


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 6) if b else None


def summarize(counts: dict, *, num_shards: int, mode: str, label_type: str, mc_threshold: float = 0.0) -> dict:
    """Counts of all shards plus the derived figures (rates, savings, balance, agreement)."""
    m, k, g = counts["mc"], counts["consensus"], counts["grade"]["status"]
    agreement = k["agreement"]
    with_verdict = sum(n for row in agreement.values() for col, n in row.items() if col != "none")
    agreeing = sum(row.get(key, 0) for key, row in agreement.items())
    tokens_per_completion = _ratio(m["generated_tokens"], m["completions_run"])
    derived = {
        "grading": {
            "timeouts": g.get("timeout", 0) + m["grading_timeouts"],
            "response_timeouts": g.get("timeout", 0),
            "mc_completion_timeouts": m["grading_timeouts"],
            "failures": g.get("error", 0),
            "bad_gold": g.get("bad_gold", 0),
            "accuracy": _ratio(g.get("correct", 0), counts["grade"]["responses"]),
        },
        "mc_compute": {
            "prefixes_run": m["prefixes_run"],
            "prefixes_full": m["prefixes_full"],
            "completions_run": m["completions_run"],
            "completions_full": m["completions_full"],
            "generated_tokens_run": m["generated_tokens"],
            "generated_tokens_full_estimate": (
                round(tokens_per_completion * m["completions_full"]) if tokens_per_completion is not None else None
            ),
            "prefix_savings": _ratio(m["prefixes_full"] - m["prefixes_run"], m["prefixes_full"]),
            "completions_per_labelled_response": _ratio(m["completions_run"], m["labelled"]),
            "generated_tokens_per_labelled_response": _ratio(m["generated_tokens"], m["labelled"]),
        },
        "keep_rate": _ratio(k["kept"], k["candidates"]),
        "label_balance": {
            **k["labels"],
            "positive_rate": _ratio(k["labels"]["positive"], k["labels"]["steps"]),
            "mc_positive_rate_before_filter": _ratio(
                m["labels"]["positive"], m["labels"]["positive"] + m["labels"]["negative"]
            ),
        },
        "mc_judge_agreement": {
            "rate": _ratio(agreeing, with_verdict),
            "both_labelled_with_verdict": with_verdict,
            "matrix_rows_mc_cols_judge": agreement,
        },
        "errors": {
            "input": counts["input"]["errors"],
            "sample": counts["sample"]["errors"],
            "total": sum(counts["input"]["errors"].values()) + sum(counts["sample"]["errors"].values()),
        },
    }
    return {
        "num_shards": num_shards,
        "consensus_mode": mode,
        "label_type": label_type,
        "mc_threshold": mc_threshold,
        **derived,
        "counts": counts,
    }


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, sort_keys=True)


def _merged_lines(paths: list[Path]) -> Iterator[str]:
    def keyed(path: Path) -> Iterator[tuple[str, str]]:
        for _, record in iter_objects(path):  # written by `_line`, so re-serializing gives the same line
            yield record["id"], _line(record)

    previous = None
    for record_id, line in heapq.merge(*(keyed(p) for p in paths)):
        if record_id == previous:
            raise SynthesisError(
                f"id {record_id!r} appears in two shards: were shards run with different --num_shards in one workdir?"
            )
        previous = record_id
        yield line


def run_merge(layout: Layout, num_shards: int) -> Path:
    """Merge every shard's consensus records and counts; needs all `num_shards` shards done."""
    shards = [Shard(i, num_shards) for i in range(num_shards)]
    missing = [s.name for s in shards if not layout.done("consensus", s).exists()]
    if missing:
        raise SynthesisError(f"merge needs every shard's consensus; missing: {', '.join(missing)}")
    markers = [read_json(layout.done("consensus", s)) for s in shards]
    # Markers written before mc_threshold existed used 0 (any completion correct).
    settings = {(m["mode"], m["label_type"], m.get("mc_threshold", 0.0)) for m in markers}
    if len(settings) != 1:
        raise SynthesisError(
            f"shards were filtered with different consensus settings {sorted(settings)}; "
            "rerun --stage=consensus on every shard with one setting"
        )
    mode, label_type, mc_threshold = settings.pop()

    def validate(path: Path) -> None:
        for _ in read_prm_records(path):  # schema and unique ids, with file:line on failure
            pass

    count = atomic_write_lines(
        layout.final_records, _merged_lines([layout.records("consensus", s) for s in shards]), validate=validate
    )
    total: dict = {}
    for marker in markers:
        _add(total, marker["counts"])
    summary = summarize(total, num_shards=num_shards, mode=mode, label_type=label_type, mc_threshold=mc_threshold)
    atomic_write_json(layout.summary, summary)
    _log.info(
        "merge: %d training records in %s (keep rate %s); summary in %s",
        count,
        layout.final_records,
        summary["keep_rate"],
        layout.summary,
    )
    return layout.final_records
