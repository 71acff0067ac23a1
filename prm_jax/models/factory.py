"""Building models: abstract (shapes only), freshly initialised and sharded, or from arrays."""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
from flax import nnx
from jax.sharding import Mesh

from prm_jax.models.config import ModelConfig
from prm_jax.models.transformer import Transformer
from prm_jax.sharding import LogicalAxisRules, state_shardings

ParamPath = tuple[str | int, ...]


def abstract_model(config: ModelConfig) -> Transformer:
    """The model with `jax.ShapeDtypeStruct` leaves: no memory, no compute."""
    return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))


@functools.lru_cache(maxsize=8)
def abstract_param_state(config: ModelConfig) -> nnx.State:
    """The abstract Param state for a config, cached: treat it as read-only.

    Streaming export restores one tensor at a time; rebuilding the abstract model per tensor made
    it O(tensors x layers).
    """
    return nnx.state(abstract_model(config), nnx.Param)


def param_specs(config: ModelConfig) -> list[tuple[ParamPath, jax.ShapeDtypeStruct]]:
    """(path, shape/dtype) of every parameter of a model with this config (cached state)."""
    return [(tuple(p), v.get_value()) for p, v in nnx.to_flat_state(abstract_param_state(config))]


def create_model(
    config: ModelConfig,
    *,
    seed: int = 0,
    mesh: Mesh | None = None,
    rules: LogicalAxisRules | None = None,
) -> Transformer:
    """A freshly initialised model whose parameters are created already sharded on `mesh`."""
    if mesh is None:
        return Transformer(config, rngs=nnx.Rngs(seed))
    graphdef, abstract_state = nnx.split(abstract_model(config))
    shardings = state_shardings(abstract_state, mesh, rules)

    @jax.jit
    def init() -> nnx.State:
        state = nnx.state(Transformer(config, rngs=nnx.Rngs(seed)))
        return jax.lax.with_sharding_constraint(state, shardings)

    with jax.set_mesh(mesh):
        state = init()
    return nnx.merge(graphdef, state)


def flat_params(model: Transformer) -> dict[ParamPath, jax.Array]:
    """{parameter path: array} of a model (the inverse of `model_from_arrays`)."""
    return {tuple(path): var.get_value() for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def model_from_arrays(
    config: ModelConfig,
    arrays: Mapping[ParamPath, Any],
    *,
    mesh: Mesh | None = None,
    rules: LogicalAxisRules | None = None,
) -> Transformer:
    """Assembles a model from host or device arrays keyed by parameter path.

    Every parameter must be present with its exact shape; values are cast to the config's
    parameter dtype and placed with their sharding (one device when `mesh` is None).
    """
    graphdef, abstract_state = nnx.split(abstract_model(config))
    flat = nnx.to_flat_state(abstract_state)
    expected = {tuple(p) for p, _ in flat}
    missing = sorted(".".join(map(str, p)) for p in expected - set(arrays))
    extra = sorted(".".join(map(str, p)) for p in set(arrays) - expected)
    if missing or extra:
        raise ValueError(f"parameter set mismatch: missing {missing}, unexpected {extra}")
    if mesh is not None:
        shardings = dict(nnx.to_flat_state(state_shardings(abstract_state, mesh, rules)))
    leaves = []
    for path, variable in flat:
        path = tuple(path)
        target = variable.get_value()
        value = arrays[path]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"{'.'.join(map(str, path))}: shape {tuple(value.shape)} != expected {tuple(target.shape)}"
            )
        value = value.astype(target.dtype)
        if mesh is None:
            placed = jax.device_put(value)
        else:
            sharding = shardings[path]
            sharding = sharding.get_value() if isinstance(sharding, nnx.Variable) else sharding
            placed = jax.device_put(value, sharding)
        leaves.append((path, variable.replace(placed)))
    state = nnx.from_flat_state(leaves)
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------- params trees
#
# Training and checkpoints handle parameters as plain nested dicts with string keys
# ("model" -> "layers" -> "0" -> ...), the on-disk layout; these two functions move between that
# tree and a Transformer (cheap: they only rewire references, also under jit tracing).


def params_to_tree(flat: Mapping[ParamPath, Any]) -> dict[str, Any]:
    """{(model, layers, 0, ...): leaf} -> nested dicts with string keys (the on-disk layout)."""
    tree: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(str(key), {})
        node[str(path[-1])] = leaf
    return tree


def tree_to_params(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(tree_to_params(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat


def params_tree(model: Transformer) -> dict[str, Any]:
    return params_to_tree(flat_params(model))


def model_from_params_tree(graphdef: nnx.GraphDef, abstract_state: nnx.State, tree: Mapping[str, Any]) -> Transformer:
    """Rebuilds a model from `nnx.split(abstract_model(config))` and a params tree."""
    leaves = []
    for path, variable in nnx.to_flat_state(abstract_state):
        node: Any = tree
        for key in path:
            node = node[str(key)]
        leaves.append((tuple(path), variable.replace(node)))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))
