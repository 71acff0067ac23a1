"""Workdir layout of a synthesis run, its stage locks and its small JSON files.

Layout of a synthesis workdir `W` (`S` = `shard-00003-of-00008`, one per node/process):

    W/run_config.json                the labelling-relevant settings of the run (checked on restart)
    W/<stage>/S.jsonl                stage records, append-only (stage = sample|grade|mc|judge)
    W/<stage>/S.errors.jsonl         error records of that stage and shard
    W/<stage>/S.done.json            done marker: the stage finished this shard (with counts)
    W/<stage>/S.lock                 held while a process writes the shard
    W/consensus/shards/S.jsonl       consensus records of one shard, sorted by id
    W/consensus/shards/S.counts.json that shard's counts (input of the summary)
    W/consensus/prm_train.jsonl      the merged training records of all shards, sorted by id
    W/summary.json                   counts of every stage, keep rate, label balance, agreement
    W/ray_summary.json               --runner=ray: per stage, workers, batches, retries, wall time

Why append-only shards instead of one file written at the end: a labelling run is days of
accelerator time, and a killed node must lose at most the records in flight. Stage records are
appended with `prm_jax.jsonl.AppendOnlyWriter` (a torn last line is cut on reopen, ids already
present are skipped, so a rerun of the same command continues where the last one stopped and never
writes an id twice) and read back with `prm_jax.jsonl.iter_records`. Files derived in one go
(consensus, summary, done markers) are written whole with `prm_jax.files`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from prm_jax.files import read_regular_text
from prm_jax.jsonl import DataError, json_problem, loads, read_records
from prm_jax.run_lock import RunLockedError, hold

T = TypeVar("T")

STAGES = ("sample", "grade", "mc", "judge", "consensus")


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's slice of the problems: shard `index` of `count`."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"invalid shard {self.index} of {self.count}: need 0 <= index < count")

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}-of-{self.count:05d}"


@dataclasses.dataclass(frozen=True)
class Layout:
    """Paths of a synthesis workdir (see the module docstring)."""

    workdir: Path

    def stage_dir(self, stage: str) -> Path:
        return self.workdir / stage

    def records(self, stage: str, shard: Shard) -> Path:
        if stage == "consensus":
            return self.workdir / "consensus" / "shards" / f"{shard.name}.jsonl"
        return self.stage_dir(stage) / f"{shard.name}.jsonl"

    def errors(self, stage: str, shard: Shard) -> Path:
        return self.stage_dir(stage) / f"{shard.name}.errors.jsonl"

    def done(self, stage: str, shard: Shard) -> Path:
        if stage == "consensus":
            return self.workdir / "consensus" / "shards" / f"{shard.name}.counts.json"
        return self.stage_dir(stage) / f"{shard.name}.done.json"

    def lock(self, stage: str, shard: Shard) -> Path:
        return self.stage_dir(stage) / f"{shard.name}.lock"

    @property
    def final_records(self) -> Path:
        return self.workdir / "consensus" / "prm_train.jsonl"

    @property
    def summary(self) -> Path:
        return self.workdir / "summary.json"

    @property
    def ray_summary(self) -> Path:
        return self.workdir / "ray_summary.json"

    @property
    def run_config(self) -> Path:
        return self.workdir / "run_config.json"


def read_records_if_exists(path: Path, parse: Callable[[dict[str, Any]], T]) -> list[T]:
    """The records of an optional stage file (an errors file exists only once there were errors)."""
    return read_records(path, parse) if path.exists() else []


#: A done marker, the run config or a summary is a few KiB; anything far larger is not one of them.
MAX_SMALL_JSON_BYTES = 64 * 2**20


def read_json(path: Path) -> Any:
    """A whole JSON file (a done marker, the run config); malformed JSON names its line. The file must
    be regular and small (a FIFO would block the reader forever): `files.read_regular_text`."""
    try:
        # bounded: a 5,000-digit number is this error too
        return loads(read_regular_text(path, max_bytes=MAX_SMALL_JSON_BYTES))
    except json.JSONDecodeError as e:
        raise DataError(json_problem(e), path=path, line=e.lineno) from None


#: Another process holds a stage shard's lock (the message names the lock file and its holder).
ShardLockedError = RunLockedError


@contextlib.contextmanager
def exclusive_lock(path: Path, *, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on `path` (two processes writing one shard would duplicate ids); held by
    another process: raise, naming it, or with `wait` block until it is free (a short shared update).

    `prm_jax.run_lock.hold`: the lock dies with its process, so a killed run never leaves a stale lock.
    """
    refusal = (
        f"{path} is locked by {{holder}}: another process is writing this stage and shard. Give each "
        "process its own --shard_index, or wait for the other one to finish"
    )
    with hold(path, tool="synthesis", refusal=refusal, wait=wait):
        yield
