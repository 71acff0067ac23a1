"""Logical axis rules, meshes and sharded initialisation on several CPU devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.nnx.traversals import flatten_mapping
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tiny_assets import tiny_model_config

from prm_jax.models.factory import create_model, params_of
from prm_jax.sharding import logical_to_partition_spec, make_mesh

CONFIG = tiny_model_config()


def test_make_mesh_fills_free_axis_and_validates() -> None:
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="needs 8 devices"):
        make_mesh({"fsdp": 4, "tensor": 2})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        make_mesh({"model": 4})


def test_indivisible_dimension_is_replicated() -> None:
    mesh = make_mesh({"tensor": 4})
    assert logical_to_partition_spec(("embed", "heads", "head_dim"), (32, 4, 8), mesh) == P(None, "tensor", None)
    # 2 KV heads cannot split 4 ways: replicate rather than fail.
    assert logical_to_partition_spec(("embed", "kv_heads", "head_dim"), (32, 2, 8), mesh) == P(None, None, None)


def test_mesh_axis_used_once_per_array() -> None:
    mesh = make_mesh({"fsdp": 2, "tensor": 2})
    rules = (("a", "fsdp"), ("b", ("fsdp", "tensor")))
    assert logical_to_partition_spec(("a", "b"), (4, 4), mesh, rules) == P("fsdp", "tensor")


def test_sharded_init_matches_single_device_and_forward_agrees() -> None:
    mesh = make_mesh({"fsdp": 2, "tensor": 2})
    sharded = create_model(CONFIG, seed=3, mesh=mesh)
    single = create_model(CONFIG, seed=3)
    params_s, params_1 = flatten_mapping(params_of(sharded)), flatten_mapping(params_of(single))
    q = params_s[("model", "layers", "self_attn", "q_proj", "kernel")]  # [layers, embed, heads, head_dim]
    assert q.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "fsdp", "tensor", None)), 4)
    assert len(q.sharding.device_set) == 4
    # Same values up to float rounding (jitted vs eager initialiser arithmetic).
    for path, value in params_1.items():
        np.testing.assert_allclose(
            np.asarray(params_s[path]), np.asarray(value), rtol=1e-6, atol=1e-8, err_msg=str(path)
        )
    ids = jnp.asarray(np.arange(16, dtype=np.int32).reshape(2, 8) % 64)
    with jax.set_mesh(mesh):
        hidden_s = np.asarray(sharded.step_logits(sharded(ids)))
    hidden_1 = np.asarray(single.step_logits(single(ids)))
    np.testing.assert_allclose(hidden_s, hidden_1, atol=1e-5)
