"""Growing a model's vocabulary: one rule for training from a base and for export.

A PRM needs its step separator as one token. When a tokenizer lacks it, the separator becomes a new
token at the end of the vocabulary (`prm_jax.tokenization.prepare_step_separator`), and a base whose
embedding has no spare (padded) row for that id must grow. The embedding is padded to a multiple of
`VOCAB_ROW_MULTIPLE` rows (as Qwen's 151,936 rows are) so sharded vocab axes keep dividing, and new
rows start at the mean of the existing rows: transformers' `resize_token_embeddings` default, a
neutral starting point that training then moves.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from prm_jax.models.config import ModelConfig
from prm_jax.models.factory import ParamPath, abstract_param_state
from prm_jax.sharding import logical_axes_of

VOCAB_ROW_MULTIPLE = 64

__all__ = ["VOCAB_ROW_MULTIPLE", "padded_vocab_size", "vocab_axes", "grow_vocab_axis"]


def padded_vocab_size(vocab_size: int, needed: int) -> int:
    """Rows an embedding of `vocab_size` rows needs to hold token ids `< needed`: unchanged when it
    already does (resize only when needed), else `needed` rounded up to `VOCAB_ROW_MULTIPLE`."""
    if needed <= vocab_size:
        return vocab_size
    return int(math.ceil(needed / VOCAB_ROW_MULTIPLE) * VOCAB_ROW_MULTIPLE)


def vocab_axes(config: ModelConfig) -> dict[ParamPath, int]:
    """{parameter path: axis} of every parameter indexed by token id (the embedding, an untied LM
    head), read from the parameters' logical axis names so a new vocab-indexed parameter is covered."""
    axes: dict[ParamPath, int] = {}
    for path, variable in nnx.to_flat_state(abstract_param_state(config)):
        names = logical_axes_of(variable) or ()
        if "vocab" in names:
            axes[tuple(path)] = list(names).index("vocab")
    return axes


def grow_vocab_axis(value: Any, vocab_size: int, axis: int) -> Any:
    """`value` (numpy or jax) with `axis` grown to `vocab_size` entries set to the mean of the
    existing ones (computed in float32, stored in `value`'s dtype)."""
    xp = np if isinstance(value, np.ndarray) else jnp
    extra = vocab_size - value.shape[axis]
    if extra < 0:
        raise ValueError(f"cannot shrink a vocabulary axis of {value.shape[axis]} entries to {vocab_size}")
    mean = xp.mean(value.astype(np.float32), axis=axis, keepdims=True).astype(value.dtype)
    shape = list(value.shape)
    shape[axis] = extra
    return xp.concatenate([value, xp.broadcast_to(mean, tuple(shape))], axis=axis)
