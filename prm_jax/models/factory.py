"""Building models, and the one form parameters travel in.

Parameters are the pure nested dict of a model's `nnx.Param` state,
`{"model": {"layers": {0: {"self_attn": {"q_proj": {"kernel": array}}}}}}`: what training steps,
optimizers and Orbax read and write, what the loader returns, and what `nnx.merge(graphdef,
params)` turns back into a model. `nnx.traversals.flatten_mapping(params)` views it as
`{path: leaf}`.
"""

from __future__ import annotations

import functools
from typing import Any

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
    """The abstract Param state for a config (logical axes included), cached: treat it as read-only.

    Streaming export restores one tensor at a time; rebuilding the abstract model per tensor made
    it O(tensors x layers).
    """
    return nnx.state(abstract_model(config), nnx.Param)


def abstract_params(
    config: ModelConfig, mesh: Mesh | None = None, rules: LogicalAxisRules | None = None
) -> dict[str, Any]:
    """The parameters as `jax.ShapeDtypeStruct`s in the parameter dtype, sharded for `mesh` if given."""
    state = abstract_param_state(config)
    specs = nnx.to_pure_dict(state)
    if mesh is None:
        return specs
    shardings = nnx.to_pure_dict(state_shardings(state, mesh, rules))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), specs, shardings)


def params_of(model: nnx.Module) -> dict[str, Any]:
    """The parameters of a model (or of one of its modules), sharing its arrays."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def create_model(
    config: ModelConfig, *, seed: int = 0, mesh: Mesh | None = None, rules: LogicalAxisRules | None = None
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
