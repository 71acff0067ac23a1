"""Sequence packing: several examples per fixed-length row, never split, never mixed.

PRM examples are short and vary in length (a problem plus a handful of steps: a few hundred tokens
against training rows of thousands), so one example per row would spend most of the compute on
padding. Packing places several whole examples in one row. Each example keeps its own segment id
(1..k within a row; 0 is padding) and positions that restart at 0, and the model's attention mask
never crosses segment ids (`prm_jax.models.attention`), so a packed example
computes exactly what it would alone in a row. Examples are never split across rows: a PRM label
sits at a separator whose meaning depends on the whole prefix of its example.

The packer is grain's own first-fit packer (`grain.experimental.FirstFitPackIterDataset`):
it has these semantics (whole examples, first fit, per-example segment ids and positions, custom
padding values) and a checkpointable state (it records the parent state at the start of the
current group of bins and the number of rows already emitted, and re-packs deterministically on
restore). This module only adapts examples to it and the rows it emits to the batch layout.

Batch layout (dict of numpy arrays, each `[rows, seq_len]`): see `PACKED_FIELD_SPECS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from grain.experimental import FirstFitPackIterDataset

from prm_jax.data.tokenize import Example

__all__ = [
    "PACKED_FIELD_SPECS",
    "example_features",
    "pack_rows",
    "padding_row",
    "stack_rows",
    "positions_from_segment_ids",
]

#: Every field of a packed row: name -> (dtype, padding value). `segment_ids` 0 marks padding;
#: `step_index`/`example_index` -1 mean "no step"/"no example" (0 is a valid index).
PACKED_FIELD_SPECS: dict[str, tuple[type[np.generic], int | float]] = {
    "input_ids": (np.int32, 0),
    "segment_ids": (np.int32, 0),
    "positions": (np.int32, 0),
    "loss_mask": (np.float32, 0.0),
    "labels": (np.float32, 0.0),
    "targets": (np.int32, 0),
    "step_index": (np.int32, -1),
    "example_index": (np.int32, -1),
}

#: The per-token features packed from each example (segment ids and positions are derived).
_PACKED_FEATURES = ("input_ids", "loss_mask", "labels", "targets", "step_index", "example_index")


def example_features(example: Example) -> dict[str, np.ndarray]:
    """An example as the per-token feature dict the packer consumes.

    `example_index` becomes a per-token array so that it lands, like every other field, at the
    example's positions in the packed row (and -1 in padding).
    """
    return {
        "input_ids": example.input_ids,
        "loss_mask": example.loss_mask,
        "labels": example.labels,
        "targets": example.targets,
        "step_index": example.step_index,
        "example_index": np.full(len(example), example.example_index, np.int32),
    }


def positions_from_segment_ids(segment_ids: np.ndarray) -> np.ndarray:
    """Position of each token inside its contiguous segment, restarting at 0 per segment.

    The numpy twin of `prm_jax.models.transformer.positions_from_segments` (padding, a
    segment of its own, is numbered the same way), so batches give the model the same positions
    whether or not it is passed `positions` explicitly.
    """
    segment_ids = np.asarray(segment_ids)
    length = segment_ids.shape[-1]
    index = np.broadcast_to(np.arange(length, dtype=np.int32), segment_ids.shape)
    previous = np.concatenate([segment_ids[..., :1] - 1, segment_ids[..., :-1]], axis=-1)
    starts = np.where(segment_ids != previous, index, 0)
    return (index - np.maximum.accumulate(starts, axis=-1)).astype(np.int32)


def padding_row(seq_len: int) -> dict[str, np.ndarray]:
    """A row holding no example (all padding), used to fill incomplete batches."""
    row = {name: np.full(seq_len, pad, dtype) for name, (dtype, pad) in PACKED_FIELD_SPECS.items()}
    row["positions"] = positions_from_segment_ids(row["segment_ids"])
    return row


def _finalize_row(packed: dict[str, Any]) -> dict[str, np.ndarray]:
    """grain's packed row -> our row: rename its segment ids, recompute positions, fix dtypes."""
    segment_ids = np.asarray(packed["input_ids_segment_ids"], np.int32)
    row = {
        "input_ids": packed["input_ids"],
        "segment_ids": segment_ids,
        "positions": positions_from_segment_ids(segment_ids),
        "loss_mask": packed["loss_mask"],
        "labels": packed["labels"],
        "targets": packed["targets"],
        "step_index": packed["step_index"],
        "example_index": packed["example_index"],
    }
    return {name: np.ascontiguousarray(row[name], dtype=PACKED_FIELD_SPECS[name][0]) for name in PACKED_FIELD_SPECS}


def pack_rows(
    features: grain.IterDataset,
    seq_len: int,
    *,
    packing: bool = True,
    num_packing_bins: int = 1,
    max_segments_per_row: int | None = None,
) -> grain.IterDataset:
    """Pack a stream of `example_features` dicts into rows of `seq_len` tokens.

    First fit over `num_packing_bins` open rows: each example goes to the first open row with
    room; when one fits none, all open rows are emitted (in row order) and packing restarts with
    it. More bins pack tighter but hold examples back longer (and let neighbouring epochs share
    a group of rows when iterating repeatedly). With `packing=False` each row holds exactly
    one example (one bin, at most one sequence per bin), the layout for evaluation and tests.

    `max_segments_per_row` caps the examples in one row (the packed cuDNN attention kernel has a
    static limit, `ModelConfig.max_segments_per_row`); None: no cap.

    Every example must be at most `seq_len` tokens (the packer raises otherwise).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if num_packing_bins < 1:
        raise ValueError(f"num_packing_bins must be positive, got {num_packing_bins}")
    if max_segments_per_row is not None and max_segments_per_row < 1:
        raise ValueError(f"max_segments_per_row must be positive, got {max_segments_per_row}")
    packed = FirstFitPackIterDataset(
        features,
        length_struct={name: seq_len for name in _PACKED_FEATURES},
        num_packing_bins=num_packing_bins if packing else 1,
        shuffle_bins=False,  # The examples are already shuffled; keep row order deterministic.
        # Only input_ids needs segment ids/positions; the other features just ride along.
        meta_features=[name for name in _PACKED_FEATURES if name != "input_ids"],
        padding_struct={name: PACKED_FIELD_SPECS[name][1] for name in _PACKED_FEATURES},
        max_sequences_per_bin=max_segments_per_row if packing else 1,
    )
    return packed.map(_finalize_row)


def stack_rows(rows: Sequence[dict[str, np.ndarray]], rows_per_batch: int) -> dict[str, np.ndarray]:
    """Stack rows into a `[rows_per_batch, seq_len]` batch, padding missing rows.

    A short final batch is padded rather than returned short, so every batch has the static
    shape a jitted step needs.
    """
    if not rows:
        raise ValueError("cannot stack zero rows")
    if len(rows) > rows_per_batch:
        raise ValueError(f"{len(rows)} rows do not fit a batch of {rows_per_batch}")
    seq_len = rows[0]["input_ids"].shape[0]
    filler = [padding_row(seq_len)] * (rows_per_batch - len(rows))
    return {name: np.stack([r[name] for r in [*rows, *filler]]) for name in PACKED_FIELD_SPECS}
