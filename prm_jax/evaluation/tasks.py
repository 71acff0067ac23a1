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
  "policy", "max_score_tokens", "n_inputs", "n_skipped", "n_over_cap", "over_cap_records",
  "longest", "by_group"}}`
* Best-of-N: `{"task": "bon", "aggregations": [...], "datasets": {name: {"n_problems",
  "n_responses", "n", "prm_at_n": {aggregation: acc}, "maj_at_n", "pass_at_n",
  "n_inconsistent_votes"}}, "average": {same keys, unweighted over datasets}, "by_k"?: {k:
  average}, "by_k_not_measured"?: {k: reason}, "analyses": {"min_position"}, "over_length":
  {...as above...}, "scoring"?: {...}}`

Rows are handed to `on_row` as soon as their record is finished (ProcessBench: its rewards are
back; Best-of-N: its last response's), so a caller can keep them while the run goes on: the runner
streams them to `predictions.partial.jsonl`, and a failure late in a long run loses no finished
record.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from prm_jax.critique import critic_vote, critique_messages, parse_first_error
from prm_jax.evaluation import report
from prm_jax.evaluation.analyses import calibration, flawed_process_detection, labelled_steps, min_position_stats
from prm_jax.evaluation.best_of_n import AGGREGATIONS, ProblemOutcome, bon_scores, response_answer, score_problem
from prm_jax.evaluation.processbench import (
    DEFAULT_THRESHOLD,
    f1_curves,
    predict_first_error,
    processbench_scores,
    sweep_threshold,
)
from prm_jax.evaluation.records import (
    BoNRecord,
    EvaluationDataError,
    ProcessBenchRecord,
    read_predictions,
    solution_text_problem,
)
from prm_jax.evaluation.scorer import SCORE_WINDOW, BatchedScorer, StepScorer, score_stream
from prm_jax.files import atomic_write
from prm_jax.generation.types import GenerationBackend, SamplingParams
from prm_jax.tokenization import PRMInput, build_prm_input, control_tokens

__all__ = [
    "EvaluationOutput",
    "prepare_input",
    "OVER_LENGTH",
    "MAX_SCORE_TOKENS",
    "OverLengthCount",
    "RowSink",
    "processbench_with_prm",
    "processbench_with_critic",
    "processbench_with_predictions",
    "bon_with_prm",
    "write_outputs",
]

_log = logging.getLogger(__name__)


#: Receives each finished prediction row (see the module docstring).
RowSink = Callable[[dict[str, Any]], None]


def _ignore(row: dict[str, Any]) -> None:
    """The default `on_row`: rows are only returned at the end."""


@dataclasses.dataclass
class EvaluationOutput:
    """What a task produced: the results document, one row per record, and plot-only data."""

    results: dict[str, Any]
    predictions: list[dict[str, Any]]
    curves: dict[str, Any] | None = None


def prepare_input(
    tokenizer: Any, problem: str, steps: Sequence[str], *, source: str, steps_field: str = "steps"
) -> PRMInput:
    """Tokenize one solution in the PRM layout; problems are reported at the record's `path:line`.

    A problem or step holding one of this tokenizer's control tokens (the readers checked the fixed
    `CONTROL_TOKENS`; a Llama tokenizer adds `<|eot_id|>` and the like) is named by its field:
    `problem`, or `steps_field` (Best-of-N: `responses[j].steps`). Any other failure of
    `build_prm_input` is the tokenizer's (a separator that is not one token), not a field's.
    """
    found = solution_text_problem(problem, steps, control_tokens(tokenizer))
    if found is not None:
        field, why = found
        raise EvaluationDataError(why, path=source, field=steps_field if field == "steps" else field)
    try:
        return build_prm_input(tokenizer, problem, list(steps))
    except (TypeError, ValueError) as e:
        raise EvaluationDataError(str(e), path=source) from None


#: What to do with an input longer than the model's context (`max_length`): `score` it anyway
#: (RoPE positions extrapolate, and the model card's own code scores any length) or `skip` its
#: record. Either way the over-long inputs are counted in results.json (`over_length`).
OVER_LENGTH = ("score", "skip")

#: The default hard cap on one scored input (tokens), unless the trained context is longer: the
#: scorer's memory for one row grows with its length (with its square on the `xla` attention
#: path: a 24k-token input needs ~30 GB of attention logits for a 7B), so under `score` an input
#: of any length would otherwise reach it. 16,384 is 4x Qwen2.5-Math-PRM's 4,096-token context;
#: the longest ProcessBench solution is under 3,000 tokens.
MAX_SCORE_TOKENS = 16384


@dataclasses.dataclass
class OverLengthCount:
    """Inputs longer than `max_length` tokens and what was done with them.

    `max_score_tokens` bounds what any policy scores: an input longer than it never reaches the
    scorer and its record (Best-of-N: its problem) is left out of every metric, counted in
    `n_over_cap` (inputs) and `over_cap_records` (ids). None: the larger of `max_length` and
    `MAX_SCORE_TOKENS`, so the default cap never cuts into the trained context.
    """

    max_length: int | None
    policy: str
    max_score_tokens: int | None = None
    n_inputs: int = 0  # over-long inputs seen, within the cap (responses for Best-of-N)
    n_skipped: int = 0  # records left out of every metric (policy "skip" or the cap; BoN: whole problems)
    n_over_cap: int = 0  # inputs longer than max_score_tokens (never scored)
    over_cap_records: list[str] = dataclasses.field(default_factory=list)  # ids left out for the cap
    longest: int = 0  # tokens of the longest over-long input
    by_group: dict[str, int] = dataclasses.field(default_factory=dict)  # subset/dataset -> over-long inputs

    def __post_init__(self) -> None:
        if self.policy not in OVER_LENGTH:
            raise ValueError(f"over_length={self.policy!r}; choose one of {list(OVER_LENGTH)}")
        if self.max_score_tokens is None:
            self.max_score_tokens = max(self.max_length or 0, MAX_SCORE_TOKENS)
        if self.max_score_tokens < 1:
            raise ValueError(f"max_score_tokens={self.max_score_tokens} must be >= 1")

    def check(self, x: PRMInput, group: str) -> bool:
        """Count `x` if it is over-long; True when it is."""
        if self.max_length is None or len(x.input_ids) <= self.max_length:
            return False
        self.n_inputs += 1
        self.longest = max(self.longest, len(x.input_ids))
        self.by_group[group] = self.by_group.get(group, 0) + 1
        return True

    def left_out(self, record_id: str, inputs: Sequence[PRMInput], group: str) -> bool:
        """True (counted as skipped) when a record is not to be scored: an input over
        `max_score_tokens` (counted as over the cap only), or over `max_length` (`check`) under
        the `skip` policy."""
        capped = [len(x.input_ids) for x in inputs if len(x.input_ids) > self.max_score_tokens]
        if capped:
            self.n_over_cap += len(capped)
            self.over_cap_records.append(record_id)
            self.longest = max(self.longest, *capped)
            self.n_skipped += 1
            return True
        over = [self.check(x, group) for x in inputs]
        if any(over) and self.policy == "skip":
            self.n_skipped += 1
            return True
        return False

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
                f"{self.n_skipped - len(self.over_cap_records)} record(s) skipped"
                if self.policy == "skip"
                else "scored past the trained context",
            )
        if self.n_over_cap:
            _log.warning(
                "%d record(s) not scored: %d %s(s) longer than max_score_tokens=%d (%s); raise --max_score_tokens "
                "to score them (the scorer's memory per row grows with its length)",
                len(self.over_cap_records),
                self.n_over_cap,
                unit,
                self.max_score_tokens,
                _preview(self.over_cap_records),
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
    source: str = ""

    def describe(self) -> str:
        return _record_label(self.id, self.source)


def _record_label(record_id: str, source: str, response: int | None = None) -> str:
    """How errors name a record (and a Best-of-N response): `record 'q3' response 2 (bon.jsonl:4)`."""
    name = f"record {record_id!r}" + ("" if response is None else f" response {response}")
    return f"{name} ({source})" if source else name


def processbench_with_prm(
    records: Iterable[ProcessBenchRecord],
    scorer: StepScorer,
    tokenizer: Any,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    tune_on: str | None = None,
    max_length: int | None = None,
    over_length: str = "score",
    max_score_tokens: int | None = None,
    window: int = SCORE_WINDOW,
    on_row: RowSink = _ignore,
) -> EvaluationOutput:
    """ProcessBench with a PRM: rewards per step, the first below `threshold` is the verdict.

    `tune_on` adds the threshold sweep (best threshold on that subset, applied to all).
    Inputs longer than `max_length` tokens are scored or skipped per `over_length` (see
    `OVER_LENGTH`); inputs longer than `max_score_tokens` are never scored (see
    `OverLengthCount`); all are counted in `results["over_length"]`. Each row goes to `on_row`
    as soon as its rewards are back.
    """
    too_long = OverLengthCount(max_length, over_length, max_score_tokens)

    def inputs() -> Iterator[tuple[_Scored, PRMInput]]:
        for r in records:
            x = prepare_input(tokenizer, r.problem, r.steps, source=r.source)
            if too_long.left_out(r.id, [x], r.subset):
                continue
            over = too_long.max_length is not None and len(x.input_ids) > too_long.max_length
            yield _Scored(r.id, r.subset, r.label, r.final_answer_correct, r.generator, [], over, r.source), x

    scored: list[_Scored] = []
    predictions: list[int] = []
    rows: list[dict[str, Any]] = []
    for meta, rewards in score_stream(scorer, inputs(), window, describe=_Scored.describe):
        s = dataclasses.replace(meta, rewards=rewards)
        p = predict_first_error(rewards, threshold)
        row = {
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
        scored.append(s)
        predictions.append(p)
        rows.append(row)
        on_row(row)
    if not scored:
        raise ValueError("no ProcessBench records to evaluate")
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
    return EvaluationOutput(results, rows, curves)


def processbench_with_critic(
    records: Iterable[ProcessBenchRecord],
    backend: GenerationBackend,
    params: SamplingParams,
    *,
    batch_size: int = 64,
    keep_texts: bool = True,
    official_parse: bool = False,
    on_row: RowSink = _ignore,
) -> EvaluationOutput:
    """ProcessBench with an LLM critic: the critique prompt, `params.n` samples per solution,
    verdict = last `\\boxed{}` index, one verdict from the samples by `prm_jax.critique.critic_vote`
    (the vote synthesis's judge uses). `official_parse` reads verdicts exactly as ProcessBench's
    `extract_answer` does (see `prm_jax.critique.classify_verdict`). Each row goes to `on_row` as
    soon as its batch is generated."""
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
            on_row(row)

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
    source: str = ""


def bon_with_prm(
    records: Iterable[BoNRecord],
    scorer: StepScorer,
    tokenizer: Any,
    *,
    aggregations: Sequence[str] = AGGREGATIONS,
    ks: Sequence[int] | None = None,
    max_length: int | None = None,
    over_length: str = "score",
    max_score_tokens: int | None = None,
    window: int = SCORE_WINDOW,
    on_row: RowSink = _ignore,
) -> EvaluationOutput:
    """Best-of-N with a PRM: score every response, select per aggregation, compare with maj/pass.

    `ks` also reports every metric using only each problem's first k responses (a curve over N;
    prefixes of the sampled order, not fresh draws); a k above the responses of any problem is
    not measured (`results["by_k_not_measured"]` says why, see `_by_k`). Responses longer than
    `max_length` tokens are scored, or (`over_length="skip"`) their whole problem is left out, so
    prm@N, maj@N and pass@N stay computed on the same problems; a response longer than
    `max_score_tokens` always leaves its problem out (see `OverLengthCount`); all counted in
    `results["over_length"]`. Each problem's row goes to `on_row` once its last response is scored.
    """
    too_long = OverLengthCount(max_length, over_length, max_score_tokens)
    for how in aggregations:
        if how not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {how!r}; choose from {AGGREGATIONS}")
    problems: list[_Problem] = []

    def inputs() -> Iterator[tuple[tuple[int, int], PRMInput]]:
        for r in records:
            prepared = [
                prepare_input(
                    tokenizer, r.problem, response.steps, source=r.source, steps_field=f"responses[{j}].steps"
                )
                for j, response in enumerate(r.responses)
            ]
            if too_long.left_out(r.id, prepared, r.dataset):
                continue
            problems.append(
                _Problem(
                    r.id,
                    r.dataset,
                    tuple(x.correct for x in r.responses),
                    tuple(response_answer(x) for x in r.responses),
                    r.source,
                )
            )
            for j, x in enumerate(prepared):
                yield (len(problems) - 1, j), x

    def describe(key: tuple[int, int]) -> str:
        problem = problems[key[0]]
        return _record_label(problem.id, problem.source, response=key[1])

    rewards_of: list[list[list[float]]] = []
    outcomes: list[ProblemOutcome] = []
    rows: list[dict[str, Any]] = []
    for (i, j), rewards in score_stream(scorer, inputs(), window, describe=describe):
        if j == 0:
            rewards_of.append([])
        rewards_of[i].append(rewards)
        p = problems[i]
        if len(rewards_of[i]) == len(p.correct):  # the problem's last response: its row is final
            outcome = score_problem(p.correct, p.answers, rewards_of[i], aggregations)
            outcomes.append(outcome)
            rows.append(_bon_row(p, outcome, rewards_of[i]))
            on_row(rows[-1])
    if not problems:
        raise ValueError("no Best-of-N records to evaluate")
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
        results["by_k"], not_measured = _by_k(problems, rewards_of, ks, aggregations)
        if not_measured:
            results["by_k_not_measured"] = not_measured
            _log.warning("bon_k not measured: %s", "; ".join(f"k={k}: {why}" for k, why in not_measured.items()))
    results["analyses"] = {"min_position": min_position_stats(r for rs in rewards_of for r in rs).as_dict()}
    stats = _scoring_stats(scorer)
    if stats is not None:
        results["scoring"] = stats
    return EvaluationOutput(results, rows)


def _bon_row(p: _Problem, o: ProblemOutcome, rewards: list[list[float]]) -> dict[str, Any]:
    return {
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
        "rewards": rewards,
    }


def _by_k(
    problems: Sequence[_Problem],
    rewards_of: Sequence[list[list[float]]],
    ks: Sequence[int],
    aggregations: Sequence[str],
) -> tuple[dict[str, Any], dict[str, str]]:
    """Average scores on each problem's first k responses, for the ks every problem has; the
    others, with the reason, as not measured.

    A k above a problem's N would score all N there (a prefix cannot grow), so its column would
    repeat a smaller k's numbers as if k responses had been drawn; it is left out instead, named.
    """
    sizes = [len(p.correct) for p in problems]
    fewest = min(range(len(problems)), key=lambda i: (sizes[i], i))
    measured: dict[str, Any] = {}
    not_measured: dict[str, str] = {}
    for k in sorted(set(ks)):
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        short = sum(size < k for size in sizes)
        if short:
            not_measured[str(k)] = (
                f"{short} of {len(problems)} problems have fewer than {k} responses (the fewest: "
                f"{sizes[fewest]}, record {problems[fewest].id!r}); k is measured only up to {sizes[fewest]}"
            )
            continue
        at_k = (
            (p.dataset, score_problem(p.correct[:k], p.answers[:k], r[:k], aggregations))
            for p, r in zip(problems, rewards_of)
        )
        measured[str(k)] = bon_scores(at_k, aggregations)[1].as_dict()
    return measured, not_measured


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
