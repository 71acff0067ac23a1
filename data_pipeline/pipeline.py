"""Runs the synthesis stages for one shard: sample -> grade -> mc -> judge -> consensus (-> merge).

Every stage reads the previous stage's shard file and appends to its own (see
`data_pipeline.shards`), skips ids already present, and writes a done marker at the end,
so `run` with the same arguments is idempotent and resumes after a kill. Several nodes each
run `run(..., shard=Shard(i, n))` on a shared workdir; problems are partitioned by a stable
hash of their id (`data_pipeline.ids.shard_of`), so the slices are disjoint and the same
for every node. `stage="all"` ends with the merge once every shard has its consensus (the
last node to finish does it; the merge is deterministic, so a race between two is harmless);
`stage="merge"` runs it explicitly.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import ml_collections

from data_pipeline.config import MODEL_STAGES, semantic_values, validate
from data_pipeline.consensus import run_consensus, run_merge
from data_pipeline.context import StageContext, SynthesisError
from data_pipeline.grade import run_grade
from data_pipeline.grading import GradingPool
from data_pipeline.judge import run_judge
from data_pipeline.mc import run_mc
from data_pipeline.sample import run_sample
from data_pipeline.shards import Layout, Shard, read_json
from prm_jax.data.records import file_sha256
from prm_jax.files import atomic_write_json
from prm_jax.generation.types import GenerationBackend
from prm_jax.run_lock import HeldLock, workdir_lock

_log = logging.getLogger("data_pipeline")

STAGES = ("all", "sample", "grade", "mc", "judge", "consensus", "merge")
_RUNNERS = {"sample": run_sample, "grade": run_grade, "mc": run_mc, "judge": run_judge, "consensus": run_consensus}


# Settings added to run_config.json after runs were already recorded, with the value those runs used:
# a workdir started before a setting existed resumes when the setting keeps that value.
SETTINGS_ADDED_LATER = {"judge.prompt": "processbench"}


def judge_vote_rule(num_samples: int) -> str:
    """How a response's judge verdict is decided: part of a run's settings, since verdicts decided
    by two rules must not mix in one dataset. One sample needs no vote."""
    return "one sample" if num_samples == 1 else "critic_vote (plurality)"


def _recorded_vote_rule(stored: dict) -> str:
    # Runs recorded before the rule was a setting but with judge.vote_threshold voted by a strict
    # majority of the samples.
    num_samples = stored.get("judge.num_samples", 1)
    if num_samples == 1 or "judge.vote_threshold" not in stored:
        return judge_vote_rule(num_samples)
    return f"strict majority (judge.vote_threshold={stored['judge.vote_threshold']})"


def check_run_config(layout: Layout, config: ml_collections.ConfigDict, num_shards: int) -> None:
    """Record the run's semantic settings on first use of a workdir; refuse a mismatch later.

    The problem file's SHA-256 is part of it: resuming over an edited input would mix records.
    Settings recorded by a run that wrote no record yet (it failed before its first one) are
    replaced: nothing could mix.
    """
    if not Path(config.problems.path).is_file():
        raise SynthesisError(f"problem file {config.problems.path} does not exist")
    current = {
        **semantic_values(config),
        "num_shards": num_shards,
        "problems.sha256": file_sha256(config.problems.path),
        "judge.vote": judge_vote_rule(config.judge.num_samples),
    }
    if not layout.run_config.exists():
        layout.workdir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(layout.run_config, current)
    stored = read_json(layout.run_config)
    stored = {**SETTINGS_ADDED_LATER, "judge.vote": _recorded_vote_rule(stored), **stored}
    diffs = [f"{key}: {stored.get(key)!r} -> {value!r}" for key, value in current.items() if stored.get(key) != value]
    if diffs and not has_stage_output(layout):
        if not _alone_on(layout):
            raise SynthesisError(
                f"{layout.workdir} is in use by another synthesis process started with other settings "
                f"({'; '.join(diffs)}): give every shard the same settings, or use a new --workdir"
            )
        _log.info(
            "%s: no stage has written a record yet; replacing its recorded settings (%s)",
            layout.workdir,
            "; ".join(diffs),
        )
        atomic_write_json(layout.run_config, current)
    elif diffs:
        raise SynthesisError(
            f"{layout.workdir} was started with other settings ({'; '.join(diffs)}). Resuming "
            "would mix two datasets: use a new --workdir, or restore the original settings"
        )


# Every synthesis process holds the workdir's run lock shared while it runs (`prm_jax.run_lock`), so a
# process that would replace the recorded settings can tell whether another one (another shard,
# possibly still loading its model and not yet writing) already runs with them, and a tool that
# writes the directory alone (a training run pointed at it) is refused. flock: never stale.
_held_workdir_locks: dict[Path, HeldLock] = {}


@contextlib.contextmanager
def _using_workdir(layout: Layout):
    with workdir_lock(layout.workdir, "synthesis", shared=True) as held:
        _held_workdir_locks[layout.workdir] = held
        try:
            yield
        finally:
            _held_workdir_locks.pop(layout.workdir, None)


def _alone_on(layout: Layout) -> bool:
    """Whether no other process holds the workdir's lock (this process keeps its shared hold)."""
    held = _held_workdir_locks.get(layout.workdir)
    return True if held is None else held.alone()  # None: called outside `run` (tests of the record alone)


def has_stage_output(layout: Layout) -> bool:
    """Whether any stage wrote anything (a record, an error record, a done marker) into the workdir."""
    for path in layout.workdir.rglob("*"):
        if path == layout.run_config or path.suffix == ".lock" or not path.is_file():
            continue
        if path.stat().st_size > 0:
            return True
    return False


def run(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    stage: str = "all",
    shard: Shard | None = None,
    policy: GenerationBackend | None = None,
    judge: GenerationBackend | None = None,
    grader: GradingPool | None = None,
    build: Callable[[ml_collections.ConfigDict, int], GenerationBackend] | None = None,
) -> None:
    """Run `stage` (or all stages) for `shard`; backends and grader are built from the config
    unless given (tests inject scripted ones). `build(section, seed)` builds a model section's
    backend (default `build_backend`; `data_pipeline.ray_runner.pool_builder` for engines on Ray
    workers). Raises SynthesisError for conditions a user fixes."""
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}; choose one of {STAGES}")
    shard = shard or Shard()
    injected = {"policy": policy, "judge": judge}
    validate(config, model_sections=[s for s in MODEL_STAGES.get(stage, ()) if injected[s] is None])
    layout = Layout(Path(workdir))
    with _using_workdir(layout):
        _run_stages(config, layout, stage, shard, policy, judge, grader, build)


def _run_stages(
    config: ml_collections.ConfigDict,
    layout: Layout,
    stage: str,
    shard: Shard,
    policy: GenerationBackend | None,
    judge: GenerationBackend | None,
    grader: GradingPool | None,
    build: Callable[[ml_collections.ConfigDict, int], GenerationBackend] | None,
) -> None:
    check_run_config(layout, config, shard.count)
    if stage == "merge":
        run_merge(layout, shard.count)
        return
    ctx = StageContext(config, layout, shard, policy=policy, judge=judge, grader=grader, build=build)
    try:
        if stage == "all":
            stages = ["sample", "grade", "mc", "judge", "consensus"]
            if config.consensus.mode == "mc":
                stages.remove("judge")
            if config.consensus.mode == "judge":
                stages.remove("mc")
        else:
            stages = [stage]
        for name in stages:
            _RUNNERS[name](ctx)
    finally:
        ctx.close()
    if stage == "all":
        waiting = [
            Shard(i, shard.count).name
            for i in range(shard.count)
            if not layout.done("consensus", Shard(i, shard.count)).exists()
        ]
        if waiting:
            _log.info(
                "shard %s finished; the merge waits for %d shard(s): %s (the last one to finish merges, "
                "or run --stage=merge)",
                shard.name,
                len(waiting),
                ", ".join(waiting[:8]),
            )
        else:
            run_merge(layout, shard.count)
