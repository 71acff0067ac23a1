"""AdamW with warmup + cosine/linear decay and global-norm clipping (optax)."""

from __future__ import annotations

import dataclasses

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """The `optimizer` section of the training config plus `total_steps` (`train.num_steps`).

    No field has a default here: the training config tree (`prm_jax.training.config`) states them
    once, and the trainer builds this from it.

    Attributes:
        end_learning_rate_ratio: Final learning rate as a fraction of the peak.
        schedule: "cosine", "linear" or "constant", after the linear warmup.
        grad_clip_norm: Global-norm clipping; 0 disables it (the config checks refuse a negative norm).
    """

    learning_rate: float
    end_learning_rate_ratio: float
    warmup_steps: int
    total_steps: int
    schedule: str
    b1: float
    b2: float
    eps: float
    weight_decay: float
    grad_clip_norm: float


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.end_learning_rate_ratio
    decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_learning_rate_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif cfg.schedule == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f"schedule={cfg.schedule!r}; choose cosine, linear or constant")
    if cfg.warmup_steps <= 0:
        return decay
    warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def _decay_mask(params):
    """No weight decay on biases and norm scales (by name: q/k/v biases are 2-D)."""

    def decays(path, _leaf) -> bool:
        name = str(getattr(path[-1], "key", path[-1]))
        parent = str(getattr(path[-2], "key", "")) if len(path) > 1 else ""
        return not (name.endswith("bias") or (name == "weight" and "norm" in parent))

    return jax.tree_util.tree_map_with_path(decays, params)


def build_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    parts = []
    if cfg.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    parts.append(
        optax.adamw(
            learning_rate_schedule(cfg),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=_decay_mask,
        )
    )
    return optax.chain(*parts)
