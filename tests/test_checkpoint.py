"""Orbax model checkpoints: metadata, cross-mesh restore, lazy writes, failure atomicity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flax.nnx.traversals import flatten_mapping, unflatten_mapping
from hf_models import restore_model
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tiny_assets import tiny_model_config

from prm_jax.checkpoint import (
    LazyTensor,
    StackedLazyTensor,
    StoredParams,
    read_checkpoint_metadata,
    read_model_config,
    restore_params,
    save_model,
    save_params,
    stored_tensors,
)
from prm_jax.models.factory import create_model, params_of
from prm_jax.sharding import make_mesh

CONFIG = tiny_model_config(eos_token_id=[3, 4])


@pytest.fixture(scope="module")
def saved_from_fsdp4(tmp_path_factory) -> tuple[Path, dict]:
    mesh = make_mesh({"fsdp": 4})
    model = create_model(CONFIG, seed=11, mesh=mesh)
    params = {k: np.asarray(v) for k, v in flatten_mapping(params_of(model)).items()}
    embedding = flatten_mapping(params_of(model))[("model", "embed_tokens", "embedding")]
    assert embedding.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "fsdp")), 2)
    directory = tmp_path_factory.mktemp("ckpt") / "model"
    save_model(directory, model, provenance={"test": "fsdp4"})
    return directory, params


def assert_one_layer_per_chunk(directory: Path) -> None:
    """Stacked layer parameters are chunked one layer per chunk on disk (a one-layer read decodes
    only that layer); the others keep Orbax's chunking."""
    stored = stored_tensors(directory)
    stacked = {path: meta for path, meta in stored.items() if path[:2] == ("model", "layers")}
    assert stacked and len(stacked) < len(stored)
    for path, meta in stacked.items():
        assert meta.storage.chunk_shape[0] == 1 and meta.shape[0] > 1, (path, meta.storage)


def test_stacked_parameters_are_stored_one_layer_per_chunk(saved_from_fsdp4, tmp_path) -> None:
    directory, expected = saved_from_fsdp4
    assert_one_layer_per_chunk(directory)  # saved from jax arrays sharded over 4 devices
    lazy = {p: LazyTensor(v.shape, v.dtype, lambda v=v: v) for p, v in expected.items() if p[:2] != ("model", "layers")}
    for path, value in expected.items():
        if path[:2] == ("model", "layers"):
            lazy[path] = StackedLazyTensor(value.shape, value.dtype, lambda i, v=value: v[i])
    save_params(tmp_path / "lazy", unflatten_mapping(lazy), CONFIG)  # the way hf_to_orbax writes
    assert_one_layer_per_chunk(tmp_path / "lazy")
    reader = StoredParams(tmp_path / "lazy")
    path = ("model", "layers", "self_attn", "k_proj", "kernel")
    np.testing.assert_array_equal(reader.read(path, 1), expected[path][1])
    np.testing.assert_array_equal(reader.read(path), expected[path])


def test_metadata_round_trip(saved_from_fsdp4) -> None:
    directory, _ = saved_from_fsdp4
    assert read_model_config(directory) == CONFIG
    meta = read_checkpoint_metadata(directory)
    assert meta["provenance"] == {"test": "fsdp4"} and meta["scan_layers"] is True and meta["layout_version"] == 3
    assert read_model_config(directory, dtype="bfloat16").dtype == "bfloat16"


@pytest.mark.parametrize("mesh_shape", [None, {"fsdp": 2, "tensor": 2}, {"data": 2, "tensor": 2}])
def test_restore_on_other_meshes_is_identical(saved_from_fsdp4, mesh_shape) -> None:
    directory, expected = saved_from_fsdp4
    mesh = make_mesh(mesh_shape, devices=None) if mesh_shape else None
    model = restore_model(directory, mesh=mesh)
    restored = flatten_mapping(params_of(model))
    assert restored.keys() == expected.keys()
    for path, value in restored.items():
        np.testing.assert_array_equal(np.asarray(value), expected[path], err_msg=str(path))
        n_devices = len(value.sharding.device_set)
        assert n_devices == (1 if mesh is None else 4)
    if mesh_shape == {"fsdp": 2, "tensor": 2}:
        q = restored[("model", "layers", "self_attn", "q_proj", "kernel")]  # [layers, embed, heads, head_dim]
        assert q.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "fsdp", "tensor", None)), 4)


def test_partial_restore_as_numpy(saved_from_fsdp4) -> None:
    directory, expected = saved_from_fsdp4
    path = ("model", "layers", "mlp", "down_proj", "kernel")
    got = flatten_mapping(restore_params(directory, paths=[path], as_numpy=True))
    assert list(got) == [path] and isinstance(got[path], np.ndarray)
    np.testing.assert_array_equal(got[path], expected[path])
    with pytest.raises(KeyError, match="no such parameters"):
        restore_params(directory, paths=[("model", "nope")])


def test_lazy_tensors_load_once_each(tmp_path, saved_from_fsdp4) -> None:
    _, expected = saved_from_fsdp4
    loads: list[tuple] = []

    def lazy(path, value):
        return LazyTensor(value.shape, value.dtype, lambda: (loads.append(path), value)[1])

    save_params(tmp_path / "lazy", unflatten_mapping({p: lazy(p, v) for p, v in expected.items()}), CONFIG)
    assert sorted(loads) == sorted(expected)
    restored = flatten_mapping(params_of(restore_model(tmp_path / "lazy")))
    for path, value in restored.items():
        np.testing.assert_array_equal(np.asarray(value), expected[path])


def test_failed_save_leaves_nothing(tmp_path, saved_from_fsdp4) -> None:
    _, expected = saved_from_fsdp4
    params = dict(expected)
    victim = ("model", "layers", "mlp", "up_proj", "kernel")

    def explode() -> np.ndarray:
        raise OSError("disk on fire")

    params[victim] = LazyTensor(expected[victim].shape, expected[victim].dtype, explode)
    with pytest.raises(Exception, match="disk on fire"):
        save_params(tmp_path / "broken", unflatten_mapping(params), CONFIG)
    assert list(tmp_path.iterdir()) == []


def test_save_rejects_wrong_parameter_set_or_shape(tmp_path, saved_from_fsdp4) -> None:
    _, expected = saved_from_fsdp4
    missing = {k: v for k, v in expected.items() if k != ("model", "norm", "weight")}
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\]"):
        save_params(tmp_path / "a", unflatten_mapping(missing), CONFIG)
    wrong = dict(expected)
    wrong[("model", "norm", "weight")] = np.zeros(31, np.float32)
    with pytest.raises(ValueError, match=r"model.norm.weight: shape \(31,\) != expected \(32,\)"):
        save_params(tmp_path / "b", unflatten_mapping(wrong), CONFIG)
    assert list(tmp_path.iterdir()) == []


def test_not_a_checkpoint(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not a prm-jax model checkpoint"):
        read_model_config(tmp_path)
