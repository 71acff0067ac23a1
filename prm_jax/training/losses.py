"""Objectives as pure functions returning *sums*, so that gradient accumulation, packing and
multi-host batches all normalise by the same total weight (the global count of supervised
positions) and give exactly the loss of the whole batch at once."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prm_jax.sharding import logical_constraint

PRM_LOSSES = ("cross_entropy", "mse")


def prm_loss_sums(
    step_logits: jax.Array, labels: jax.Array, loss_mask: jax.Array, loss: str = "cross_entropy"
) -> dict[str, jax.Array]:
    """The step head's loss at supervised positions against p = probability that the step is
    correct (0/1 for hard labels, anything in [0, 1] for soft labels).

    `cross_entropy`: against `[1 - p, p]` (plain two-class cross-entropy for hard labels).
    `mse`: `(softmax(logits)[1] - p)^2`, the regression the paper used for soft labels.
    """
    if loss not in PRM_LOSSES:
        raise ValueError(f"loss={loss!r}; choose one of {PRM_LOSSES}")
    log_probs = jax.nn.log_softmax(step_logits.astype(jnp.float32), axis=-1)
    p = labels.astype(jnp.float32)
    if loss == "mse":
        token_loss = jnp.square(jnp.exp(log_probs[..., 1]) - p)
    else:
        token_loss = -(p * log_probs[..., 1] + (1.0 - p) * log_probs[..., 0])
    weight = loss_mask.astype(jnp.float32)
    supervised = weight > 0
    predicted_ok = log_probs[..., 1] >= log_probs[..., 0]
    correct = (predicted_ok == (p >= 0.5)) & supervised
    return {
        "loss_sum": jnp.sum(jnp.where(supervised, token_loss * weight, 0.0)),
        "weight": jnp.sum(weight),
        "correct": jnp.sum(correct.astype(jnp.float32)),
    }


def lm_loss_sums(lm_logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> dict[str, jax.Array]:
    """Next-token cross-entropy at supervised positions (targets are already shifted)."""
    log_probs = jax.nn.log_softmax(lm_logits.astype(jnp.float32), axis=-1)
    target_log_probs = jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    weight = loss_mask.astype(jnp.float32)
    supervised = weight > 0
    correct = (jnp.argmax(log_probs, axis=-1) == targets) & supervised
    return {
        "loss_sum": jnp.sum(jnp.where(supervised, -target_log_probs * weight, 0.0)),
        "weight": jnp.sum(weight),
        "correct": jnp.sum(correct.astype(jnp.float32)),
    }


def chunked_lm_loss_sums(
    hidden: jax.Array,
    head_weight: jax.Array,
    targets: jax.Array,
    loss_mask: jax.Array,
    *,
    chunk_tokens: int,
    vocab_major: bool = False,
) -> dict[str, jax.Array]:
    """`lm_loss_sums` of `hidden @ head_weight` without ever holding the [B, T, V] logits.

    The positions are cut into chunks of `chunk_tokens` positions of every row (the last chunk
    padded, unsupervised) and scanned; each chunk's fp32 logits are made, reduced to the three sums
    and dropped, and `jax.checkpoint` makes the backward pass recompute them chunk by chunk instead
    of storing them. Peak logits memory is rows x `chunk_tokens` x V per chunk instead of
    rows x T x V. Chunks take the same positions of every row (not consecutive tokens of the
    flattened batch), so a batch sharded over devices stays sharded: each device scans its rows.

    `hidden` [B, T, E] is the final hidden state in the compute dtype; `head_weight` the LM head
    in the parameter dtype, [E, V] (`lm_head` kernel) or [V, E] with `vocab_major` (the tied
    embedding), cast per chunk as `Transformer.lm_logits` casts it, so its gradient accumulates over
    chunks in the parameter dtype. Equals `lm_loss_sums(model.lm_logits(hidden), ...)` up to float
    summation order.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
    rows, length = targets.shape
    chunk = min(chunk_tokens, length)
    count = -(-length // chunk)
    pad = count * chunk - length

    def chunks(x: jax.Array) -> jax.Array:  # [B, T, ...] -> [count, B, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x
        return jnp.swapaxes(x.reshape(rows, count, chunk, *x.shape[2:]), 0, 1)

    @jax.checkpoint
    def chunk_sums(weight: jax.Array, h: jax.Array, t: jax.Array, m: jax.Array) -> dict[str, jax.Array]:
        equation = "bte,ve->btv" if vocab_major else "bte,ev->btv"
        logits = jnp.einsum(equation, h, weight.astype(h.dtype))
        logits = logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))
        return lm_loss_sums(logits.astype(jnp.float32), t, m)

    def step(totals: dict[str, jax.Array], xs: tuple[jax.Array, ...]) -> tuple[dict[str, jax.Array], None]:
        sums = chunk_sums(head_weight, *xs)
        return jax.tree.map(jnp.add, totals, sums), None

    zeros = {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "weight", "correct")}
    totals, _ = jax.lax.scan(step, zeros, (chunks(hidden), chunks(targets), chunks(loss_mask)))
    return totals
