"""Hugging Face tensor names and layouts of our parameters.

Names are derived from parameter paths, which read like HF names: `model.layers.0.mlp.up_proj.kernel`
is `model.layers.0.mlp.up_proj.weight` (a `kernel` or `embedding` leaf is HF's `weight`). The PRM
head is the one exception (HF's `score` is a `Sequential`, so its layers are `score.0`, `score.2`).

Layouts follow from the leaf: torch `Linear` stores `[out, in]` where our kernels are `[in, out]`,
attention kernels are head-major (`[embed, heads, head_dim]`; `o_proj` reads `[heads, head_dim]`),
and q/k/v biases are `[heads, head_dim]`. Both conversion directions, the loader and the parity
tests read this module.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from flax import nnx

from prm_jax.models.config import ModelConfig
from prm_jax.models.factory import ParamPath, abstract_params

_HEAD_NAMES = {
    ("score", "hidden_kernel"): "score.0.weight",
    ("score", "hidden_bias"): "score.0.bias",
    ("score", "out_kernel"): "score.2.weight",
    ("score", "out_bias"): "score.2.bias",
}
# Kernels whose input side spans several axes; every other kernel has one input axis.
_INPUT_AXES = {"o_proj": 2}
# Top-level modules that are heads: absent from a backbone, or from the other kind of checkpoint.
HEADS = ("score", "lm_head")


def hf_name(path: ParamPath) -> str:
    """The HF tensor name of a parameter path."""
    if path in _HEAD_NAMES:
        return _HEAD_NAMES[path]
    *modules, leaf = map(str, path)
    return ".".join([*modules, "weight" if leaf in ("kernel", "embedding") else leaf])


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    """One parameter: its path and shape, its HF name and shape, and the layout change between them."""

    path: ParamPath
    jax_shape: tuple[int, ...]

    @property
    def hf_name(self) -> str:
        return hf_name(self.path)

    @property
    def _inputs(self) -> int:
        """Leading axes that are a kernel's input side (0: not a kernel)."""
        return _INPUT_AXES.get(str(self.path[-2]), 1) if str(self.path[-1]).endswith("kernel") else 0

    @property
    def hf_shape(self) -> tuple[int, ...]:
        if self._inputs:
            n = self._inputs
            return (math.prod(self.jax_shape[n:]), math.prod(self.jax_shape[:n]))
        if str(self.path[-1]).endswith("bias"):
            return (math.prod(self.jax_shape),)
        return self.jax_shape

    @property
    def head(self) -> str | None:
        """`score` or `lm_head` for a head's parameter, else None."""
        return self.path[0] if self.path[0] in HEADS else None

    def to_jax(self, x: np.ndarray) -> np.ndarray:
        if self._inputs:
            return np.ascontiguousarray(x.T.reshape(self.jax_shape))
        return x.reshape(self.jax_shape)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        if self._inputs:
            return np.ascontiguousarray(x.reshape(math.prod(self.jax_shape[: self._inputs]), -1).T)
        return x.reshape(self.hf_shape)


def tensor_mappings(config: ModelConfig) -> list[TensorMapping]:
    """Every parameter of a model with this config, in parameter order."""
    flat = nnx.traversals.flatten_mapping(abstract_params(config))
    return [TensorMapping(path, tuple(spec.shape)) for path, spec in flat.items()]
