"""From a config to a finished run: tokenizer, data, iterators, Trainer."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from prm_jax.checkpoint import read_checkpoint_metadata
from prm_jax.data.pipeline import (
    PipelineConfig,
    build_eval_batches,
    build_train_iterator,
    load_prm_examples,
    load_sft_examples,
)
from prm_jax.data.tokenize import TokenizeConfig
from prm_jax.files import staged_directory
from prm_jax.run_lock import RunLockedError, workdir_lock
from prm_jax.tokenization import prepare_step_separator
from prm_jax.training.config import check as check_config
from prm_jax.training.config import seq_len_problem
from prm_jax.training.config import warnings as config_warnings
from prm_jax.training.run_record import check_and_record as check_resume_config
from prm_jax.training.run_record import committed_steps
from prm_jax.training.trainer import Trainer, TrainResult, check_same_separator, training_model_config

_log = logging.getLogger(__name__)


#: Where a run keeps the tokenizer it trains with (beside `checkpoints/`); exports default to it.
RUN_TOKENIZER_DIR = "prm_tokenizer"


def _save_tokenizer(tokenizer: Any, target: Path) -> None:
    """Save to a temporary directory, then swap it in: a killed run never leaves half a tokenizer."""
    if jax.process_index() != 0:
        return
    with staged_directory(target) as staging:
        tokenizer.save_pretrained(str(staging))


def prepare_run_tokenizer(
    tokenizer: Any, separator: str, workdir: Path, *, save: bool = True
) -> tuple[Any, dict[str, Any]]:
    """The separator-bearing tokenizer a PRM run trains with, saved in the run, and its record.

    The separator follows `prepare_step_separator` (the same convention the export applies): as
    is when it is already one token, id 151651 on a Qwen2.5 vocabulary, else a new special token
    ("added"), for which `training_model_config(config, record)` grows the model's vocabulary when
    the id falls outside its (padded) embedding.
    """
    tokenizer, step_separator = prepare_step_separator(tokenizer, separator)
    target = Path(workdir).absolute() / RUN_TOKENIZER_DIR
    if save:  # else the caller saves it (`_save_tokenizer`) once the data has been read
        _save_tokenizer(tokenizer, target)
    _log.info(
        "step separator %r is token id %d (%s); tokenizer saved to %s",
        separator,
        step_separator.token_id,
        step_separator.origin,
        target,
    )
    return tokenizer, {**step_separator.to_json_dict(), "dir": str(target)}


def check_seq_len(seq_len: int, max_position_embeddings: int) -> None:
    """Refuse packed rows longer than the model's context (see `config.seq_len_problem`)."""
    problem = seq_len_problem(seq_len, max_position_embeddings)
    if problem:
        raise ValueError(problem)


def _load_tokenizer(tokenizer_dir: str) -> Any:
    """The Hugging Face tokenizer in `tokenizer_dir`; a directory without one is a config error."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError, TypeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"--config.data.tokenizer_dir={tokenizer_dir}: not a loadable Hugging Face tokenizer ({first_line})"
        ) from error


def _check_resumed_separator(workdir: Path, tokenizer_record: dict[str, Any]) -> None:
    """Refuse a resume whose tokenizer gives the separator another id or vocabulary than the latest
    readable checkpoint was trained with, before any data is read. A step whose metadata cannot be
    read is left to the restore, which walks past it and names it (`Trainer._restore_latest`)."""
    for step in reversed(committed_steps(Path(workdir))):
        try:
            stored = read_checkpoint_metadata(Path(workdir) / "checkpoints" / str(step)).get("tokenizer")
        except Exception:  # noqa: BLE001 - damaged: reported by the restore, which checks the separator again
            continue
        check_same_separator(stored, tokenizer_record, step, Path(workdir))
        return


@contextlib.contextmanager
def run_directory_lock(workdir: Path, tool: str = "prm_jax.training") -> Iterator[None]:
    """Hold the training run directory's lock (`prm_jax.run_lock`): a second run on it is refused.

    Every process of one multi-host job writes the same workdir (Orbax saves), so the job takes
    one lock: process 0 takes it, and every process learns whether it got it (a broadcast from
    process 0), so a refused job stops on every host with the same message before anything is
    written, instead of its other processes hanging in their first collective.
    """
    with contextlib.ExitStack() as stack:
        failure: Exception | None = None
        if jax.process_index() == 0:
            try:
                stack.enter_context(workdir_lock(workdir, tool))
            except Exception as error:  # noqa: BLE001 - any failure (a file as workdir, EACCES, ENOSPC) stops every process
                failure = error
        refusal = str(failure) if failure is not None else ""
        if jax.process_count() > 1:
            # Every process waits for this broadcast, so process 0 reaches it whatever happened.
            refusal = _from_process_0(f"{type(failure).__name__}: {refusal or 'failed'}" if failure else "")
        if failure is not None:
            raise failure
        if refusal:
            raise RunLockedError(f"process 0 could not lock {workdir}: {refusal}")
        yield


def _from_process_0(text: str, size: int = 4096) -> str:
    """Process 0's `text` on every process (a collective)."""
    from jax.experimental import multihost_utils

    data = np.zeros(size, dtype=np.uint8)
    encoded = text.encode("utf-8")[:size]
    data[: len(encoded)] = np.frombuffer(encoded, dtype=np.uint8)
    received = np.asarray(multihost_utils.broadcast_one_to_all(data))
    return bytes(received.astype(np.uint8)).rstrip(b"\0").decode("utf-8", errors="replace")


def train_from_config(config: ml_collections.ConfigDict, workdir: Path) -> TrainResult:
    """Train `config` in `workdir` (a new run, or the resume of the run it holds), holding the
    workdir's lock throughout (`run_directory_lock`)."""
    workdir = Path(workdir)
    with run_directory_lock(workdir):
        return _train(config, workdir)


def _train(config: ml_collections.ConfigDict, workdir: Path) -> TrainResult:
    # Everything is checked before anything is read in bulk, compiled or written into the workdir.
    check_config(config, device_count=jax.device_count())
    for warning in config_warnings(config):
        _log.warning("%s", warning)
    train_file, tokenizer_dir = config.data.train_file, config.data.tokenizer_dir
    tokenizer = _load_tokenizer(tokenizer_dir)
    model_config = training_model_config(config)
    check_seq_len(int(config.data.seq_len), model_config.max_position_embeddings)
    run_record = check_resume_config(config, workdir, write=False)  # refuse a changed resume before reading data
    tokenizer_record = None
    if config.objective == "prm":
        tokenizer, tokenizer_record = prepare_run_tokenizer(tokenizer, config.data.separator, workdir, save=False)
        model_config = training_model_config(config, tokenizer_record)  # room for an added separator
        _check_resumed_separator(workdir, tokenizer_record)  # before the run's tokenizer is replaced
    if len(tokenizer) > model_config.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer_dir} has {len(tokenizer)} tokens but the model's embedding has "
            f"{model_config.vocab_size} rows"
        )
    tokenize_config = TokenizeConfig(
        max_length=int(config.data.seq_len),
        soft_labels=bool(config.data.soft_labels),
        drop_after_first_error=bool(config.data.drop_after_first_error),
        negative_threshold=float(config.data.negative_threshold),
        overlong=config.data.overlong,
        separator=config.data.separator,
    )
    load = load_prm_examples if config.objective == "prm" else load_sft_examples
    train_examples, train_stats = load(train_file, tokenizer, tokenize_config)
    if not train_examples:
        raise ValueError(f"{train_file}: no usable training examples ({train_stats})")
    pipeline_config = PipelineConfig(
        seq_len=int(config.data.seq_len),
        rows_per_batch=int(config.train.global_batch_rows),
        seed=int(config.seed),
        shuffle=bool(config.data.shuffle),
        num_epochs=None,
        packing=bool(config.data.packing),
        max_segments_per_row=int(config.model.max_segments_per_row),
    )
    eval_batches = None
    if config.data.eval_file:
        eval_examples, _ = load(config.data.eval_file, tokenizer, tokenize_config)
        eval_batches = build_eval_batches(
            eval_examples, dataclasses.replace(pipeline_config, shuffle=False, num_epochs=1)
        )
    stats = {f"train_{k}": v for k, v in dataclasses.asdict(train_stats).items()}
    _log.info("training data: %s", stats)

    def write_records(resumed_step: int | None) -> None:
        # Inputs are valid and the run's state restored (or fresh): only now does the workdir get its
        # record and tokenizer, so a failed restore never leaves a rewritten config.json behind.
        check_resume_config(config, workdir, write=jax.process_index() == 0, current=run_record)
        if tokenizer_record is not None:
            _save_tokenizer(tokenizer, Path(tokenizer_record["dir"]))

    trainer = Trainer(config, workdir, tokenizer_record=tokenizer_record)
    try:
        return trainer.run(
            build_train_iterator(train_examples, pipeline_config), eval_batches, stats, on_start=write_records
        )
    finally:
        trainer.close()
