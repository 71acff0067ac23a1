"""The workdir's record of what a run trains on: `config.json`, written once, checked on resume.

A run's checkpoints only make sense with the data and hyper-parameters that produced them, so a
resume (a workdir with a committed checkpoint) must use the recorded ones. Fields that change how
the run executes but not what it learns (dtypes, remat, attention kernel, mesh, logging and
checkpoint cadence, progress bar, eval file) may change freely. The record also holds the training
file's SHA-256, so the same path holding other records is other data. Any other difference is refused
unless `train.allow_config_change` is true; the accepted change is appended to
`config_changes.jsonl` (with the step it applies from) and `config.json` becomes the new settings.

While no checkpoint exists nothing has been trained, and the record is simply replaced. Only
process 0 writes; files are written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import ml_collections

from prm_jax import jsonl
from prm_jax.checkpoint import committed_steps as checkpoint_steps
from prm_jax.data.records import file_sha256
from prm_jax.files import atomic_write_json, read_regular_text

RECORD_FILE = "config.json"
CHANGES_FILE = "config_changes.jsonl"

#: Dotted fields (or prefixes ending in ".") that may differ on resume.
RUNTIME_FIELDS = (
    "model.dtype",
    "model.param_dtype",
    "model.remat_policy",
    "model.attention_impl",
    "train.log_every",
    "train.eval_every",
    "train.progress",
    "train.peak_flops_per_device",
    "train.preflight_plan",
    "train.grad_accum_steps",
    "train.microbatch_rows_per_shard",
    "train.lm_loss_chunk_tokens",
    "train.allow_config_change",
    "checkpoint.",
    "mesh.",
    "data.eval_file",
)


#: Fields a resume can never change, flag or not: the checkpoints hold this model.
FIXED_FIELDS = ("objective", "model.arch.")


class ConfigChangeError(ValueError):
    """A resume with different data or hyper-parameters than the workdir recorded."""


def committed_steps(workdir: Path) -> list[int]:
    """Checkpoint steps Orbax has committed in a run's workdir (`checkpoint.committed_steps`)."""
    return checkpoint_steps(Path(workdir) / "checkpoints")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as `{"section.key": value}` (how config differences are named)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


#: Fields holding paths: `data/x.jsonl` and `./data/x.jsonl` (or a symlink to it) are the same file.
PATH_FIELDS = ("data.train_file", "data.eval_file", "data.tokenizer_dir", "model.init_from")
#: The record's key for the training file's SHA-256 (under `fingerprints`).
TRAIN_FILE_SHA256 = "data.train_file.sha256"


def _as_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The record: the config with its local paths made absolute (a resume from another current
    directory names the same files), plus the content hash of the training file (a path that now
    holds other records is other data)."""
    record = json.loads(json.dumps(config.to_dict(), sort_keys=True, default=str))
    for field in PATH_FIELDS:
        section, key = field.split(".")
        value = record.get(section, {}).get(key)
        # Only paths that exist: a Hub id (`Qwen/Qwen2.5-Math-7B`) stays as typed.
        if isinstance(value, str) and value and os.path.exists(value):
            record[section][key] = os.path.abspath(value)
    train_file = config.data.train_file
    if train_file and Path(train_file).is_file():
        record["fingerprints"] = {TRAIN_FILE_SHA256: file_sha256(train_file)}
    return record


def _matches(field: str, patterns: tuple[str, ...]) -> bool:
    return any(field == p or (p.endswith(".") and field.startswith(p)) for p in patterns)


def _same(field: str, old: Any, new: Any, old_all: dict[str, Any], new_all: dict[str, Any]) -> bool:
    if old == new:
        return True
    if field in PATH_FIELDS and isinstance(old, str) and isinstance(new, str) and old and new:
        if os.path.realpath(old) == os.path.realpath(new):
            return True
        # The training file moved or was copied: the same bytes are the same data.
        sha = f"fingerprints.{TRAIN_FILE_SHA256}"
        return field == "data.train_file" and old_all.get(sha) is not None and old_all.get(sha) == new_all.get(sha)
    if field == "data.negative_threshold":
        # Runs recorded before the paper's cut (0.0: the first label 0) carry the old default 0.5;
        # with hard labels (0/1) both select the same steps, so such a run resumes unchanged.
        return not old_all.get("data.soft_labels", False) and not new_all.get("data.soft_labels", False)
    return False


def config_changes(recorded: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Fields whose value differs, runtime fields excepted. Fields absent from the record (added
    to the schema since) are not changes; paths compare as the files they name."""
    old, new = flatten(recorded), flatten(current)
    return {
        field: (old[field], new.get(field))
        for field in sorted(old)
        if not _matches(field, RUNTIME_FIELDS) and field in new and not _same(field, old[field], new[field], old, new)
    }


#: Largest run record read (a real one is a few KB).
_MAX_RECORD_BYTES = 16 * 2**20


def _read_record(record: Path) -> dict[str, Any]:
    """The run record `record`, or a one-line ConfigChangeError naming it: bounded and regular
    (`files.read_regular_text`), UTF-8, decoded by `jsonl.loads` (a 5,000-digit number too), an object."""
    try:
        text = read_regular_text(record, max_bytes=_MAX_RECORD_BYTES)
    except ValueError as error:  # not regular, too big, not UTF-8: the message names the file
        raise ConfigChangeError(f"run record {error}; restore it or use a new workdir") from None
    try:
        recorded = jsonl.loads(text)
    except json.JSONDecodeError as error:
        why = f"{jsonl.json_problem(error)} at line {error.lineno}"
    else:
        if isinstance(recorded, dict):
            return recorded
        why = f"a JSON {type(recorded).__name__}, not an object"
    raise ConfigChangeError(f"{record}: unreadable run record ({why}); restore it or use a new workdir")


def check_and_record(
    config: ml_collections.ConfigDict, workdir: Path, *, write: bool = True, current: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Refuse a resume whose data or hyper-parameters differ from the record (see module doc),
    then write the record. `write=False` (processes other than 0) only checks. Returns the record
    of `config`; pass it back as `current` to check again without hashing the data again."""
    workdir = Path(workdir)
    record = workdir / RECORD_FILE
    current = _as_json(config) if current is None else current
    steps = committed_steps(workdir)
    changes: dict[str, tuple[Any, Any]] = {}
    if steps and record.exists():  # a FIFO or a device there is refused by the read, not skipped
        recorded = _read_record(record)
        changes = config_changes(recorded, current)
        fixed = {f: v for f, v in changes.items() if _matches(f, FIXED_FIELDS)}
        if fixed:
            raise ConfigChangeError(
                f"{workdir} holds checkpoints (latest step {steps[-1]}) of another model ({_listed(fixed)}); "
                "the model cannot change on resume: use the recorded settings or a new --workdir"
            )
        if changes and not config.train.get("allow_config_change", False):
            raise ConfigChangeError(
                f"{workdir} holds checkpoints (latest step {steps[-1]}) trained with other settings "
                f"({_listed(changes)}); resume with the recorded ones, use a new --workdir, or pass "
                "--config.train.allow_config_change=true to record the change"
            )
    if not write:
        return current
    workdir.mkdir(parents=True, exist_ok=True)
    if changes:
        entry = {"from_step": steps[-1], "changed": {f: {"old": a, "new": b} for f, (a, b) in changes.items()}}
        with (workdir / CHANGES_FILE).open("a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
    if changes or not steps or not record.is_file():
        atomic_write_json(record, current)
    return current


def _listed(changes: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{field}: {_short(old)} -> {_short(new)}" for field, (old, new) in changes.items())


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
