"""From a config to a finished run: tokenizer, data, iterators, Trainer."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import ml_collections

from prm_jax.data.pipeline import (
    PipelineConfig,
    build_eval_batches,
    build_train_iterator,
    load_prm_examples,
    load_sft_examples,
)
from prm_jax.data.tokenize import TokenizeConfig
from prm_jax.models.config import ModelConfig
from prm_jax.tokenization import prepare_step_separator
from prm_jax.training.losses import PRM_LOSSES
from prm_jax.training.trainer import Trainer, TrainResult, training_model_config, write_run_config

_log = logging.getLogger(__name__)


def _require(value: str, field: str, hint: str = "") -> str:
    if not value:
        raise ValueError(f"config field {field} is required{': ' + hint if hint else ''}")
    return value


#: Where a run keeps the tokenizer it trains with (beside `checkpoints/`); exports default to it.
RUN_TOKENIZER_DIR = "prm_tokenizer"


def _save_tokenizer(tokenizer: Any, target: Path) -> None:
    """Save to a temporary directory, then swap it in: a killed run never leaves half a tokenizer."""
    if jax.process_index() != 0:
        return
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer.save_pretrained(str(staging))
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


def prepare_run_tokenizer(
    tokenizer: Any, separator: str, model_config: ModelConfig, workdir: Path, source: str
) -> tuple[Any, dict[str, Any]]:
    """The separator-bearing tokenizer a PRM run trains with, saved in the run, and its record.

    The separator follows `prepare_step_separator` (the same convention the export applies): as
    is when it is already one token, id 151651 on a Qwen2.5 vocabulary, else a new special token,
    which must fall inside the model's (padded) embedding.
    """
    tokenizer, step_separator = prepare_step_separator(tokenizer, separator)
    if step_separator.token_id >= model_config.vocab_size:
        raise ValueError(
            f"tokenizer {source}: the step separator {separator!r} was added as id "
            f"{step_separator.token_id}, outside the model's {model_config.vocab_size} embedding rows; "
            "train from a base whose embedding has spare (padded) rows, or add the separator to the "
            "tokenizer and resize the base's embeddings before converting it"
        )
    target = Path(workdir).absolute() / RUN_TOKENIZER_DIR
    _save_tokenizer(tokenizer, target)
    _log.info(
        "step separator %r is token id %d (%s); tokenizer saved to %s",
        separator, step_separator.token_id, step_separator.origin, target,
    )
    return tokenizer, {**step_separator.to_json_dict(), "dir": str(target)}


def check_seq_len(seq_len: int, max_position_embeddings: int) -> None:
    """Refuse packed rows longer than the model's context: one example may fill a row, and its
    positions past ``max_position_embeddings`` were never trained (the released model does not
    support them either)."""
    if seq_len > max_position_embeddings:
        raise ValueError(
            f"data.seq_len={seq_len} exceeds the model's max_position_embeddings={max_position_embeddings}: "
            f"a single example could reach position {seq_len - 1}; set --config.data.seq_len<={max_position_embeddings} "
            "(and raise train.global_batch_rows to keep the tokens per step)"
        )


def train_from_config(config: ml_collections.ConfigDict, workdir: Path) -> TrainResult:
    from transformers import AutoTokenizer

    workdir = Path(workdir)
    train_file = _require(config.data.train_file, "data.train_file")
    tokenizer_dir = _require(config.data.tokenizer_dir, "data.tokenizer_dir", "a Hugging Face tokenizer directory")
    write_run_config(config, workdir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model_config = training_model_config(config)
    check_seq_len(int(config.data.seq_len), model_config.max_position_embeddings)
    loss = str(config.train.get("loss", "cross_entropy"))
    if loss not in PRM_LOSSES or (config.objective != "prm" and loss != "cross_entropy"):
        raise ValueError(f"train.loss={loss!r} with objective={config.objective!r}: choose one of {PRM_LOSSES} (prm only)")
    tokenizer_record = None
    if config.objective == "prm":
        tokenizer, tokenizer_record = prepare_run_tokenizer(
            tokenizer, config.data.separator, model_config, workdir, tokenizer_dir
        )
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
    )
    eval_batches = None
    if config.data.eval_file:
        eval_examples, _ = load(config.data.eval_file, tokenizer, tokenize_config)
        eval_batches = build_eval_batches(eval_examples, dataclasses.replace(pipeline_config, shuffle=False, num_epochs=1))
    stats = {f"train_{k}": v for k, v in dataclasses.asdict(train_stats).items()}
    _log.info("training data: %s", stats)
    trainer = Trainer(config, workdir, tokenizer_record=tokenizer_record)
    try:
        return trainer.run(build_train_iterator(train_examples, pipeline_config), eval_batches, stats)
    finally:
        trainer.close()
