"""Hugging Face tensor names and layouts of our parameters.

Names are derived from parameter paths, which read like HF names: layer 3's slice of the stacked
`model.layers.mlp.up_proj.kernel` is `model.layers.3.mlp.up_proj.weight` (a `kernel` or `embedding`
leaf is HF's `weight`). The PRM head is the one exception (HF's `score` is a `Sequential`, so its
layers are `score.0`, `score.2`).

Decoder layers are stacked on a leading axis (`transformer.stacked_layers`): one parameter holds
every layer's tensor of that name, and maps to one HF tensor per layer. A `TensorMapping` is one HF
tensor: its parameter path and, for a stacked parameter, the layer.

Layouts follow from the leaf: torch `Linear` stores `[out, in]` where our kernels are `[in, out]`,
attention kernels are head-major (`[embed, heads, head_dim]`; `o_proj` reads `[heads, head_dim]`),
and q/k/v biases are `[heads, head_dim]`. Both conversion directions, the loader and the parity
tests read this module.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

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


#: Path of the stacked decoder layers: parameters under it carry a leading layer axis.
LAYERS_PATH = ("model", "layers")


def is_stacked(path: ParamPath) -> bool:
    """Whether a parameter holds every decoder layer's tensor, stacked on axis 0."""
    return tuple(map(str, path[:2])) == LAYERS_PATH


def hf_name(path: ParamPath, layer: int | None = None) -> str:
    """The HF tensor name of a parameter path (of `layer`'s slice, for a stacked parameter)."""
    if path in _HEAD_NAMES:
        return _HEAD_NAMES[path]
    *modules, leaf = map(str, path)
    if layer is not None:
        modules = [*modules[:2], str(layer), *modules[2:]]
    return ".".join([*modules, "weight" if leaf in ("kernel", "embedding") else leaf])


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    """One HF tensor: the parameter it is (a slice of), its JAX-layout shape, its HF name and
    shape, and the layout change between them. `layer` indexes a stacked parameter's axis 0."""

    path: ParamPath
    jax_shape: tuple[int, ...]
    layer: int | None = None

    @property
    def hf_name(self) -> str:
        return hf_name(self.path, self.layer)

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
    """Every HF tensor of a model with this config, in parameter order (a stacked parameter's
    layers one after another)."""
    return [m for group in param_mappings(config).values() for m in group]


def param_mappings(config: ModelConfig) -> dict[ParamPath, list[TensorMapping]]:
    """{parameter path: its HF tensors}: one for a plain parameter, one per layer for a stacked one."""
    out = {}
    for path, spec in nnx.traversals.flatten_mapping(abstract_params(config)).items():
        shape = tuple(spec.shape)
        if is_stacked(path):
            out[path] = [TensorMapping(path, shape[1:], layer) for layer in range(shape[0])]
        else:
            out[path] = [TensorMapping(path, shape)]
    return out


def params_from_hf(config: ModelConfig, get: Callable[[str], np.ndarray]) -> dict[str, Any]:
    """The whole parameter tree of `config` from an HF tensor getter (`get(hf_name)`), in memory.

    For small models (tests, benchmarks); loading a real checkpoint streams (`weights.load_weights`).
    """
    flat = {}
    for path, group in param_mappings(config).items():
        tensors = [m.to_jax(np.asarray(get(m.hf_name))) for m in group]
        flat[path] = np.stack(tensors) if is_stacked(path) else tensors[0]
    return nnx.traversals.unflatten_mapping(flat)
