"""Loading model weights: one path from a Hugging Face directory or an Orbax checkpoint onto a mesh.

Training (`model.init_from`), evaluation, synthesis's JAX backend and `hf_to_orbax` read weights
here. A source is checked against the model it is loaded as before any tensor is read: every
tensor present (a head the source does not declare, such as a causal LM's PRM head, may be
initialised from a seed), none unknown, shapes
exact, dtypes floating point; each problem names the tensor (and its file). Every tensor read
from Hugging Face safetensors is checked finite as it streams (NaN or Inf weights are refused,
naming the tensor), and config.json must be a regular file of bounded size.

Hugging Face safetensors are streamed: each tensor is read with plain file reads (a long-lived
memory map would keep every touched page resident), relaid out for JAX, cast, placed onto the
mesh with its sharding and released, so host memory holds one tensor beyond what the devices
hold. On several hosts each process places only the shards its devices own. Orbax checkpoints
restore straight onto the target shardings.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, Sharding

from prm_jax.checkpoint import (
    CONFIG_ITEM,
    PARAMS_ITEM,
    LazyTensor,
    StackedLazyTensor,
    layer_sharding,
    on_disk_entries,
    per_layer_layout,
    read_checkpoint_metadata,
    read_model_config,
    restore_params,
    stack_on_devices,
    stored_tensors,
)
from prm_jax.conversion.hf_mapping import HEADS, TensorMapping, is_stacked, param_mappings, tensor_mappings
from prm_jax.conversion.safetensors_io import SafetensorsCheckpoint
from prm_jax.files import check_regular_file
from prm_jax.models.config import MAX_CONFIG_BYTES, ModelConfig
from prm_jax.models.factory import ParamPath, abstract_model, abstract_params, params_of
from prm_jax.models.transformer import LMHead, StepHead, Transformer
from prm_jax.sharding import LogicalAxisRules

_log = logging.getLogger(__name__)
flatten, unflatten = nnx.traversals.flatten_mapping, nnx.traversals.unflatten_mapping

EXPORT_DTYPES = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
}
#: Export dtype of checkpoints that do not record their source dtype (trained from scratch, or
#: written before it was recorded).
DEFAULT_EXPORT_DTYPE = "bfloat16"
#: Source tensor dtypes that load as weights (anything else, e.g. int32 or fp8, is refused, not cast).
_WEIGHT_DTYPES = frozenset({*EXPORT_DTYPES.values(), np.dtype(np.float64)})
# Tensors some HF checkpoints carry that hold no parameters of ours.
_IGNORABLE_SUFFIXES = (".rotary_emb.inv_freq",)
_HEAD_MODULES = {"score": StepHead, "lm_head": LMHead}
Head = Literal["prm", "lm"]


#: Elements checked finite at a time: the check's scratch memory stays small beside a huge tensor.
_FINITE_CHUNK = 1 << 24


class ConversionError(ValueError):
    """A checkpoint does not match the model it is loaded or converted as."""


def hf_config_file(directory: str | Path) -> Path:
    """`directory/config.json`, refused in one line (`files.NotRegularFileError`) when it exists but
    is a FIFO, a device or larger than `MAX_CONFIG_BYTES`: reading it would block or fill memory."""
    path = Path(directory) / "config.json"
    if os.path.lexists(path):
        check_regular_file(path, max_bytes=MAX_CONFIG_BYTES)
    return path


def hf_config(directory: str | Path, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a Hugging Face directory's config.json (checked by `hf_config_file`)."""
    return ModelConfig.from_hf_file(hf_config_file(directory), **overrides)


def checkpoint_kind(path: str | Path) -> Literal["orbax", "hf"]:
    """`"orbax"` for a prm-jax model checkpoint, `"hf"` for a directory with `config.json`."""
    path = Path(path)
    if (path / PARAMS_ITEM).is_dir() and (path / CONFIG_ITEM).is_dir():
        return "orbax"
    if hf_config_file(path).is_file():
        return "hf"
    raise FileNotFoundError(
        f"{path} is neither a prm-jax Orbax checkpoint ('{PARAMS_ITEM}/' and '{CONFIG_ITEM}/') nor a "
        "Hugging Face checkpoint (config.json)"
    )


def read_config(path: str | Path, **overrides: Any) -> ModelConfig:
    """The ModelConfig of the weights at `path` (Orbax metadata or HF config.json)."""
    if checkpoint_kind(path) == "hf":
        return hf_config(path, **overrides)
    return read_model_config(path, **overrides)


def source_dtype(path: str | Path) -> str | None:
    """The dtype of the HF weights a model comes from, an export's default (None: mixed or unknown).

    Orbax checkpoints record it; for HF it is read from the tensors, not from config.json's
    `torch_dtype`, which may disagree with them.
    """
    if checkpoint_kind(path) == "orbax":
        return read_checkpoint_metadata(path).get("source_dtype")
    with SafetensorsCheckpoint(path) as reader:
        return hf_source_dtype(reader)


def hf_source_dtype(reader: SafetensorsCheckpoint) -> str | None:
    """`source_dtype` of an HF checkpoint already open (its headers are read once)."""
    config = hf_config(reader.directory).replace(with_lm_head=True, with_prm_head=True)
    found = {reader.spec(m.hf_name).dtype for m in tensor_mappings(config) if m.hf_name in reader}
    by_dtype = {dtype: name for name, dtype in EXPORT_DTYPES.items()}
    if len(found) == 1 and next(iter(found)) in by_dtype:
        return by_dtype[next(iter(found))]
    _log.warning(
        "%s: tensors in dtypes %s; exports will default to %s",
        reader.directory,
        sorted(map(str, found)),
        DEFAULT_EXPORT_DTYPE,
    )
    return None


# ---------------------------------------------------------------------------- validation


def _check(
    source: Path,
    found: Mapping[str, tuple[tuple[int, ...], Any, str]],
    expected: Mapping[str, tuple[int, ...]],
    extra: list[str],
) -> None:
    """Raises one ConversionError naming every missing, unexpected, misshapen or non-float tensor.

    `found` maps a tensor name to (shape, dtype, file); `expected` names the tensors to load.
    """
    problems = []
    missing = sorted(set(expected) - set(found))
    if missing:
        problems.append(f"missing tensor(s) {missing}")
    if extra:
        files = sorted({found[n][2] for n in extra})
        problems.append(f"unexpected tensor(s) {sorted(extra)} in {', '.join(files)}")
    for name in sorted(set(expected) & set(found)):
        shape, dtype, file = found[name]
        if tuple(shape) != tuple(expected[name]):
            problems.append(f"tensor {name}: shape {tuple(shape)} in checkpoint, expected {expected[name]} ({file})")
        if np.dtype(dtype) not in _WEIGHT_DTYPES:
            problems.append(
                f"tensor {name} ({file}): dtype {np.dtype(dtype)} is not a floating-point weight dtype "
                f"({', '.join(sorted(map(str, _WEIGHT_DTYPES)))}); integer or quantized weights are not "
                "imported (they would be cast silently)"
            )
    if problems:
        raise ConversionError(f"{source}: " + "; ".join(problems))


def refuse_non_finite(value: np.ndarray, where: str) -> np.ndarray:
    """`value` when every element is finite, else `ConversionError` naming `where`, the count of
    NaN/Inf values and the first one's index. Checked in chunks: scratch memory stays small."""
    flat = value.reshape(-1)
    for start in range(0, flat.size, _FINITE_CHUNK):
        bad = ~np.isfinite(flat[start : start + _FINITE_CHUNK])
        if bad.any():
            first = start + int(np.argmax(bad))
            count = int(bad.sum()) + sum(
                int(np.count_nonzero(~np.isfinite(flat[i : i + _FINITE_CHUNK])))
                for i in range(start + _FINITE_CHUNK, flat.size, _FINITE_CHUNK)
            )
            index = tuple(int(i) for i in np.unravel_index(first, value.shape))
            raise ConversionError(
                f"{where}: {count} of {flat.size} values are NaN or Inf (the first, {flat[first]}, at "
                f"index {list(index)}); the weights are corrupt (or from a diverged run) and are not loaded"
            )
    return value


def _heads_of(config: ModelConfig) -> set[str]:
    return {path[0] for path in flatten(abstract_params(config))} & set(HEADS)


def _heads_to_initialise(config: ModelConfig, source: ModelConfig, seed: int | None) -> set[str]:
    """The heads `config` has that the source's own config does not declare (the PRM head of a
    causal LM): initialised from `seed` when given. A head the source declares is loaded, so a lost
    `lm_head.weight` is reported missing, never replaced by a random one."""
    return set() if seed is None else _heads_of(config) - _heads_of(source)


def _fresh_heads(config: ModelConfig, heads: set[str], seed: int | None) -> dict[ParamPath, np.ndarray]:
    """Initialises only the absent heads (the PRM head is h*h + 2h parameters), never a whole model."""
    out = {}
    for head in sorted(heads):
        _log.info("initialising %s (absent from the source) from seed %d", head, seed)
        module = _HEAD_MODULES[head](config, nnx.Rngs(seed))
        out.update({(head, *p): np.asarray(v) for p, v in flatten(params_of(module)).items()})
    return out


def hf_tensors(
    reader: SafetensorsCheckpoint, config: ModelConfig, *, fresh_heads_seed: int | None = None
) -> dict[ParamPath, LazyTensor | StackedLazyTensor]:
    """{path: lazy tensor in JAX layout and the parameter dtype} of `config` from an HF checkpoint;
    a stacked layer parameter reads its HF tensors one layer at a time.

    Checked first (`ConversionError`). A tensor of a head `config` leaves out (`lm_head` of a
    causal LM loaded as a PRM) is skipped, not unexpected.
    """
    groups = param_mappings(config)
    mappings = [m for group in groups.values() for m in group]
    # What the checkpoint itself declares: a PRM (Qwen2ForProcessRewardModel) has the step head and
    # no LM head, a causal LM the reverse; a tensor of a head it does not declare is unexpected.
    source = hf_config(reader.directory)
    source = source.replace(with_prm_head=not source.with_lm_head)
    known = {m.hf_name for m in tensor_mappings(source)}
    fresh = _heads_to_initialise(config, source, fresh_heads_seed)
    loaded = [m for m in mappings if m.head not in fresh]
    extra = [
        n
        for n in reader.names()
        if n not in known
        and not n.endswith(_IGNORABLE_SUFFIXES)
        and not (n == "lm_head.weight" and config.tie_word_embeddings)
    ]
    specs = {n: reader.spec(n) for n in reader.names()}
    found = {n: (s.shape, s.dtype, reader.file_of(n).name) for n, s in specs.items()}
    _check(reader.directory, found, {m.hf_name: m.hf_shape for m in loaded}, extra)
    dtype = np.dtype(config.parameter_dtype)

    def read(m: TensorMapping) -> np.ndarray:
        # Checked as stored (the index names the HF tensor's own element), one tensor at a time.
        value = refuse_non_finite(
            reader.get(m.hf_name), f"{reader.directory}: tensor {m.hf_name} ({reader.file_of(m.hf_name).name})"
        )
        return m.to_jax(value).astype(dtype, copy=False)

    lazy: dict[ParamPath, LazyTensor | StackedLazyTensor] = {}
    for path, group in groups.items():
        if group[0].head in fresh:
            continue
        if is_stacked(path):
            shape = (len(group), *group[0].jax_shape)
            lazy[path] = StackedLazyTensor(shape, dtype, lambda i, group=group: read(group[i]))
        else:
            lazy[path] = LazyTensor(group[0].jax_shape, dtype, lambda m=group[0]: read(m))
    for path, value in _fresh_heads(config, fresh, fresh_heads_seed).items():
        lazy[path] = LazyTensor(value.shape, dtype, lambda v=value: v)
    return lazy


def _orbax_paths(
    directory: Path, config: ModelConfig, fresh_heads_seed: int | None
) -> tuple[list[ParamPath], set[str]]:
    """(parameters to restore, heads to initialise) of `config` from an Orbax checkpoint, checked."""
    stored = stored_tensors(directory)
    per_layer = per_layer_layout(read_checkpoint_metadata(directory))
    wanted = flatten(abstract_params(config))
    source = read_model_config(directory)

    def entries(params: Mapping[ParamPath, Any]) -> dict[str, tuple[int, ...]]:
        return {
            ".".join(name): shape
            for p, spec in params.items()
            for name, shape in on_disk_entries(p, spec.shape, stored, per_layer).items()
        }

    known = entries(flatten(abstract_params(source)))
    fresh = _heads_to_initialise(config, source, fresh_heads_seed)
    loaded = [p for p in wanted if p[0] not in fresh]
    found = {".".join(k): (m.shape, m.dtype, PARAMS_ITEM) for k, m in stored.items()}
    extra = [n for n in found if n not in known]
    _check(directory, found, entries({p: wanted[p] for p in loaded}), extra)
    return loaded, fresh


# ---------------------------------------------------------------------------- loading


def _place(value: np.ndarray, sharding: Sharding | None) -> jax.Array:
    """A global array from a host value, each process filling only its addressable shards."""
    if sharding is None:
        return jax.device_put(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _place_stacked(lazy: StackedLazyTensor, sharding: Sharding | None) -> jax.Array:
    """A stacked parameter built on the devices one layer at a time: host memory holds one layer,
    the devices the stacked array plus one layer (updated in place)."""
    per_layer = layer_sharding(sharding)
    return stack_on_devices(lazy.shape, lazy.dtype, sharding, lambda i: _place(lazy.layer(i), per_layer))


def load_weights(
    path: str | Path,
    config: ModelConfig,
    *,
    mesh: Mesh | None = None,
    rules: LogicalAxisRules | None = None,
    fresh_heads_seed: int | None = None,
) -> dict[str, Any]:
    """The parameters of `config` from the HF or Orbax checkpoint at `path`, sharded on `mesh`.

    Args:
        path: A Hugging Face directory (safetensors) or a prm-jax Orbax model checkpoint.
        config: The model to load: its architecture must match the source's; its heads say which
            of the source's heads are loaded; values are cast to its `param_dtype`.
        mesh: Target mesh (one device when None); `rules` map logical axes onto it.
        fresh_heads_seed: Initialise a head `config` has and the source's config does not declare (the PRM
            head of a causal LM) from this seed; None refuses such a source.

    Returns:
        The parameter tree (`models.factory`); `nnx.merge(graphdef, params)` makes the model.
    """
    path = Path(path)
    targets = flatten(abstract_params(config, mesh, rules))
    if checkpoint_kind(path) == "hf":
        with SafetensorsCheckpoint(path) as reader:
            lazy = hf_tensors(reader, config, fresh_heads_seed=fresh_heads_seed)
            # One tensor (one layer's) at a time: read, relaid out, cast, placed; the host copy dies each turn.
            params = {
                p: _place_stacked(lazy[p], targets[p].sharding)
                if isinstance(lazy[p], StackedLazyTensor)
                else _place(lazy[p].materialize(), targets[p].sharding)
                for p in targets
            }
    else:
        paths, fresh = _orbax_paths(path, config, fresh_heads_seed)
        params = flatten(restore_params(path, config, mesh=mesh, rules=rules, paths=paths))
        for p, value in _fresh_heads(config, fresh, fresh_heads_seed).items():
            params[p] = _place(value, targets[p].sharding)
    _log.info("loaded %s (%d tensors)", path, len(params))
    return unflatten(params)


def load_model(
    path: str | Path,
    *,
    head: Head = "prm",
    mesh: Mesh | None = None,
    rules: LogicalAxisRules | None = None,
    dtype: str = "float32",
    param_dtype: str | None = None,
) -> Transformer:
    """The model at `path` (Orbax or HF) with the one head asked for, sharded on `mesh`.

    `head="prm"` needs a trained PRM head; `head="lm"` a causal LM (its `lm_head` or tied
    embedding) for generation. `dtype` is the compute dtype; `param_dtype` the storage dtype
    (default: the checkpoint's for Orbax, float32 for HF; bfloat16 halves a 7B/72B model's memory).
    """
    path = Path(path)
    kind = checkpoint_kind(path)
    stored = read_config(path)
    # An HF causal LM's config has a PRM head to initialise; only a PRM checkpoint has a trained one.
    has_prm = not stored.with_lm_head if kind == "hf" else stored.with_prm_head
    if head == "prm" and not has_prm:
        reason = "config.json's architectures name no ...ForProcessRewardModel" if kind == "hf" else "no PRM head"
        raise ConversionError(
            f"{path}: a causal LM, not a process reward model ({reason}); its PRM head would be untrained. "
            "Train or convert a PRM first."
        )
    if head == "lm" and not stored.with_lm_head:
        raise ConversionError(
            f"{path}: a process reward model has no LM head; generation (critic, policy, judge) needs a causal LM"
        )
    config = stored.replace(
        with_prm_head=head == "prm",
        with_lm_head=head == "lm",
        dtype=dtype,
        param_dtype=param_dtype or stored.param_dtype,
    )
    return nnx.merge(nnx.graphdef(abstract_model(config)), load_weights(path, config, mesh=mesh, rules=rules))


__all__ = [
    "ConversionError",
    "DEFAULT_EXPORT_DTYPE",
    "EXPORT_DTYPES",
    "MAX_CONFIG_BYTES",
    "checkpoint_kind",
    "hf_config",
    "hf_config_file",
    "hf_source_dtype",
    "hf_tensors",
    "load_model",
    "load_weights",
    "read_config",
    "refuse_non_finite",
    "source_dtype",
]
