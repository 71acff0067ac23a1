"""From a config to a finished run: tokenizer, data, iterators, Trainer."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import ml_collections

from prm_jax.data.pipeline import (
    PipelineConfig,
    build_eval_batches,
    build_train_iterator,
    load_prm_examples,
    load_sft_examples,
)
from prm_jax.data.tokenize import TokenizeConfig
from prm_jax.training.trainer import Trainer, TrainResult, training_model_config, write_run_config

_log = logging.getLogger(__name__)


def _require(value: str, field: str, hint: str = "") -> str:
    if not value:
        raise ValueError(f"config field {field} is required{': ' + hint if hint else ''}")
    return value


def train_from_config(config: ml_collections.ConfigDict, workdir: Path) -> TrainResult:
    from transformers import AutoTokenizer

    workdir = Path(workdir)
    train_file = _require(config.data.train_file, "data.train_file")
    tokenizer_dir = _require(config.data.tokenizer_dir, "data.tokenizer_dir", "a Hugging Face tokenizer directory")
    write_run_config(config, workdir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model_config = training_model_config(config)
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
    trainer = Trainer(config, workdir)
    try:
        return trainer.run(build_train_iterator(train_examples, pipeline_config), eval_batches, stats)
    finally:
        trainer.close()
