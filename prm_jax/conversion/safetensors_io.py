"""Streaming safetensors I/O: read and write Hugging Face checkpoints one tensor at a time.

Converting a 7B/72B model between Hugging Face and Orbax must never hold the whole model in host
memory. Reading is easy: a file's header gives every tensor's shape, dtype and byte range, so
`SafetensorsCheckpoint` parses (and validates against the file size) only the headers on open,
returns shapes/dtypes for free and reads exactly one tensor per `SafetensorsCheckpoint.get`.

Writing is where the `safetensors` library does not help: its `save_file`/`save` take a whole
`{name: array}` dict, which would hold an entire shard (5 GiB by default, or a whole model when
unsharded) in memory at once. `write_safetensors` therefore writes the file format itself.
The format is simple and stable:

* 8 bytes: little-endian u64 `N`, the size of the JSON header;
* `N` bytes: a JSON object mapping each tensor name to `{"dtype", "shape", "data_offsets"}`
  (offsets relative to the start of the data section) plus an optional `"__metadata__"`
  `{str: str}`; padded with spaces so the data section starts 8-byte aligned;
* the data section: the tensors' raw little-endian C-order bytes, back to back with no gaps.

Because every tensor's offset is known from its shape and dtype alone, the header is written first
and each tensor is then requested from a callback, written at its offset, and dropped. Shards and
the `model.safetensors.index.json` follow the transformers naming, so `from_pretrained` (and
vLLM) load the output directly.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import ml_dtypes
import numpy as np

from prm_jax import jsonl
from prm_jax.files import atomic_file, atomic_write, check_regular_file, read_regular_text

__all__ = [
    "INDEX_NAME",
    "SINGLE_FILE_NAME",
    "SafetensorsCheckpoint",
    "SafetensorsFormatError",
    "TensorSpec",
    "numpy_dtype",
    "safetensors_dtype",
    "shard_file_name",
    "write_safetensors",
]

#: Weight file of an unsharded checkpoint (transformers' `SAFE_WEIGHTS_NAME`).
SINGLE_FILE_NAME: Final[str] = "model.safetensors"
#: Index of a sharded checkpoint (transformers' `SAFE_WEIGHTS_INDEX_NAME`).
INDEX_NAME: Final[str] = "model.safetensors.index.json"

# safetensors dtype tag -> numpy dtype. Sub-byte and exotic float formats that numpy/ml_dtypes
# cannot represent one element per byte-multiple are left out on purpose: their byte size is not
# shape * itemsize, and no checkpoint we convert uses them.
_ST_TO_NP: Final[dict[str, np.dtype]] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}
_NP_TO_ST: Final[dict[np.dtype, str]] = {v: k for k, v in _ST_TO_NP.items()}

_SHARD_RE: Final[re.Pattern[str]] = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_METADATA_KEY: Final[str] = "__metadata__"
_DEFAULT_MAX_SHARD_BYTES: Final[int] = 5 * 2**30


def numpy_dtype(st_dtype: str) -> np.dtype:
    """numpy dtype (ml_dtypes for bf16/fp8) of a safetensors dtype tag such as `"BF16"`."""
    try:
        return _ST_TO_NP[st_dtype]
    except KeyError:
        raise ValueError(f"unsupported safetensors dtype {st_dtype!r}; supported: {sorted(_ST_TO_NP)}") from None


def safetensors_dtype(dtype: Any) -> str:
    """safetensors dtype tag of a numpy dtype (accepts anything `np.dtype` accepts)."""
    np_dtype = np.dtype(dtype)
    try:
        return _NP_TO_ST[np_dtype]
    except KeyError:
        raise ValueError(
            f"dtype {np_dtype} cannot be stored in safetensors; supported: {sorted(str(d) for d in _NP_TO_ST)}"
        ) from None


def shard_file_name(index: int, count: int) -> str:
    """transformers' shard name, e.g. `model-00001-of-00003.safetensors` (`index` is 0-based)."""
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one tensor: everything needed to lay it out before its data exists.

    `dtype` is a numpy dtype (`ml_dtypes.bfloat16` for bf16); shapes and dtypes are normalised
    on construction so specs built from lists, jax dtypes or type objects compare equal.
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    def __post_init__(self) -> None:
        shape = tuple(int(d) for d in self.shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"tensor {self.name!r}: negative dimension in shape {shape}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "dtype", np.dtype(self.dtype))

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes (0 for a tensor with a zero-size dimension)."""
        return math.prod(self.shape) * self.dtype.itemsize


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _c_contiguous(array: np.ndarray) -> np.ndarray:
    """C-contiguous `array`, copied only if needed (np.ascontiguousarray would turn 0-d into 1-d)."""
    return array if array.flags.c_contiguous else np.array(array, order="C")


#: Largest header we parse (the safetensors library's own limit): a corrupt size field must not
#: make us read gigabytes of "header".
_MAX_HEADER_BYTES: Final[int] = 100_000_000


#: Largest `model.safetensors.index.json` read (a 72B model's is ~100 KB).
_MAX_INDEX_BYTES: Final[int] = 64 * 2**20


def _is_present(path: Path) -> bool:
    """Whether a weight file exists; one that exists but is not a regular file (a FIFO, a device)
    is refused by name (`files.NotRegularFileError`), not taken for missing."""
    if not os.path.lexists(path):
        return False
    check_regular_file(path)
    return True


class SafetensorsFormatError(ValueError):
    """A safetensors file is corrupt or truncated; the message names the file (and tensor)."""


def _check_entry(path: Path, name: str, entry: Any, data_size: int) -> None:
    """One tensor's header entry: a known dtype, a shape, offsets that match it and fit the file."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise SafetensorsFormatError(f"{where}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _ST_TO_NP:
        raise SafetensorsFormatError(f"{where}: unsupported or missing dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise SafetensorsFormatError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise SafetensorsFormatError(f"{where}: data_offsets {offsets!r} is not a [begin, end] pair of integers")
    begin, end = offsets
    expected = math.prod(shape) * _ST_TO_NP[dtype].itemsize
    if not 0 <= begin <= end or end - begin != expected:
        raise SafetensorsFormatError(
            f"{where}: data_offsets {offsets} span {end - begin} bytes, but {dtype} {shape} needs {expected}"
        )
    if end > data_size:
        raise SafetensorsFormatError(
            f"{where}: data ends at byte {end} of the data section, which holds only {data_size} bytes "
            "(truncated or corrupt file: download it again)"
        )


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse and validate a safetensors header against the file's size.

    Returns (header, byte offset of the data section). Every tensor entry is checked (dtype,
    shape, offsets consistent with both and inside the file), so a truncated or corrupt file
    fails on open with a message naming the file and the tensor, never midway through a read.
    """
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise SafetensorsFormatError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > min(_MAX_HEADER_BYTES, file_size - 8):
            raise SafetensorsFormatError(
                f"{path}: header size field says {header_size} bytes, but the file has {file_size} bytes "
                "(truncated, or not a safetensors file)"
            )
        raw = f.read(header_size)
    try:
        header = jsonl.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        why = f"{e.reason} at byte {e.start}"
        raise SafetensorsFormatError(f"{path}: header is not valid UTF-8 JSON ({why}); the file is corrupt") from None
    except json.JSONDecodeError as e:
        why = jsonl.json_problem(e)
        raise SafetensorsFormatError(f"{path}: header is not valid UTF-8 JSON ({why}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"{path}: header is not a JSON object; the file is corrupt")
    metadata = header.get(_METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsFormatError(f"{path}: {_METADATA_KEY} is not a str -> str object")
    data_start = 8 + header_size
    for name, entry in header.items():
        if name != _METADATA_KEY:
            _check_entry(path, name, entry, file_size - data_start)
    return header, data_start


class SafetensorsCheckpoint:
    """Lazy, read-only view of the safetensors weights in a Hugging Face model directory.

    Accepts an unsharded `model.safetensors` or a sharded `model.safetensors.index.json` plus
    its shards (the single file wins when both exist, as in transformers, so we read what
    `from_pretrained` would). Opening only reads headers; it validates that every shard the index
    names exists and holds the tensors the index assigns to it, so a broken download fails here with
    a precise message rather than midway through a long conversion.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
        self._headers: dict[Path, tuple[dict[str, Any], int]] = {}
        self._weight_map: dict[str, Path] = {}
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    # -- construction ----------------------------------------------------------------------

    def _open(self) -> None:
        single = self.directory / SINGLE_FILE_NAME
        index = self.directory / INDEX_NAME
        if _is_present(single):
            self._weight_map = {name: single for name in self._tensor_names(single)}
        elif _is_present(index):
            self._open_index(index)
        else:
            raise FileNotFoundError(self._missing_weights_message())

    def _open_index(self, index: Path) -> None:
        text = read_regular_text(index, max_bytes=_MAX_INDEX_BYTES)
        try:
            weight_map = jsonl.loads(text).get("weight_map")
        except json.JSONDecodeError as e:
            raise SafetensorsFormatError(
                f"{index}: {jsonl.json_problem(e)} at line {e.lineno}; the index is corrupt"
            ) from None
        except AttributeError:
            raise SafetensorsFormatError(f"{index}: not a JSON object; the index is corrupt") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map' (or it is empty)")
        by_shard: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        for shard, names in by_shard.items():
            path = self.directory / shard
            if not _is_present(path):
                raise FileNotFoundError(f"{index} references shard {shard!r}, which is missing from {self.directory}")
            present = set(self._tensor_names(path))
            for name in names:
                if name not in present:
                    raise ValueError(
                        f"{index} maps tensor {name!r} to shard {shard!r}, but that shard does not contain it"
                    )
                self._weight_map[name] = path

    def _missing_weights_message(self) -> str:
        files = sorted(p.name for p in self.directory.iterdir())
        message = f"no {SINGLE_FILE_NAME} or {INDEX_NAME} in {self.directory}; files present: {files}."
        if any(name.endswith((".bin", ".pt", ".pth")) for name in files):
            message += (
                " PyTorch .bin checkpoints are not supported (loading them means unpickling); "
                "convert the model to safetensors with transformers first, e.g. "
                "AutoModel.from_pretrained(path).save_pretrained(out, safe_serialization=True)."
            )
        return message

    def _tensor_names(self, path: Path) -> list[str]:
        return [name for name in self._header(path)[0] if name != _METADATA_KEY]

    # -- queries ---------------------------------------------------------------------------

    def names(self) -> list[str]:
        """All tensor names, sorted."""
        return sorted(self._weight_map)

    def __contains__(self, name: object) -> bool:
        return name in self._weight_map

    def __len__(self) -> int:
        return len(self._weight_map)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def file_of(self, name: str) -> Path:
        """Path of the file holding `name` (useful in error messages and for grouping reads)."""
        try:
            return self._weight_map[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in the checkpoint at {self.directory}") from None

    def spec(self, name: str) -> TensorSpec:
        """Shape and dtype of `name` from the file header; no tensor data is read."""
        entry = self._header(self.file_of(name))[0][name]
        return TensorSpec(name, tuple(entry["shape"]), numpy_dtype(entry["dtype"]))

    def get(self, name: str) -> np.ndarray:
        """Load exactly one tensor into host memory as a C-contiguous numpy array.

        The bytes are read straight into a fresh array with plain file reads rather than through
        safe_open's memory map: pages touched through a long-lived map stay resident and would
        make a streaming conversion's RSS grow to the whole checkpoint. One copy, no map.
        """
        path = self.file_of(name)
        spec = self.spec(name)
        header, data_start = self._header(path)
        begin, end = header[name]["data_offsets"]
        if end - begin != spec.nbytes:
            raise ValueError(f"{path}: tensor {name!r} spans {end - begin} bytes, expected {spec.nbytes}")
        array = np.empty(spec.shape, spec.dtype)
        buffer = memoryview(array.reshape(-1).view(np.uint8))
        with open(path, "rb", buffering=0) as f:
            f.seek(data_start + begin)
            filled = 0
            while filled < len(buffer):
                count = f.readinto(buffer[filled:])
                if not count:
                    raise SafetensorsFormatError(f"{path}: truncated file while reading tensor {name!r}")
                filled += count
        return array

    def _header(self, path: Path) -> tuple[dict[str, Any], int]:
        cached = self._headers.get(path)
        if cached is None:
            cached = self._headers[path] = _read_header(path)
        return cached

    def metadata(self) -> dict[str, str]:
        """`__metadata__` of the first weight file (shards of one checkpoint share it)."""
        if not self._weight_map:
            return {}
        first = self._weight_map[self.names()[0]]
        return dict(self._header(first)[0].get(_METADATA_KEY) or {})

    # -- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Forget the parsed headers (no file stays open between reads)."""
        self._headers = {}

    def __enter__(self) -> SafetensorsCheckpoint:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsCheckpoint({str(self.directory)!r}, {len(self)} tensors)"


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy split in the given order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    current_bytes = 0
    for spec in specs:
        if current and current_bytes + spec.nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(spec)
        current_bytes += spec.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def _layout(shard: Sequence[TensorSpec]) -> list[tuple[TensorSpec, int, int]]:
    """Byte ranges of the tensors inside a shard's data section.

    The format forbids gaps between tensors, so alignment cannot be obtained by padding. Instead
    tensors are laid out by decreasing element size (stable within a size, like the safetensors
    library does): the data section starts 8-byte aligned and every tensor's size is a multiple of
    its element size, so each tensor then starts at a multiple of its own element size. Loaders
    that build typed views straight on the memory map (torch, numpy) need that.
    """
    ordered = sorted(shard, key=lambda s: -s.dtype.itemsize)
    layout = []
    offset = 0
    for spec in ordered:
        layout.append((spec, offset, offset + spec.nbytes))
        offset += spec.nbytes
    return layout


def _encode_header(layout: Sequence[tuple[TensorSpec, int, int]], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, Any] = {_METADATA_KEY: dict(metadata)} if metadata else {}
    for spec, begin, end in layout:
        header[spec.name] = {
            "dtype": safetensors_dtype(spec.dtype),
            "shape": list(spec.shape),
            "data_offsets": [begin, end],
        }
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    encoded += b" " * (-(8 + len(encoded)) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


def _checked_array(spec: TensorSpec, value: Any) -> np.ndarray:
    """Host array for `spec` from the callback, refusing anything that would corrupt the layout."""
    array = np.asarray(value)
    if array.shape != spec.shape or array.dtype != spec.dtype:
        raise ValueError(
            f"get_tensor({spec.name!r}) returned shape {array.shape} dtype {array.dtype}, "
            f"but the spec says shape {spec.shape} dtype {spec.dtype}"
        )
    return _c_contiguous(array)


def _write_bytes(f: Any, array: np.ndarray) -> None:
    # A flat uint8 view of a contiguous array is a zero-copy buffer for every dtype, including
    # ml_dtypes ones that the buffer protocol cannot describe, and for 0-d / size-0 arrays.
    # Byte order needs no handling: _checked_array only lets native (little-endian on every
    # platform JAX supports) dtypes through, since spec dtypes come from the little-endian table.
    f.write(memoryview(array.reshape(-1).view(np.uint8)))


def _write_shard(
    path: Path,
    layout: Sequence[tuple[TensorSpec, int, int]],
    metadata: Mapping[str, str],
    order: Sequence[TensorSpec],
    get_tensor: Callable[[str], np.ndarray],
) -> None:
    header = _encode_header(layout, metadata)
    offsets = {spec.name: begin for spec, begin, _ in layout}
    data_size = layout[-1][2] if layout else 0
    with atomic_file(path, "wb") as f:
        f.write(header)
        # Request tensors in the caller's order (it may be streaming them from a source in
        # that order), writing each at its place in the data section.
        for spec in order:
            array = _checked_array(spec, get_tensor(spec.name))
            f.seek(len(header) + offsets[spec.name])
            _write_bytes(f, array)
            del array
        f.truncate(len(header) + data_size)


def write_safetensors(
    out_dir: Path,
    specs: Sequence[TensorSpec],
    get_tensor: Callable[[str], np.ndarray],
    *,
    max_shard_bytes: int = _DEFAULT_MAX_SHARD_BYTES,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write tensors as a (possibly sharded) Hugging Face safetensors checkpoint, one at a time.

    Args:
      out_dir: destination directory (created if missing).
      specs: the tensors to write, in order; shards are filled greedily in this order and
        `get_tensor` is called in this order, each name exactly once.
      get_tensor: returns the array for a name; its shape and dtype must equal the spec's
        (jax arrays are accepted and copied to host). Only one returned array is alive at a time.
      max_shard_bytes: a new shard starts when the next tensor would push the current one past
        this; a tensor bigger than the limit gets a shard of its own.
      metadata: the header's `__metadata__`; defaults to `{"format": "pt"}`. `"format"` is
        added when missing because transformers refuses safetensors files without it.

    Returns:
      The written weight files in shard order. One shard is written as `model.safetensors`;
      several as `model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json`.
      Every file goes to a temporary name first and is renamed when complete (the index last, so
      its presence means all shards are whole). Weight files and an index left in `out_dir` by a
      previous export under these standard names, but not part of this one, are removed, so a
      loader can never mix two exports.
    """
    out_dir = Path(out_dir)
    specs = list(specs)
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    seen: set[str] = set()
    for spec in specs:
        if spec.name == _METADATA_KEY:
            raise ValueError(f"{_METADATA_KEY!r} is reserved and cannot name a tensor")
        if spec.name in seen:
            raise ValueError(f"duplicate tensor name {spec.name!r}")
        seen.add(spec.name)
        safetensors_dtype(spec.dtype)  # fail before writing anything
    meta = {"format": "pt"} if metadata is None else dict(metadata)
    meta.setdefault("format", "pt")
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"safetensors metadata must be str -> str, got {key!r}: {value!r}")

    out_dir.mkdir(parents=True, exist_ok=True)
    shards = _plan_shards(specs, max_shard_bytes)
    names = [SINGLE_FILE_NAME] if len(shards) == 1 else [shard_file_name(i, len(shards)) for i in range(len(shards))]
    written: list[Path] = []
    for shard, file_name in zip(shards, names):
        path = out_dir / file_name
        _write_shard(path, _layout(shard), meta, shard, get_tensor)
        written.append(path)

    index_path = out_dir / INDEX_NAME
    if len(shards) > 1:
        weight_map = {spec.name: file_name for shard, file_name in zip(shards, names) for spec in shard}
        index = {
            "metadata": {"total_size": sum(spec.nbytes for spec in specs)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        atomic_write(index_path, json.dumps(index, indent=2) + "\n")
    else:
        index_path.unlink(missing_ok=True)
    keep = set(names)
    for stale in out_dir.iterdir():
        if stale.name in keep:
            continue
        if stale.name == SINGLE_FILE_NAME or _SHARD_RE.match(stale.name):
            stale.unlink()
    return written
