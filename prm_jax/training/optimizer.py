"""AdamW with warmup + cosine/linear decay and global-norm clipping (optax)."""

from __future__ import annotations

import dataclasses

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-5
    end_learning_rate_ratio: float = 0.1  # final lr = ratio * peak
    warmup_steps: int = 0
    total_steps: int = 1000
    schedule: str = "cosine"  # cosine | linear | constant
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: float = 1.0  # <= 0 disables clipping


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
            learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
            weight_decay=cfg.weight_decay, mask=_decay_mask,
        )
    )
    return optax.chain(*parts)
