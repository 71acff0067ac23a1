"""Training and evaluation input pipelines: shuffle, pack, batch.

Built on grain's `MapDataset`/`IterDataset` so that the training iterator is resumable: its
state (`grain.DatasetIterator.get_state`) is a small JSON-serialisable dict that is saved
with each checkpoint, and after `grain.DatasetIterator.set_state` the iterator yields
exactly the batches an uninterrupted run would have (the order is a pure function of the seed,
the epoch and the position, and the packer re-packs deterministically). grain iterators also
implement Orbax's checkpointable API, so the trainer can save them next to the model.

Order of operations for training:

1. A seeded permutation of all examples per epoch (grain's index shuffle, reseeded each epoch so
   epochs differ), computed lazily from the index: nothing is materialised.
2. First-fit packing into rows of `seq_len` tokens (`prm_jax.data.packing`).
3. Batching to `rows_per_batch` rows: the global batch.

Every process of a multi-process run builds the same global batches (the order is a pure
function of the seed) and places only the rows its devices hold (`prm_jax.training.trainer`),
so the processes never disagree on a batch nor on when a finite run ends.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from os import PathLike
from typing import TYPE_CHECKING

import grain
import numpy as np

from prm_jax.data.packing import example_features, pack_rows, stack_rows
from prm_jax.data.records import DataError, iter_prm_records_with_lines, iter_sft_records_with_lines
from prm_jax.data.tokenize import (
    Example,
    TokenizeConfig,
    TokenizeStats,
    char_cap,
    check_separator,
    tokenize_prm,
    tokenize_sft,
)

if TYPE_CHECKING:  # transformers is heavy to import; only type checkers need it here.
    from transformers import PreTrainedTokenizerBase

__all__ = ["PipelineConfig", "build_train_iterator", "build_eval_batches", "load_prm_examples", "load_sft_examples"]

Batch = dict[str, np.ndarray]

#: grain reads in-memory examples fastest on the calling thread (its docs recommend 0 threads
#: for data already in memory: worker threads would only contend for the GIL).
_IN_MEMORY = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


@dataclass(frozen=True)
class PipelineConfig:
    """Batching and shuffling of token examples.

    Attributes:
        seq_len: Tokens per row; every example must fit (`TokenizeConfig.max_length <= seq_len`).
        rows_per_batch: Rows per (global) batch.
        seed: Shuffle seed, in `[0, 2**32)`; epoch `e` uses the permutation of `seed + e`.
        shuffle: Shuffle the examples (per epoch). Without it every epoch is in file order.
        num_epochs: Passes over the data; `None` repeats forever.
        packing: Pack several examples per row; `False` puts one example per row.
        drop_remainder: Drop a final incomplete batch of a finite run; otherwise it is padded
            with empty rows to `rows_per_batch`.
        num_packing_bins: Rows open at once in the first-fit packer (default
            `rows_per_batch`); more bins pack tighter but delay examples longer.
        max_segments_per_row: At most this many examples in one row (the model's
            `max_segments_per_row`, a static limit of the packed cuDNN kernel); None: no cap.
    """

    seq_len: int
    rows_per_batch: int
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    packing: bool = True
    drop_remainder: bool = True
    num_packing_bins: int | None = None
    max_segments_per_row: int | None = None

    def __post_init__(self) -> None:
        """Reject settings that would silently misbehave."""
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {self.seq_len}")
        if self.rows_per_batch < 1:
            raise ValueError(f"rows_per_batch must be positive, got {self.rows_per_batch}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be None or >= 1, got {self.num_epochs}")
        if self.num_packing_bins is not None and self.num_packing_bins < 1:
            raise ValueError(f"num_packing_bins must be positive, got {self.num_packing_bins}")
        if self.max_segments_per_row is not None and self.max_segments_per_row < 1:
            raise ValueError(f"max_segments_per_row must be positive, got {self.max_segments_per_row}")

    @property
    def packing_bins(self) -> int:
        """The effective number of open rows in the packer."""
        return self.num_packing_bins if self.num_packing_bins is not None else self.rows_per_batch


def _check_fits(examples: Sequence[Example], seq_len: int) -> None:
    if len(examples) == 0:
        raise ValueError("no examples to build a pipeline from")
    longest = max(range(len(examples)), key=lambda k: len(examples[k]))
    if len(examples[longest]) > seq_len:
        raise ValueError(
            f"example {longest} (record {examples[longest].record_id!r}) has "
            f"{len(examples[longest])} tokens, more than seq_len={seq_len}; tokenize with "
            "TokenizeConfig.max_length <= seq_len"
        )


def _epoch_indices(n: int, cfg: PipelineConfig) -> grain.MapDataset:
    """Lazy dataset of example indices, epoch after (shuffled) epoch."""
    total = sys.maxsize if cfg.num_epochs is None else n * cfg.num_epochs
    if not cfg.shuffle:
        return grain.MapDataset.range(total).map(lambda k: k % n)
    # Index k >= n reads epoch k // n, which grain reseeds with seed + epoch.
    order = grain.MapDataset.source(range(n)).shuffle(cfg.seed)
    return grain.MapDataset.range(total).map(lambda k: int(order[k]))


def build_train_iterator(examples: Sequence[Example], cfg: PipelineConfig) -> grain.DatasetIterator:
    """A resumable iterator of training batches.

    Each batch is a dict of `[rows_per_batch, seq_len]` numpy arrays (see
    `prm_jax.data.packing.PACKED_FIELD_SPECS`). Save `iterator.get_state()` (a JSON-serialisable
    dict) with each checkpoint; `set_state` on a freshly built iterator (same examples and
    config) resumes the exact batch sequence.

    Raises:
        ValueError: No examples, or an example longer than `seq_len`.
    """
    _check_fits(examples, cfg.seq_len)
    indices = _epoch_indices(len(examples), cfg)
    features = indices.map(lambda k: example_features(examples[k])).to_iter_dataset(_IN_MEMORY)
    rows = pack_rows(
        features,
        cfg.seq_len,
        packing=cfg.packing,
        num_packing_bins=cfg.packing_bins,
        max_segments_per_row=cfg.max_segments_per_row,
    )
    batches = rows.batch(
        cfg.rows_per_batch,
        drop_remainder=cfg.drop_remainder,
        batch_fn=partial(stack_rows, rows_per_batch=cfg.rows_per_batch),
    )
    return iter(batches)


def build_eval_batches(examples: Sequence[Example], cfg: PipelineConfig) -> list[Batch]:
    """All evaluation batches: one pass, in order, nothing dropped, the last one padded with empty
    rows. `shuffle`, `num_epochs`, `seed` and `drop_remainder` are ignored."""
    _check_fits(examples, cfg.seq_len)
    features = grain.MapDataset.source(examples).map(example_features).to_iter_dataset(_IN_MEMORY)
    rows = list(
        pack_rows(
            features,
            cfg.seq_len,
            packing=cfg.packing,
            num_packing_bins=cfg.packing_bins,
            max_segments_per_row=cfg.max_segments_per_row,
        )
    )
    to_batch = partial(stack_rows, rows_per_batch=cfg.rows_per_batch)
    return [to_batch(rows[s : s + cfg.rows_per_batch]) for s in range(0, len(rows), cfg.rows_per_batch)]


def load_prm_examples(
    path: str | PathLike[str], tokenizer: PreTrainedTokenizerBase, tcfg: TokenizeConfig
) -> tuple[list[Example], TokenizeStats]:
    """Read, validate and tokenize a PRM JSONL file.

    `examples[k].example_index == k` (positions in the returned list, after records that did
    not fit were dropped), and `examples[k].record_id` is the record's `id`.

    Raises:
        ValueError: The separator is not a single token of `tokenizer`.
        DataError: An invalid record, or one that cannot be tokenized as configured (e.g. soft
            labels with `soft_labels=False`), with `file:line`.
    """
    check_separator(tokenizer, tcfg.separator)
    return _load_examples(path, iter_prm_records_with_lines(path), tokenize_prm, tokenizer, tcfg)


def load_sft_examples(
    path: str | PathLike[str], tokenizer: PreTrainedTokenizerBase, tcfg: TokenizeConfig
) -> tuple[list[Example], TokenizeStats]:
    """Read, validate and tokenize an SFT JSONL file (see `load_prm_examples`)."""
    return _load_examples(path, iter_sft_records_with_lines(path), tokenize_sft, tokenizer, tcfg)


def _load_examples(path, records_with_lines, tokenize, tokenizer, tcfg) -> tuple[list[Example], TokenizeStats]:
    """Tokenize `(line, record)` pairs in order; a record's DataError is located at path:line."""
    stats = TokenizeStats()
    examples: list[Example] = []
    if tcfg.max_chars is None:
        tcfg = dataclasses.replace(tcfg, max_chars=char_cap(tokenizer, tcfg.max_length))
    for line, record in records_with_lines:
        try:
            example = tokenize(record, tokenizer, tcfg, len(examples), stats)
        except DataError as e:
            raise e.located(path, line) from e
        if example is not None:
            examples.append(example)
    return examples, stats
