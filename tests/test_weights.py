"""The one weight loader: checks named per tensor on HF and Orbax sources, layout-1 checkpoints,
and training from an HF directory equal to training from its conversion."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flax.nnx.traversals import flatten_mapping, unflatten_mapping
from hf_models import per_layer_params, random_causal_lm, restore_model, save_hf, save_raw_checkpoint
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file
from tiny_assets import tiny_config

from prm_jax import checkpoint
from prm_jax.conversion.hf_checkpoint import hf_to_orbax, orbax_to_hf
from prm_jax.conversion.safetensors_io import TensorSpec, write_safetensors
from prm_jax.models.factory import params_of
from prm_jax.sharding import make_mesh
from prm_jax.weights import ConversionError, load_model, load_weights, read_config


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """A tiny HF causal LM and its Orbax conversion (fresh PRM head, seed 5)."""
    root = tmp_path_factory.mktemp("weights")
    hf = save_hf(random_causal_lm(vocab_size=404, seed=3), root / "hf")
    hf_to_orbax(hf, root / "orbax", seed=5)
    return {"root": root, "hf": hf, "orbax": root / "orbax"}


def _flat(params) -> dict[tuple, np.ndarray]:
    return {k: np.asarray(v) for k, v in flatten_mapping(params).items()}


def test_hf_and_orbax_load_the_same_parameters(sources) -> None:
    """An HF directory loads (fresh head from the seed) exactly as its conversion restores, sharded."""
    config = read_config(sources["orbax"])
    mesh = make_mesh({"fsdp": 2, "tensor": 2})
    from_hf = load_weights(sources["hf"], config, mesh=mesh, fresh_heads_seed=5)
    from_orbax = load_weights(sources["orbax"], config, mesh=mesh)
    a, b = _flat(from_hf), _flat(from_orbax)
    assert a.keys() == b.keys() and any(p[0] == "score" for p in a) and any(p[0] == "lm_head" for p in a)
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=str(path))
    q = flatten_mapping(from_hf)[("model", "layers", "self_attn", "q_proj", "kernel")]  # built layer by layer
    assert len(q.sharding.device_set) == 4 and tuple(q.sharding.spec) == (None, "fsdp", "tensor", None)


def _write_hf(src: Path, dst: Path, tensors: dict[str, np.ndarray]) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    write_safetensors(dst, [TensorSpec(k, v.shape, v.dtype) for k, v in tensors.items()], tensors.__getitem__)
    return dst


def test_hf_problems_are_all_named_with_their_file(sources, tmp_path) -> None:
    tensors = load_file(sources["hf"] / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.9.extra.weight"] = np.zeros(3, np.float32)
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int32)
    bad = _write_hf(sources["hf"], tmp_path / "bad", tensors)
    with pytest.raises(ConversionError) as info:
        load_weights(bad, read_config(bad, with_prm_head=False))
    message = str(info.value)
    for needle in (
        "missing tensor(s) ['model.layers.1.mlp.up_proj.weight']",
        "unexpected tensor(s) ['model.layers.9.extra.weight'] in model.safetensors",
        "tensor model.layers.0.self_attn.k_proj.weight: shape (8, 32) in checkpoint, expected (16, 32) "
        "(model.safetensors)",
        "tensor model.norm.weight (model.safetensors): dtype int32",
    ):
        assert needle in message, message
    assert message.startswith(str(bad))


def test_a_missing_head_needs_a_seed(sources) -> None:
    """A causal LM loaded as a PRM: its head is missing unless the caller asks for a fresh one."""
    config = read_config(sources["hf"])
    with pytest.raises(ConversionError, match=r"missing tensor\(s\) \['score.0.bias', 'score.0.weight'"):
        load_weights(sources["hf"], config)


def test_a_head_the_source_declares_is_never_replaced_by_a_fresh_one(sources, tmp_path) -> None:
    """A causal LM that lost its (untied) lm_head.weight is refused even with a seed for fresh heads;
    a PRM checkpoint carrying an lm_head.weight (which a PRM does not have) is refused too."""
    tensors = load_file(sources["hf"] / "model.safetensors")
    assert "lm_head.weight" in tensors  # the fixture's causal LM has an untied LM head
    lost = dict(tensors)
    del lost["lm_head.weight"]
    with pytest.raises(ConversionError, match=r"missing tensor\(s\) \['lm_head.weight'\]"):
        hf_to_orbax(_write_hf(sources["hf"], tmp_path / "lost", lost), tmp_path / "lost_orbax", seed=5)
    assert not (tmp_path / "lost_orbax").exists()
    prm = save_hf_prm(sources, tmp_path / "prm")
    stray = {**load_file(prm / "model.safetensors"), "lm_head.weight": tensors["lm_head.weight"]}
    stray_dir = _write_hf(prm, tmp_path / "stray", stray)
    with pytest.raises(ConversionError, match=r"unexpected tensor\(s\) \['lm_head.weight'\]"):
        hf_to_orbax(stray_dir, tmp_path / "stray_orbax")


def save_hf_prm(sources: dict[str, Path], out: Path) -> Path:
    """The fixture's Orbax conversion exported as a Qwen2ForProcessRewardModel directory (fp32)."""
    return orbax_to_hf(sources["orbax"], out, dtype="float32")


def test_orbax_problems_are_all_named(sources, tmp_path) -> None:
    flat = _flat(checkpoint.restore_params(sources["orbax"], as_numpy=True))
    del flat[("model", "layers", "mlp", "up_proj", "kernel")]
    flat[("model", "layers", "extra")] = np.zeros(3, np.float32)
    flat[("model", "layers", "self_attn", "k_proj", "kernel")] = np.zeros((2, 32, 1, 8), np.float32)
    flat[("model", "norm", "weight")] = flat[("model", "norm", "weight")].astype(np.int32)
    metadata = checkpoint.read_checkpoint_metadata(sources["orbax"])
    bad = save_raw_checkpoint(tmp_path / "bad", unflatten_mapping(flat), metadata)
    with pytest.raises(ConversionError) as info:
        load_weights(bad, read_config(bad))
    message = str(info.value)
    for needle in (
        "missing tensor(s) ['model.layers.mlp.up_proj.kernel']",
        "unexpected tensor(s) ['model.layers.extra'] in params",
        "tensor model.layers.self_attn.k_proj.kernel: shape (2, 32, 1, 8) in checkpoint, expected (2, 32, 2, 8)",
        "tensor model.norm.weight (params): dtype int32",
    ):
        assert needle in message, message


def _layout_1(tree):
    """Today's tree under layout-1 names: `{"q_proj": {"kernel": k, "bias": b}}` was `{"q_kernel": k, "q_bias": b}`."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and str(key).endswith("_proj"):
            out.update({f"{key.removesuffix('_proj')}_{leaf}": v for leaf, v in value.items()})
        else:
            out[str(key)] = _layout_1(value) if isinstance(value, dict) else value
    return out


@pytest.mark.parametrize("layout", [1, 2])
def test_per_layer_checkpoints_still_restore(sources, tmp_path, layout) -> None:
    """Layouts 1 (`q_kernel` names) and 2 (HF names) kept one tensor per layer: they restore
    stacked, through every reader (restore, partial restore, load onto a mesh, export)."""
    expected = _flat(checkpoint.restore_params(sources["orbax"], as_numpy=True))
    old_tree = unflatten_mapping(per_layer_params(expected))
    if layout == 1:
        old_tree = _layout_1(old_tree)
        assert "q_kernel" in old_tree["model"]["layers"]["0"]["self_attn"]
        assert "gate_kernel" in old_tree["model"]["layers"]["1"]["mlp"]
    metadata = {**checkpoint.read_checkpoint_metadata(sources["orbax"]), "layout_version": layout, "scan_layers": False}
    old = save_raw_checkpoint(tmp_path / "old", old_tree, metadata)
    assert checkpoint.LAYOUT_VERSION == 3 and checkpoint.read_checkpoint_metadata(old)["layout_version"] == layout
    restored = _flat(params_of(restore_model(old)))
    assert restored.keys() == expected.keys()
    for path, value in restored.items():
        np.testing.assert_array_equal(value, expected[path], err_msg=str(path))
    path = ("model", "layers", "self_attn", "q_proj", "bias")
    got = _flat(checkpoint.restore_params(old, paths=[path], as_numpy=True))
    np.testing.assert_array_equal(got[path], expected[path])
    model = load_model(old, head="prm", mesh=make_mesh({"fsdp": 4}))
    gate = model.model.layers.mlp.gate_proj.kernel[...]
    assert gate.sharding.is_equivalent_to(NamedSharding(gate.sharding.mesh, P(None, "fsdp", None)), 3)
    np.testing.assert_array_equal(np.asarray(gate), expected[("model", "layers", "mlp", "gate_proj", "kernel")])
    exported, old_export = orbax_to_hf(sources["orbax"], tmp_path / "new_hf"), orbax_to_hf(old, tmp_path / "old_hf")
    new_tensors, old_tensors = load_file(exported / "model.safetensors"), load_file(old_export / "model.safetensors")
    assert new_tensors.keys() == old_tensors.keys()
    for name in new_tensors:
        np.testing.assert_array_equal(old_tensors[name], new_tensors[name], err_msg=name)


def test_training_inits_from_an_hf_directory_as_from_its_conversion(sources, tmp_path) -> None:
    """`model.init_from` takes the HF directory itself: the same parameters, source dtype and
    checks as training from its `hf_to_orbax` conversion with the run's seed."""
    from prm_jax.training.config import validate
    from prm_jax.training.trainer import Trainer

    hf_to_orbax(sources["hf"], tmp_path / "converted", seed=123)
    runs = {}
    for name, init_from in (("hf", sources["hf"]), ("orbax", tmp_path / "converted")):
        config = tiny_config(**{"model.init_from": str(init_from), "seed": 123})
        assert not [p for p in validate(config, device_count=4) if "init_from" in p]
        trainer = Trainer(config, tmp_path / name)
        try:
            runs[name] = (_flat(trainer._fresh_params()), trainer.source_dtype, trainer.model_config)
        finally:
            trainer.close()
    (hf, hf_dtype, hf_config), (orbax, orbax_dtype, orbax_config) = runs["hf"], runs["orbax"]
    assert hf_config == orbax_config and hf_dtype == orbax_dtype == "float32"
    assert hf.keys() == orbax.keys() and ("lm_head", "kernel") not in hf and ("score", "out_bias") in hf
    for path in hf:
        np.testing.assert_array_equal(hf[path], orbax[path], err_msg=str(path))
    source = load_file(sources["hf"] / "model.safetensors")
    np.testing.assert_array_equal(
        hf[("model", "layers", "mlp", "up_proj", "kernel")][1], source["model.layers.1.mlp.up_proj.weight"].T
    )
    assert json.loads((sources["hf"] / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
