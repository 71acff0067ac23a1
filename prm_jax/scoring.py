"""Step scoring of a few solutions: problem + steps -> one reward per step.

For interactive use (the README's example) and as the plain reference the parity tests compare
with: one batch as given, on one device. Evaluation sets (thousands of solutions of very
different lengths, on a mesh) go through `prm_jax.evaluation.scorer.BatchedScorer`, which reads
the same step head at the same separators. Inputs are built by `tokenization.build_prm_input`
(chat layout, separator after each step). Batches are right-padded to a multiple of
`pad_to_multiple` tokens, with rows rounded up to a power of two, so repeated calls reuse a
handful of compiled shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prm_jax.models.transformer import Transformer, step_rewards
from prm_jax.tokenization import STEP_SEPARATOR, PRMInput, build_prm_input


@nnx.jit
def _rewards_at_all_positions(model: Transformer, input_ids: jax.Array, segment_ids: jax.Array) -> jax.Array:
    return step_rewards(model.step_logits(model(input_ids, segment_ids)))


def score_prm_inputs(
    model: Transformer, inputs: Sequence[PRMInput], *, pad_to_multiple: int = 64, pad_id: int = 0
) -> list[list[float]]:
    """Rewards at each input's separator positions, for a batch of prepared inputs."""
    if not inputs:
        return []
    longest = max(len(x.input_ids) for x in inputs)
    length = int(np.ceil(longest / pad_to_multiple) * pad_to_multiple)
    rows = 1 << (len(inputs) - 1).bit_length()  # rows bucketed to a power of two as well
    ids = np.full((rows, length), pad_id, dtype=np.int32)
    segments = np.zeros((rows, length), dtype=np.int32)
    for row, x in enumerate(inputs):
        ids[row, : len(x.input_ids)] = x.input_ids
        segments[row, : len(x.input_ids)] = 1
    rewards = np.asarray(_rewards_at_all_positions(model, jnp.asarray(ids), jnp.asarray(segments)))
    return [[float(rewards[row, p]) for p in x.separator_positions] for row, x in enumerate(inputs)]


def score_steps(
    model: Transformer, tokenizer, problem: str, steps: Sequence[str], *, separator: str = STEP_SEPARATOR
) -> list[float]:
    """One reward (probability that the step is correct) per step."""
    return score_prm_inputs(model, [build_prm_input(tokenizer, problem, steps, separator=separator)])[0]
