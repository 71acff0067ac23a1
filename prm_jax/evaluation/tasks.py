"""The evaluation tasks end to end: records in, results and per-record predictions out.

Each task streams its records once, keeps only what scoring needs (ids, labels, rewards; never the
text once it is tokenized) and returns an `EvaluationOutput`, which `write_outputs`
turns into `results.json`, `results.md`, `predictions.jsonl` and plots. The scorer is any
`prm_jax.evaluation.scorer.StepScorer` (the JAX `BatchedScorer`, or vLLM's STEP
pooling scorer) and the critic any `prm_jax.generation.GenerationBackend`, so the same
task code runs on CPU, TPU and GPU.

results.json layouts (accuracies are fractions; undefined values are `null`):

* ProcessBench: `{"task": "processbench", "mode": "prm" | "critic" | "predictions",
  "threshold": float | null, "subsets": {name: {"f1", "acc_err", "acc_ok", "n_err", "n_ok",
  "n_unparseable"}}, "average_f1": float, "threshold_sweep"?: {"tuned_on", "threshold",
  "subsets", "average_f1"}, "analyses": {"min_position"?, "flawed_process", "calibration"?},
  "scoring"?: {...throughput...}, "critic"?: {...sampling...}, "over_length"?: {"max_length",
  "policy", "n_inputs", "n_skipped", "longest", "by_group"}}`
* Best-of-N: `{"task": "bon", "aggregations": [...], "datasets": {name: {"n_problems",
  "n_responses", "n", "prm_at_n": {aggregation: acc}, "maj_at_n", "pass_at_n",
  "n_inconsistent_votes"}}, "average": {same keys, unweighted over datasets}, "by_k"?: {k:
  average}, "analyses": {"min_position"}, "over_length": {...as above...}, "scoring"?: {...}}`
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from prm_jax.critique import critic_vote, critique_messages, parse_first_error
from prm_jax.evaluation import report
from prm_jax.evaluation.analyses import calibration, flawed_process_detection, labelled_steps, min_position_stats
from prm_jax.evaluation.best_of_n import AGGREGATIONS, bon_scores, response_answer, score_problem
from prm_jax.evaluation.processbench import (
    DEFAULT_THRESHOLD,
    f1_curves,
    predict_first_error,
    processbench_scores,
    sweep_threshold,
)
from prm_jax.evaluation.records import BoNRecord, EvaluationDataError, ProcessBenchRecord, read_predictions
from prm_jax.evaluation.scorer import SCORE_WINDOW, BatchedScorer, StepScorer, score_stream
from prm_jax.files import atomic_write
from prm_jax.generation.types import GenerationBackend, SamplingParams
from prm_jax.tokenization import PRMInput, build_prm_input

__all__ = [
    "EvaluationOutput",
    "prepare_input",
    "OVER_LENGTH",
    "OverLengthCount",
    "processbench_with_prm",
    "processbench_with_critic",
    "processbench_with_predictions",
    "bon_with_prm",
    "write_outputs",
]

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvaluationOutput:
    """What a task produced: the results document, one row per record, and plot-only data."""

    results: dict[str, Any]
    predictions: list[dict[str, Any]]
    curves: dict[str, Any] | None = None


def prepare_input(tokenizer: Any, problem: str, steps: Sequence[str], *, source: str) -> PRMInput:
    """Tokenize one solution in the PRM layout; problems are reported at the record's `path:line`."""
    try:
        return build_prm_input(tokenizer, problem, list(steps))
    except (TypeError, ValueError) as e:
        raise EvaluationDataError(str(e), path=source, field="steps") from None


#: What to do with an input longer than the model's context (`max_length`): `score` it anyway
#: (RoPE positions extrapolate, and the model card's own code scores any length) or `skip` its
#: record. Either way the over-long inputs are counted in results.json (`over_length`).
OVER_LENGTH = ("score", "skip")


@dataclasses.dataclass
class OverLengthCount:
    """Inputs longer than `max_length` tokens and what was done with them."""

    max_length: int | None
    policy: str
    n_inputs: int = 0  # over-long inputs seen (responses for Best-of-N)
    n_skipped: int = 0  # records left out of every metric (policy "skip"; BoN: whole problems)
    longest: int = 0  # tokens of the longest over-long input
    by_group: dict[str, int] = dataclasses.field(default_factory=dict)  # subset/dataset -> over-long inputs

    def __post_init__(self) -> None:
        if self.policy not in OVER_LENGTH:
            raise ValueError(f"over_length={self.policy!r}; choose one of {list(OVER_LENGTH)}")

    def check(self, x: PRMInput, group: str) -> bool:
        """Count `x` if it is over-long; True when it is."""
        if self.max_length is None or len(x.input_ids) <= self.max_length:
            return False
        self.n_inputs += 1
        self.longest = max(self.longest, len(x.input_ids))
        self.by_group[group] = self.by_group.get(group, 0) + 1
        return True

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def log(self, unit: str) -> None:
        if self.n_inputs:
            _log.warning(
                "%d %s(s) longer than max_length=%d tokens (longest %d): %s",
                self.n_inputs,
                unit,
                self.max_length,
                self.longest,
                f"{self.n_skipped} record(s) skipped" if self.policy == "skip" else "scored past the trained context",
            )


def _scoring_stats(scorer: StepScorer) -> dict[str, Any] | None:
    return scorer.stats.as_dict() if isinstance(scorer, BatchedScorer) else None


# ---------------------------------------------------------------------------- ProcessBench


@dataclasses.dataclass(frozen=True)
class _Scored:
    """A ProcessBench record without its text, plus its rewards."""

    id: str
    subset: str
    label: int
    final_answer_correct: bool | None
    generator: str
    rewards: list[float]
    over_length: bool = False


def processbench_with_prm(
    records: Iterable[ProcessBenchRecord],
    scorer: StepScorer,
    tokenizer: Any,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    tune_on: str | None = None,
    max_length: int | None = None,
    over_length: str = "score",
    window: int = SCORE_WINDOW,
) -> EvaluationOutput:
    """ProcessBench with a PRM: rewards per step, the first below `threshold` is the verdict.

    `tune_on` adds the threshold sweep (best threshold on that subset, applied to all).
    Inputs longer than `max_length` tokens are scored or skipped per `over_length` (see
    `OVER_LENGTH`), and counted in `results["over_length"]`.
    """
    too_long = OverLengthCount(max_length, over_length)

    def inputs() -> Iterator[tuple[_Scored, PRMInput]]:
        for r in records:
            x = prepare_input(tokenizer, r.problem, r.steps, source=r.source)
            over = too_long.check(x, r.subset)
            if over and over_length == "skip":
                too_long.n_skipped += 1
                continue
            yield _Scored(r.id, r.subset, r.label, r.final_answer_correct, r.generator, [], over), x

    scored = [dataclasses.replace(meta, rewards=rewards) for meta, rewards in score_stream(scorer, inputs(), window)]
    if not scored:
        raise ValueError("no ProcessBench records to evaluate")
    predictions = [predict_first_error(s.rewards, threshold) for s in scored]
    scores = processbench_scores((s.subset, p, s.label) for s, p in zip(scored, predictions))
    results: dict[str, Any] = {"task": "processbench", "mode": "prm", "threshold": threshold, **scores.as_dict()}
    results["over_length"] = too_long.as_dict()
    too_long.log("solution")
    by_subset: dict[str, list[tuple[list[float], int]]] = {}
    for s in scored:
        by_subset.setdefault(s.subset, []).append((s.rewards, s.label))
    if tune_on is not None:
        results["threshold_sweep"] = sweep_threshold(by_subset, tune_on).as_dict()
    results["analyses"] = {
        "min_position": min_position_stats(s.rewards for s in scored).as_dict(),
        "flawed_process": flawed_process_detection(
            (s.subset, s.final_answer_correct, s.label, p) for s, p in zip(scored, predictions)
        ).as_dict(),
        "calibration": calibration(step for s in scored for step in labelled_steps(s.rewards, s.label)).as_dict(),
    }
    stats = _scoring_stats(scorer)
    if stats is not None:
        results["scoring"] = stats
    thresholds, f1 = f1_curves(by_subset)
    curves = {"thresholds": thresholds.tolist(), "f1": {name: values.tolist() for name, values in f1.items()}}
    rows = [
        {
            "id": s.id,
            "subset": s.subset,
            "label": s.label,
            "pred": p,
            "correct": p == s.label,
            "final_answer_correct": s.final_answer_correct,
            "generator": s.generator,
            "over_length": s.over_length,
            "rewards": s.rewards,
        }
        for s, p in zip(scored, predictions)
    ]
    return EvaluationOutput(results, rows, curves)


def processbench_with_critic(
    records: Iterable[ProcessBenchRecord],
    backend: GenerationBackend,
    params: SamplingParams,
    *,
    batch_size: int = 64,
    keep_texts: bool = True,
    official_parse: bool = False,
) -> EvaluationOutput:
    """ProcessBench with an LLM critic: the critique prompt, `params.n` samples per solution,
    verdict = last `\\boxed{}` index, one verdict from the samples by `prm_jax.critique.critic_vote`
    (the vote synthesis's judge uses). `official_parse` reads verdicts exactly as ProcessBench's
    `extract_answer` does (see `prm_jax.critique.classify_verdict`)."""
    rows: list[dict[str, Any]] = []
    samples = unparseable_samples = truncated = 0

    def flush(batch: list[ProcessBenchRecord]) -> None:
        nonlocal samples, unparseable_samples, truncated
        outputs = backend.generate([critique_messages(r.problem, list(r.steps)) for r in batch], params)
        for r, out in zip(batch, outputs):
            verdicts = [parse_first_error(c.text, len(r.steps), official=official_parse) for c in out.completions]
            samples += len(verdicts)
            unparseable_samples += sum(v is None for v in verdicts)
            truncated += sum(c.finish_reason == "length" for c in out.completions)
            pred = critic_vote(verdicts)
            row: dict[str, Any] = {
                "id": r.id,
                "subset": r.subset,
                "label": r.label,
                "pred": pred,
                "correct": pred == r.label,
                "final_answer_correct": r.final_answer_correct,
                "generator": r.generator,
                "verdicts": verdicts,
            }
            if keep_texts:
                row["outputs"] = [c.text for c in out.completions]
            rows.append(row)

    batch: list[ProcessBenchRecord] = []
    for record in records:
        batch.append(record)
        if len(batch) >= batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    if not rows:
        raise ValueError("no ProcessBench records to evaluate")
    scores = processbench_scores((r["subset"], r["pred"], r["label"]) for r in rows)
    results: dict[str, Any] = {"task": "processbench", "mode": "critic", "threshold": None, **scores.as_dict()}
    results["critic"] = {
        "samples_per_record": params.n,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_tokens,
        "seed": params.seed,
        "parser": "processbench_official" if official_parse else "lenient",
        "samples": samples,
        "unparseable_samples": unparseable_samples,
        "truncated_samples": truncated,
    }
    results["analyses"] = {
        "flawed_process": flawed_process_detection(
            (r["subset"], r["final_answer_correct"], r["label"], r["pred"]) for r in rows
        ).as_dict()
    }
    return EvaluationOutput(results, rows)


def processbench_with_predictions(
    records: Iterable[ProcessBenchRecord], predictions_path: str | Path, *, missing: Literal["error", "wrong"] = "error"
) -> EvaluationOutput:
    """ProcessBench for an external critic's `{id, pred}` file.

    Every prediction must name a record of the data (unknown ids are an error listing them) and be
    a valid index for that record; records without a prediction are an error too, unless
    `missing="wrong"` scores them as wrong (counted in `n_unparseable` and `n_missing`).
    """
    meta = {r.id: r for r in _light_processbench(records)}
    if not meta:
        raise ValueError("no ProcessBench records to evaluate")
    predictions: dict[str, int | None] = {}
    unknown: list[str] = []
    for p in read_predictions(predictions_path):
        if p.id not in meta:
            unknown.append(p.id)
            continue
        n_steps = meta[p.id].n_steps
        if p.pred is not None and p.pred >= n_steps:
            raise EvaluationDataError(
                f"prediction {p.pred} is out of range for record {p.id!r} with {n_steps} steps",
                path=p.source,
                field="pred",
            )
        predictions[p.id] = p.pred
    if unknown:
        raise EvaluationDataError(
            f"{len(unknown)} prediction(s) for ids not in the data: {_preview(unknown)}",
            path=predictions_path,
            field="id",
        )
    absent = [i for i in meta if i not in predictions]
    if absent and missing == "error":
        raise EvaluationDataError(
            f"no prediction for {len(absent)} record(s): {_preview(absent)} (pass --missing=wrong to score them as wrong)",
            path=predictions_path,
            field="id",
        )
    rows = []
    for record_id, r in meta.items():
        pred = predictions.get(record_id)
        rows.append(
            {
                "id": record_id,
                "subset": r.subset,
                "label": r.label,
                "pred": pred,
                "correct": pred == r.label,
                "final_answer_correct": r.final_answer_correct,
                "missing": record_id not in predictions,
            }
        )
    scores = processbench_scores((r["subset"], r["pred"], r["label"]) for r in rows)
    results: dict[str, Any] = {"task": "processbench", "mode": "predictions", "threshold": None, **scores.as_dict()}
    results["n_missing"] = len(absent)
    results["analyses"] = {
        "flawed_process": flawed_process_detection(
            (r["subset"], r["final_answer_correct"], r["label"], r["pred"]) for r in rows
        ).as_dict()
    }
    return EvaluationOutput(results, rows)


@dataclasses.dataclass(frozen=True)
class _LightRecord:
    id: str
    subset: str
    label: int
    n_steps: int
    final_answer_correct: bool | None


def _light_processbench(records: Iterable[ProcessBenchRecord]) -> Iterator[_LightRecord]:
    for r in records:
        yield _LightRecord(r.id, r.subset, r.label, len(r.steps), r.final_answer_correct)


def _preview(ids: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


# ---------------------------------------------------------------------------- Best-of-N


@dataclasses.dataclass(frozen=True)
class _Problem:
    """A Best-of-N record without text: what selection and voting need."""

    id: str
    dataset: str
    correct: tuple[bool, ...]
    answers: tuple[str | None, ...]


def bon_with_prm(
    records: Iterable[BoNRecord],
    scorer: StepScorer,
    tokenizer: Any,
    *,
    aggregations: Sequence[str] = AGGREGATIONS,
    ks: Sequence[int] | None = None,
    max_length: int | None = None,
    over_length: str = "score",
    window: int = SCORE_WINDOW,
) -> EvaluationOutput:
    """Best-of-N with a PRM: score every response, select per aggregation, compare with maj/pass.

    `ks` also reports every metric using only each problem's first k responses (a curve over N;
    prefixes of the sampled order, not fresh draws). Responses longer than `max_length` tokens
    are scored, or (`over_length="skip"`) their whole problem is left out, so prm@N, maj@N and
    pass@N stay computed on the same problems; counted in `results["over_length"]`.
    """
    too_long = OverLengthCount(max_length, over_length)
    for how in aggregations:
        if how not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {how!r}; choose from {AGGREGATIONS}")
    problems: list[_Problem] = []

    def inputs() -> Iterator[tuple[tuple[int, int], PRMInput]]:
        for r in records:
            prepared = [
                prepare_input(tokenizer, r.problem, response.steps, source=f"{r.source} (response {j})")
                for j, response in enumerate(r.responses)
            ]
            over = [too_long.check(x, r.dataset) for x in prepared]
            if any(over) and over_length == "skip":
                too_long.n_skipped += 1
                continue
            problems.append(
                _Problem(
                    r.id,
                    r.dataset,
                    tuple(x.correct for x in r.responses),
                    tuple(response_answer(x) for x in r.responses),
                )
            )
            for j, x in enumerate(prepared):
                yield (len(problems) - 1, j), x

    rewards_of: list[list[list[float]]] = []
    for (i, j), rewards in score_stream(scorer, inputs(), window):
        if j == 0:
            rewards_of.append([])
        rewards_of[i].append(rewards)
    if not problems:
        raise ValueError("no Best-of-N records to evaluate")
    outcomes = [score_problem(p.correct, p.answers, r, aggregations) for p, r in zip(problems, rewards_of)]
    datasets, average = bon_scores(((p.dataset, o) for p, o in zip(problems, outcomes)), aggregations)
    results: dict[str, Any] = {
        "task": "bon",
        "aggregations": list(aggregations),
        "datasets": {name: d.as_dict() for name, d in datasets.items()},
        "average": average.as_dict(),
        "over_length": too_long.as_dict(),
    }
    too_long.log("response")
    if ks:
        by_k = {}
        for k in sorted(set(ks)):
            if k <= 0:
                raise ValueError(f"k must be positive, got {k}")
            at_k = (
                (p.dataset, score_problem(p.correct[:k], p.answers[:k], r[:k], aggregations))
                for p, r in zip(problems, rewards_of)
            )
            by_k[str(k)] = bon_scores(at_k, aggregations)[1].as_dict()
        results["by_k"] = by_k
    results["analyses"] = {"min_position": min_position_stats(r for rs in rewards_of for r in rs).as_dict()}
    stats = _scoring_stats(scorer)
    if stats is not None:
        results["scoring"] = stats
    rows = [
        {
            "id": p.id,
            "dataset": p.dataset,
            "n": o.n,
            "selected": o.selected,
            "prm_correct": o.prm_correct,
            "majority_answer": o.majority_answer,
            "majority_index": o.majority_index,
            "maj_correct": o.maj_correct,
            "pass": o.pass_correct,
            "correct": list(p.correct),
            "rewards": r,
        }
        for p, o, r in zip(problems, outcomes, rewards_of)
    ]
    return EvaluationOutput(results, rows)


# ---------------------------------------------------------------------------- outputs


def write_outputs(out_dir: str | Path, output: EvaluationOutput, *, plots: bool = True) -> list[Path]:
    """results.json, results.md, predictions.jsonl and the task's PNG plots under `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = output.results
    report.write_jsonl(out_dir / "predictions.jsonl", output.predictions)
    if results["task"] == "processbench":
        markdown = report.processbench_markdown(results)
    else:
        markdown = report.bon_markdown(results)
    written = [out_dir / "predictions.jsonl", out_dir / "results.md"]
    if plots:
        if results["task"] == "processbench":
            written += report.plot_processbench(results, out_dir, output.curves)
        else:
            written += report.plot_bon(results, out_dir)
    atomic_write(out_dir / "results.md", markdown)
    # results.json last: its presence means the run finished.
    report.write_json(out_dir / "results.json", results)
    return [out_dir / "results.json", *written]
