"""Objectives as pure functions returning *sums*, so that gradient accumulation, packing and
multi-host batches all normalise by the same total weight (the global count of supervised
positions) and give exactly the loss of the whole batch at once."""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
