"""Stage 1, sample: N policy responses per problem, split into steps, final answer extracted.

Each problem is ONE request with `n = N` (the prompt is prefilled once and the N samples share
it), seeded by `stable_seed(seed, "sample", problem_id)`; response j draws from seed + j, so a
resumed run regenerates exactly what an uninterrupted one would. Output: one
`SampleRecord` per problem in `W/sample/<shard>.jsonl`; bad input lines, prompts longer
than the context and empty responses become `ErrorRecord`s in `<shard>.errors.jsonl`
(or stop the run under `on_error="stop"`). Grading is the next stage.

Text follows `prm_jax.tokenization.text_problem` with the policy tokenizer's special tokens added
(`control_tokens`): a problem holding one is a `control_token` error and is never prompted, and a
response holding one (or the step separator) is a `response_control_token` error and keeps no
steps, so it is graded `empty` and never reaches `prm_train.jsonl`, whose reader refuses such text.

Each batch of `sample.batch_size` problems is a `data_pipeline.dispatch` task: one generate call,
run in this process or, several at once, on Ray workers (`data_pipeline.ray_runner`), its records
released in batch order either way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import ml_collections

from data_pipeline.backends import context_length, prompt_lengths
from data_pipeline.context import StageContext
from data_pipeline.dispatch import Generation, Task, drive
from data_pipeline.ids import response_id, shard_of, stable_seed
from data_pipeline.problems import read_problems
from data_pipeline.schemas import ErrorRecord, Problem, Response, SampleRecord
from data_pipeline.solutions import final_answer, policy_prompt, split_steps
from prm_jax.generation.types import GenerationBackend, RequestOutput, SamplingParams
from prm_jax.jsonl import AppendOnlyWriter
from prm_jax.tokenization import CONTROL_TOKENS, control_tokens, text_problem

_log = logging.getLogger(__name__)

#: Sample-stage errors that end a problem (it is never sampled); the others are about one response.
_PROBLEM_ERRORS = ("prompt_too_long", "control_token")


def sample_params(
    problems: Sequence[Problem], *, n: int, temperature: float, top_p: float, max_tokens: int, base_seed: int
) -> list[SamplingParams]:
    """One `n = N` request per problem, seeded by the problem id (resumes regenerate the same)."""
    return [
        SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            seed=stable_seed(base_seed, "sample", p.id),
        )
        for p in problems
    ]


def sample_records(
    problems: Sequence[Problem],
    params: Sequence[SamplingParams],
    outputs: Sequence[RequestOutput],
    forbidden: Sequence[str] = CONTROL_TOKENS,
) -> list[SampleRecord]:
    """One `SampleRecord` per problem from its request's output; a response whose text holds one of
    `forbidden` (`text_problem`) keeps no steps."""
    records = []
    for problem, param, output in zip(problems, params, outputs):
        responses = tuple(
            Response(
                index=j,
                text=c.text,
                steps=() if text_problem(c.text, forbidden) else tuple(split_steps(c.text)),
                answer=final_answer(c.text),
                finish_reason=c.finish_reason,
                num_tokens=len(c.token_ids),
            )
            for j, c in enumerate(output.completions)
        )
        records.append(
            SampleRecord(
                id=problem.id, problem=problem.problem, gold=problem.answer, seed=param.seed, responses=responses
            )
        )
    return records


def sample_problems(
    backend: GenerationBackend,
    problems: Sequence[Problem],
    *,
    n: int,
    temperature: float,
    top_p: float,
    max_tokens: int,
    system_prompt: str,
    base_seed: int,
    prompts: Sequence[str] | None = None,
) -> list[SampleRecord]:
    """One `SampleRecord` per problem from one batched `generate` call."""
    if prompts is None:
        prompts = [policy_prompt(backend.tokenizer, p.problem, system_prompt) for p in problems]
    params = sample_params(
        problems, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, base_seed=base_seed
    )
    return sample_records(problems, params, backend.generate(list(prompts), params))


def shard_problems(ctx: StageContext) -> list[Problem | ErrorRecord]:
    """This shard's problems and input errors, in file order (`problems.limit` applied first)."""
    cfg = ctx.config.problems
    items: list[Problem | ErrorRecord] = []
    valid = 0
    for item in read_problems(cfg.path, cfg.format):
        if isinstance(item, Problem):
            if cfg.limit and valid >= cfg.limit:
                break
            valid += 1
        if shard_of(item.id, ctx.shard.count) == ctx.shard.index:
            items.append(item)
    return items


def _sample_batch(backend: GenerationBackend, batch: Sequence[Problem], cfg: ml_collections.ConfigDict) -> Task:
    """One batch of the sample stage as a `dispatch` task: control-token and prompt-length errors, one
    generate call, then per problem its response errors (control tokens, empty) and its record (an
    error first: a kill between the two re-derives it)."""
    forbidden = control_tokens(backend.tokenizer)
    checked = []
    for problem in batch:  # the reader checked Qwen's tokens; this policy may have its own
        why = text_problem(problem.problem, forbidden)
        if why is None:
            checked.append(problem)
        else:
            yield ErrorRecord(
                id=problem.id,
                stage="sample",
                error="control_token",
                message=f"the problem text {why}",
                record_id=problem.id,
                source=problem.source,
            )
    batch = checked
    prompts = [policy_prompt(backend.tokenizer, p.problem, cfg.sample.system_prompt) for p in batch]
    limit = context_length(backend)
    if limit is not None:
        keep = []
        for problem, prompt, length in zip(batch, prompts, prompt_lengths(backend, prompts)):
            if length >= limit:
                yield ErrorRecord(
                    id=problem.id,
                    stage="sample",
                    error="prompt_too_long",
                    message=f"the prompt has {length} tokens; the policy's context is {limit}",
                    record_id=problem.id,
                    source=problem.source,
                )
            else:
                keep.append((problem, prompt))
        batch, prompts = [p for p, _ in keep], [q for _, q in keep]
    if not batch:
        return
    s = cfg.sample
    params = sample_params(
        batch, n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens, base_seed=cfg.seed
    )
    outputs = yield Generation(prompts, params, tuple(p.id for p in batch))
    for record, problem in zip(sample_records(batch, params, outputs, forbidden), batch):
        for response in record.responses:
            rid = response_id(record.id, response.index)
            why = text_problem(response.text, forbidden)
            if why is not None:
                yield ErrorRecord(
                    id=rid,
                    stage="sample",
                    error="response_control_token",
                    message=f"response {response.index} {why}; it keeps no steps (graded empty, never labelled)",
                    record_id=rid,
                    source=problem.source,
                )
            elif not response.steps:
                yield ErrorRecord(
                    id=rid,
                    stage="sample",
                    error="empty_response",
                    message=f"response {response.index} has no text ({response.num_tokens} tokens, "
                    f"finish_reason={response.finish_reason})",
                    record_id=rid,
                    source=problem.source,
                )
        yield record


def run_sample(ctx: StageContext) -> None:
    shard, cfg = ctx.shard, ctx.config

    def sample_all(writer: AppendOnlyWriter, errors: AppendOnlyWriter) -> None:
        pending: list[Problem] = []
        for item in shard_problems(ctx):
            if isinstance(item, ErrorRecord):
                ctx.error(errors, item)
            elif item.id not in writer.ids and item.id not in errors.ids:
                pending.append(item)
        _log.info("sample: %s: %d problems to sample (%d already done)", shard.name, len(pending), len(writer.ids))
        if not pending:
            return
        backend = ctx.policy_backend()
        size = cfg.sample.batch_size
        tasks = (_sample_batch(backend, pending[i : i + size], cfg) for i in range(0, len(pending), size))
        with ctx.progress(len(pending), "sample", "problem") as bar:
            for item in drive(backend, tasks, ordered=True):
                if isinstance(item, SampleRecord):
                    writer.write(item)
                    bar.update(1)
                else:
                    ctx.error(errors, item)
                    bar.update(item.error in _PROBLEM_ERRORS)

    ctx.append_stage("sample", SampleRecord.from_json, sample_all, with_errors=True)
