"""Streaming safetensors writer/reader: byte-exact round trips, HF-compatible sharding, clear errors."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file
from safetensors.torch import load_file as torch_load_file

from prm_jax.conversion.safetensors_io import (
    INDEX_NAME,
    SINGLE_FILE_NAME,
    SafetensorsCheckpoint,
    TensorSpec,
    numpy_dtype,
    safetensors_dtype,
    write_safetensors,
)


def _mixed_arrays() -> dict[str, np.ndarray]:
    """Mixed dtypes with odd sizes, so a misaligned or mis-sized layout would corrupt neighbours."""
    rng = np.random.default_rng(0)
    return {
        "f32.odd": rng.standard_normal((3, 5, 7)).astype(np.float32),
        "bf16.vec": rng.standard_normal((13,)).astype(ml_dtypes.bfloat16),
        "f16.mat": rng.standard_normal((3, 3)).astype(np.float16),
        "i64": rng.integers(-(2**40), 2**40, size=(5,), dtype=np.int64),
        "i32": rng.integers(-100, 100, size=(2, 3), dtype=np.int32),
        "u8": rng.integers(0, 255, size=(7,), dtype=np.uint8),
        "bool": rng.random((3, 1)) > 0.5,
        "scalar": np.array(3.25, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=ml_dtypes.bfloat16),
        "f64": rng.standard_normal((1, 2)).astype(np.float64),
    }


def _specs(arrays: dict[str, np.ndarray]) -> list[TensorSpec]:
    return [TensorSpec(name, a.shape, a.dtype) for name, a in arrays.items()]


def _assert_same(actual: np.ndarray, expected: np.ndarray, name: str) -> None:
    assert actual.shape == expected.shape, name
    assert actual.dtype == expected.dtype, name
    # Compare bytes: exact, and NaN-safe for float formats.
    assert actual.tobytes() == expected.tobytes(), name


def test_tensor_spec_normalises_and_counts_bytes() -> None:
    spec = TensorSpec("w", [2, 3], "float32")
    assert spec.shape == (2, 3) and spec.dtype == np.dtype(np.float32)
    assert spec.nbytes == 24
    assert TensorSpec("b", (4,), ml_dtypes.bfloat16).nbytes == 8
    assert TensorSpec("s", (), np.float16).nbytes == 2
    assert TensorSpec("e", (0, 9), np.float32).nbytes == 0
    with pytest.raises(ValueError, match="negative"):
        TensorSpec("bad", (-1,), np.float32)


def test_dtype_tables_round_trip() -> None:
    for tag in ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3"]:
        assert safetensors_dtype(numpy_dtype(tag)) == tag
    assert numpy_dtype("BF16") == np.dtype(ml_dtypes.bfloat16)
    with pytest.raises(ValueError, match="C64"):
        numpy_dtype("C64")
    with pytest.raises(ValueError, match="complex64"):
        safetensors_dtype(np.complex64)


def test_round_trip_matches_safetensors_library(tmp_path: Path) -> None:
    arrays = _mixed_arrays()
    written = write_safetensors(tmp_path, _specs(arrays), arrays.__getitem__)
    assert written == [tmp_path / SINGLE_FILE_NAME]
    assert not (tmp_path / INDEX_NAME).exists()

    loaded = load_file(str(tmp_path / SINGLE_FILE_NAME))
    assert set(loaded) == set(arrays)
    for name, expected in arrays.items():
        _assert_same(loaded[name], expected, name)

    with safe_open(str(tmp_path / SINGLE_FILE_NAME), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        assert f.get_slice("f32.odd").get_shape() == [3, 5, 7]
        assert f.get_slice("bf16.vec").get_dtype() == "BF16"
        assert f.get_slice("scalar").get_shape() == []

    # torch builds typed views on the mapped bytes, so it also checks per-tensor alignment.
    as_torch = torch_load_file(str(tmp_path / SINGLE_FILE_NAME))
    assert as_torch["bf16.vec"].dtype == torch.bfloat16
    np.testing.assert_array_equal(as_torch["bf16.vec"].float().numpy(), arrays["bf16.vec"].astype(np.float32))
    assert as_torch["scalar"].shape == () and as_torch["empty"].shape == (0, 4)


def test_header_layout_is_aligned(tmp_path: Path) -> None:
    arrays = _mixed_arrays()
    write_safetensors(tmp_path, _specs(arrays), arrays.__getitem__)
    raw = (tmp_path / SINGLE_FILE_NAME).read_bytes()
    (header_size,) = struct.unpack("<Q", raw[:8])
    assert (8 + header_size) % 8 == 0
    header = json.loads(raw[8 : 8 + header_size])
    assert header.pop("__metadata__") == {"format": "pt"}
    spans = sorted(tuple(entry["data_offsets"]) for entry in header.values())
    # Back to back from 0 to the end of the file: the format forbids gaps.
    assert spans[0][0] == 0 and spans[-1][1] == len(raw) - 8 - header_size
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    for name, entry in header.items():
        assert entry["data_offsets"][0] % arrays[name].dtype.itemsize == 0, name


def test_fp8_round_trip(tmp_path: Path) -> None:
    values = np.array([0.5, -1.0, 2.0, 448.0], dtype=ml_dtypes.float8_e4m3fn)
    write_safetensors(tmp_path, [TensorSpec("q", values.shape, values.dtype)], {"q": values}.get)
    with SafetensorsCheckpoint(tmp_path) as ckpt:
        _assert_same(ckpt.get("q"), values, "q")
    as_torch = torch_load_file(str(tmp_path / SINGLE_FILE_NAME))["q"]
    assert as_torch.dtype == torch.float8_e4m3fn
    np.testing.assert_array_equal(as_torch.float().numpy(), values.astype(np.float32))


def test_get_tensor_called_once_in_order_and_file_appears_only_when_complete(tmp_path: Path) -> None:
    arrays = _mixed_arrays()
    calls: list[str] = []

    def get_tensor(name: str) -> np.ndarray:
        calls.append(name)
        # Atomic write: the final name must not exist while the file is still being filled.
        assert not (tmp_path / SINGLE_FILE_NAME).exists()
        return arrays[name]

    write_safetensors(tmp_path, _specs(arrays), get_tensor)
    assert calls == list(arrays)
    assert sorted(p.name for p in tmp_path.iterdir()) == [SINGLE_FILE_NAME]


def test_custom_metadata_keeps_format(tmp_path: Path) -> None:
    a = np.ones((2,), np.float32)
    write_safetensors(tmp_path, [TensorSpec("a", a.shape, a.dtype)], {"a": a}.get, metadata={"source": "prm-jax"})
    with safe_open(str(tmp_path / SINGLE_FILE_NAME), framework="numpy") as f:
        assert f.metadata() == {"source": "prm-jax", "format": "pt"}


def test_shard_plan_is_greedy_in_order(tmp_path: Path) -> None:
    sizes = {"a": 4, "b": 4, "c": 4, "d": 4, "big": 25, "e": 2}  # float32 element counts
    arrays = {n: np.arange(k, dtype=np.float32) + i for i, (n, k) in enumerate(sizes.items())}
    # 64-byte shards: a..d fill the first exactly (64 is not > 64), big (100 B) gets its own,
    # e starts a third.
    written = write_safetensors(tmp_path, _specs(arrays), arrays.__getitem__, max_shard_bytes=64)
    names = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert [p.name for p in written] == names
    assert not (tmp_path / SINGLE_FILE_NAME).exists()
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in arrays.values())
    assert index["weight_map"] == {
        "a": names[0],
        "b": names[0],
        "c": names[0],
        "d": names[0],
        "big": names[1],
        "e": names[2],
    }
    for name, expected in arrays.items():
        _assert_same(load_file(str(tmp_path / index["weight_map"][name]))[name], expected, name)


def test_rewrite_removes_stale_files_of_other_layout(tmp_path: Path) -> None:
    arrays = _mixed_arrays()
    write_safetensors(tmp_path, _specs(arrays), arrays.__getitem__, max_shard_bytes=64)
    (tmp_path / "config.json").write_text("{}")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    write_safetensors(tmp_path, _specs(arrays), arrays.__getitem__)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", SINGLE_FILE_NAME]
    write_safetensors(tmp_path, _specs(arrays), arrays.__getitem__, max_shard_bytes=200)
    assert not (tmp_path / SINGLE_FILE_NAME).exists()
    assert (tmp_path / "config.json").exists()


def test_reader_single_and_sharded(tmp_path: Path) -> None:
    arrays = _mixed_arrays()
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    write_safetensors(single, _specs(arrays), arrays.__getitem__)
    write_safetensors(sharded, _specs(arrays), arrays.__getitem__, max_shard_bytes=100)
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    for directory in (single, sharded):
        with SafetensorsCheckpoint(directory) as ckpt:
            assert ckpt.names() == sorted(arrays)
            assert len(ckpt) == len(arrays) and "i64" in ckpt and "nope" not in ckpt
            for name, expected in arrays.items():
                assert ckpt.spec(name) == TensorSpec(name, expected.shape, expected.dtype)
                got = ckpt.get(name)
                _assert_same(got, expected, name)
                assert got.flags.c_contiguous
            assert ckpt.metadata() == {"format": "pt"}
            with pytest.raises(KeyError, match="nope"):
                ckpt.spec("nope")


def test_reader_reads_files_written_by_safetensors_library(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    arrays = _mixed_arrays()
    save_file(arrays, str(tmp_path / SINGLE_FILE_NAME), metadata={"format": "pt"})
    with SafetensorsCheckpoint(tmp_path) as ckpt:
        for name, expected in arrays.items():
            _assert_same(ckpt.get(name), expected, name)


def test_sharded_output_loads_in_transformers(tmp_path: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():  # default init leaves biases at 0 and norms at 1: make them distinct
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    state = {k: v.detach().view(torch.int16).numpy().view(ml_dtypes.bfloat16) for k, v in model.state_dict().items()}
    specs = [TensorSpec(k, v.shape, v.dtype) for k, v in state.items()]
    config.save_pretrained(tmp_path)
    written = write_safetensors(tmp_path, specs, state.__getitem__, max_shard_bytes=16 * 1024)
    assert len(written) > 2 and (tmp_path / INDEX_NAME).exists()

    loaded = Qwen2ForCausalLM.from_pretrained(tmp_path)
    loaded_state = loaded.state_dict()
    assert set(loaded_state) == set(state)
    for name, tensor in model.state_dict().items():
        # bf16 -> f32 (4.x default load dtype) is exact, so compare in f32.
        assert torch.equal(loaded_state[name].float(), tensor.float()), name


def test_get_tensor_shape_mismatch_names_tensor(tmp_path: Path) -> None:
    spec = TensorSpec("layer.w", (2, 3), np.float32)
    with pytest.raises(ValueError, match=r"layer\.w.*\(3, 2\).*\(2, 3\)"):
        write_safetensors(tmp_path, [spec], lambda _: np.zeros((3, 2), np.float32))
    assert list(tmp_path.iterdir()) == []  # the temporary file is cleaned up


def test_get_tensor_dtype_mismatch_names_tensor(tmp_path: Path) -> None:
    spec = TensorSpec("layer.b", (4,), ml_dtypes.bfloat16)
    with pytest.raises(ValueError, match=r"layer\.b.*float32.*bfloat16"):
        write_safetensors(tmp_path, [spec], lambda _: np.zeros((4,), np.float32))
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_bad_specs_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="duplicate"):
        write_safetensors(tmp_path, [TensorSpec("a", (1,), np.float32)] * 2, lambda _: None)
    with pytest.raises(ValueError, match="complex64"):
        write_safetensors(tmp_path, [TensorSpec("c", (1,), np.complex64)], lambda _: None)
    with pytest.raises(TypeError, match="str -> str"):
        write_safetensors(tmp_path, [TensorSpec("a", (1,), np.float32)], lambda _: None, metadata={"step": 3})  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


def test_reader_missing_shard(tmp_path: Path) -> None:
    arrays = _mixed_arrays()
    write_safetensors(tmp_path, _specs(arrays), arrays.__getitem__, max_shard_bytes=100)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        SafetensorsCheckpoint(tmp_path)


def test_reader_tensor_missing_from_its_shard(tmp_path: Path) -> None:
    arrays = _mixed_arrays()
    write_safetensors(tmp_path, _specs(arrays), arrays.__getitem__, max_shard_bytes=100)
    index_path = tmp_path / INDEX_NAME
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    wrong = next(s for s in shards if s != index["weight_map"]["i64"])
    index["weight_map"]["i64"] = wrong
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"'i64'.*{wrong}"):
        SafetensorsCheckpoint(tmp_path)


def test_reader_without_safetensors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        SafetensorsCheckpoint(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(FileNotFoundError, match=r"\.bin checkpoints are not supported"):
        SafetensorsCheckpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SafetensorsCheckpoint(tmp_path / "absent")
