"""The jitted train and eval steps: pure functions of (params, opt_state, batch).

Parameters are the parameter tree (`models.factory`) in the parameter dtype (fp32 master
weights); the model casts them to the compute dtype inside the forward pass, so
gradients and optimizer state stay fp32. Losses are normalised by the global number of
supervised positions in the whole batch, which makes gradient accumulation exact.

The `lm` objective's loss is chunked when `lm_loss_chunk_tokens` > 0
(`losses.chunked_lm_loss_sums`): the [B, T, V] fp32 logits (9.3 GiB per copy at 16k tokens and
Qwen's 152k vocabulary) are never held whole, in the forward or the backward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from prm_jax.models.transformer import step_rewards
from prm_jax.training.losses import PRM_LOSSES, chunked_lm_loss_sums, lm_loss_sums, prm_loss_sums

Batch = dict[str, jax.Array]
OBJECTIVES = ("prm", "lm")


def _loss_sums(
    graphdef: nnx.GraphDef,
    objective: str,
    params: Any,
    batch: Batch,
    loss: str = "cross_entropy",
    lm_loss_chunk_tokens: int = 0,
):
    model = nnx.merge(graphdef, params)
    hidden = model(batch["input_ids"], batch["segment_ids"], batch["positions"])
    if objective == "prm":
        return prm_loss_sums(model.step_logits(hidden), batch["labels"], batch["loss_mask"], loss), hidden, model
    if lm_loss_chunk_tokens > 0:
        weight, vocab_major = model.lm_head_weight()
        sums = chunked_lm_loss_sums(
            hidden,
            weight,
            batch["targets"],
            batch["loss_mask"],
            chunk_tokens=lm_loss_chunk_tokens,
            vocab_major=vocab_major,
        )
        return sums, hidden, model
    return lm_loss_sums(model.lm_logits(hidden), batch["targets"], batch["loss_mask"]), hidden, model


def _check_chunk(lm_loss_chunk_tokens: int) -> None:
    if isinstance(lm_loss_chunk_tokens, bool) or not isinstance(lm_loss_chunk_tokens, int) or lm_loss_chunk_tokens < 0:
        raise ValueError(f"lm_loss_chunk_tokens={lm_loss_chunk_tokens!r} must be an integer >= 0 (0: unchunked)")


def _microbatches(batch: Batch, count: int) -> Batch:
    # Row r goes to microbatch r % count, so every microbatch keeps rows from every data shard.
    def split(x: jax.Array) -> jax.Array:
        rows = x.shape[0]
        return x.reshape(rows // count, count, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def make_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    *,
    objective: str,
    grad_accum_steps: int = 1,
    schedule: optax.Schedule | None = None,
    loss: str = "cross_entropy",
    lm_loss_chunk_tokens: int = 0,
) -> Callable[..., tuple[Any, Any, dict[str, jax.Array]]]:
    """(params, opt_state, batch, step) -> (params, opt_state, metrics); `step` (0-based update
    count) only feeds the logged learning rate, computed here so the host never waits for it.
    `loss` is the PRM objective's loss (`losses.PRM_LOSSES`); `lm_loss_chunk_tokens` > 0 chunks
    the `lm` objective's loss over that many positions of every row (0: whole logits)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}; choose one of {OBJECTIVES}")
    if loss not in PRM_LOSSES or (objective != "prm" and loss != "cross_entropy"):
        raise ValueError(f"loss={loss!r} with objective={objective!r}: choose one of {PRM_LOSSES} (prm only)")
    _check_chunk(lm_loss_chunk_tokens)

    def train_step(params, opt_state, batch: Batch, step: jax.Array | None = None):
        total_weight = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)

        def loss_fn(p, microbatch):
            sums = _loss_sums(graphdef, objective, p, microbatch, loss, lm_loss_chunk_tokens)[0]
            return sums["loss_sum"] / total_weight, sums

        grad_fn = jax.grad(loss_fn, has_aux=True)
        if grad_accum_steps == 1:
            grads, sums = grad_fn(params, batch)
        else:

            def accumulate(carry, microbatch):
                grads_acc, sums_acc = carry
                grads, sums = grad_fn(params, microbatch)
                return (jax.tree.map(jnp.add, grads_acc, grads), jax.tree.map(jnp.add, sums_acc, sums)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            zero_sums = {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "weight", "correct")}
            (grads, sums), _ = jax.lax.scan(accumulate, (zeros, zero_sums), _microbatches(batch, grad_accum_steps))
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {
            "loss": sums["loss_sum"] / total_weight,
            "accuracy": sums["correct"] / total_weight,
            "grad_norm": grad_norm,
            # Checked on the host before any checkpoint: a finite loss can still come with a
            # non-finite update, and the saved params are the updated ones.
            "param_norm": optax.tree.norm(params),
            "supervised": sums["weight"],
            "tokens": jnp.sum((batch["segment_ids"] > 0).astype(jnp.float32)),
        }
        if schedule is not None and step is not None:
            metrics["lr"] = jnp.asarray(schedule(step), jnp.float32)
        return params, opt_state, metrics

    return train_step


def make_eval_step(
    graphdef: nnx.GraphDef, *, objective: str, loss: str = "cross_entropy", lm_loss_chunk_tokens: int = 0
):
    """Loss sums plus, for the PRM objective, the step reward at every position."""
    _check_chunk(lm_loss_chunk_tokens)

    def eval_step(params, batch: Batch):
        sums, hidden, model = _loss_sums(graphdef, objective, params, batch, loss, lm_loss_chunk_tokens)
        if objective == "prm":
            rewards = step_rewards(model.step_logits(hidden))
        else:
            rewards = jnp.zeros(batch["input_ids"].shape, jnp.float32)
        return sums, rewards

    return eval_step
