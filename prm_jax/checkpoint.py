"""Orbax model checkpoints: parameters plus the model config as metadata.

A model checkpoint directory (what `launch.convert` writes, and what training step directories
contain) holds two Orbax items:

* `params`: the parameter tree (`models.factory`), nested dicts keyed like the parameter path
  (`model/layers/self_attn/q_proj/kernel`, ...), decoder layers stacked on a leading axis (layout 3);
* `model_config`: JSON with the `ModelConfig`, the layout version, free-form provenance and two
  facts the export needs: `source_dtype` (the dtype of the Hugging Face weights the model was
  imported from, the default export dtype) and `tokenizer` (the step separator, its id, the
  vocabulary fingerprint and the directory of the separator-bearing tokenizer a run trained with).
  Both are absent or null in checkpoints written before they existed.

Layouts 1 and 2 kept one tensor per layer (`model/layers/0/...`), and layout 1 (before parameters
took HF names) named projections `q_kernel`, `q_bias`, `gate_kernel`. Restores read those under
today's names and stack the layers onto the target devices, so older checkpoints stay readable;
`layout_version` in the metadata says which layout a checkpoint has.

Restores take `jax.ShapeDtypeStruct`s carrying the target shardings, so a checkpoint saved on one
mesh restores onto any other device count or mesh. Conversion writes parameters through
`LazyTensor` leaves that are materialised one at a time while Orbax writes them, and
`StackedLazyTensor` leaves written one layer at a time (chunked per layer on disk), so host memory
stays near the largest tensor of one layer instead of the model size. `StoredParams` reads one
stored tensor, or one layer of a stacked one, straight from TensorStore for the streaming export.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from orbax.checkpoint import type_handlers

# Orbax's own TensorStore specs and OCDBT process layout, for writing a stacked tensor one layer
# at a time and reading one layer back (its public API reads and writes whole arrays only).
from orbax.checkpoint._src.multihost import multihost
from orbax.checkpoint._src.serialization import ocdbt_utils, types
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from prm_jax.conversion.hf_mapping import is_stacked
from prm_jax.files import staged_directory
from prm_jax.models.config import ModelConfig
from prm_jax.models.factory import ParamPath, abstract_params, params_of
from prm_jax.models.transformer import Transformer
from prm_jax.sharding import MESH_AXES, LogicalAxisRules

PARAMS_ITEM = "params"
CONFIG_ITEM = "model_config"
# Bump when the parameter tree layout changes. 2: HF-named projections; 3: stacked (scanned) layers.
LAYOUT_VERSION = 3
_PER_LAYER_LAYOUTS = (1, 2)
_READABLE_LAYOUTS = (*_PER_LAYER_LAYOUTS, LAYOUT_VERSION)


# ---------------------------------------------------------------------------- lazy leaves


class _LazyArrayShape:
    """`size` and `ndim` from `shape`: what Orbax asks of a leaf before it writes it."""

    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclasses.dataclass(frozen=True, eq=False)
class LazyTensor(_LazyArrayShape):
    """A checkpoint leaf whose value is produced only when Orbax writes it."""

    shape: tuple[int, ...]
    dtype: np.dtype
    load: Callable[[], np.ndarray]

    def materialize(self) -> np.ndarray:
        value = np.asarray(self.load())
        if tuple(value.shape) != tuple(self.shape) or value.dtype != np.dtype(self.dtype):
            raise ValueError(
                f"lazy tensor produced shape {value.shape} dtype {value.dtype}, "
                f"declared {self.shape} {np.dtype(self.dtype)}"
            )
        return value


class _LazyTensorHandler(type_handlers.NumpyHandler):
    """Writes `LazyTensor`s as ordinary numpy arrays, loading and writing one at a time.

    The stock NumpyHandler deep-copies every value of a save up front and writes them
    concurrently, which needs the whole model in memory. On disk the result is identical to a
    numpy save (same typestr), so restores need nothing special.
    """

    def __init__(self) -> None:
        super().__init__(deepcopy_host_arrays=False)

    async def _background_serialize(self, values, infos, args=None):  # type: ignore[override]
        args = args or [ocp.SaveArgs()] * len(values)
        for lazy, info, arg in zip(values, infos, args):
            value = lazy.materialize()
            await super()._background_serialize([value], [info], [arg])
            del value


def _register_lazy_tensor_handler() -> None:
    # Orbax logs a "collision on np.ndarray" warning because we share the numpy typestr on
    # purpose (see _LazyTensorHandler); keep import quiet.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        type_handlers.register_type_handler(LazyTensor, _LazyTensorHandler(), override=True)
        type_handlers.register_type_handler(StackedLazyTensor, _StackedLazyTensorHandler(), override=True)
    finally:
        absl_logger.setLevel(level)


@dataclasses.dataclass(frozen=True, eq=False)
class StackedLazyTensor(_LazyArrayShape):
    """A stacked-layers checkpoint leaf ([layers, ...]) produced one layer at a time while Orbax
    writes it: `load_layer(i)` gives layer i's tensor (shape `shape[1:]`)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    load_layer: Callable[[int], np.ndarray]

    def layer(self, index: int) -> np.ndarray:
        value = np.asarray(self.load_layer(index))
        if tuple(value.shape) != tuple(self.shape[1:]) or value.dtype != np.dtype(self.dtype):
            raise ValueError(
                f"layer {index} of a lazy stacked tensor is shape {value.shape} dtype {value.dtype}, "
                f"declared {self.shape[1:]} {np.dtype(self.dtype)}"
            )
        return value


class _StackedLazyTensorHandler(type_handlers.NumpyHandler):
    """Writes `StackedLazyTensor`s as ordinary numpy arrays chunked one layer per chunk, loading
    and writing one layer at a time (the stock handler would need the whole stacked tensor)."""

    def __init__(self) -> None:
        super().__init__(deepcopy_host_arrays=False)

    async def _background_serialize(self, values, infos, args=None):  # type: ignore[override]
        args = args or [ocp.SaveArgs()] * len(values)
        for stacked, info, arg in zip(values, infos, args):
            await info.await_path_creation()
            spec = ts_utils.build_array_write_spec(
                info=info,
                arg=arg,
                global_shape=stacked.shape,
                local_shape=(1, *stacked.shape[1:]),  # the write shape is the chunk shape: one layer
                dtype=np.dtype(stacked.dtype),
                use_ocdbt=info.is_ocdbt_checkpoint,
                process_index=ocdbt_utils.get_process_index_for_subdir(
                    use_ocdbt=info.is_ocdbt_checkpoint, override_ocdbt_process_id=self._override_ocdbt_process_id
                ),
                metadata_key=self._metadata_key,
            )
            if multihost.process_index() != 0:
                continue
            store = await ts.open(ts.Spec(spec.json), create=True, open=True, context=info.ts_context)
            for index in range(stacked.shape[0]):
                await store[index].write(stacked.layer(index))


_register_lazy_tensor_handler()


# ---------------------------------------------------------------------------- tree layout


def _string_path(path: Iterable[Any]) -> tuple[str, ...]:
    return tuple(str(p) for p in path)


def stored_tensors(directory: str | Path) -> dict[tuple[str, ...], Any]:
    """{on-disk path: metadata with `shape` and `dtype`} of a checkpoint's parameters; no data is read."""
    tree = ocp.PyTreeCheckpointHandler().metadata(Path(directory).absolute() / PARAMS_ITEM).tree
    return nnx.traversals.flatten_mapping(tree)


def on_disk(path: ParamPath, stored: Mapping[tuple[str, ...], Any], layer: int | None = None) -> tuple[str, ...]:
    """Where a parameter (`layer`'s tensor of a stacked one, in a per-layer checkpoint) is stored:
    its path, or its layout-1 name (`q_proj/kernel` was `q_kernel`)."""
    name = _string_path(path)
    if layer is not None:
        name = (*name[:2], str(layer), *name[2:])
    if name in stored or not name[-2].endswith("_proj"):
        return name
    old = name[:-2] + (f"{name[-2].removesuffix('_proj')}_{name[-1]}",)
    return old if old in stored else name


def per_layer_layout(metadata: Mapping[str, Any]) -> bool:
    """Whether a checkpoint (by its `model_config` metadata) stores one tensor per layer (layouts 1-2)."""
    return metadata["layout_version"] in _PER_LAYER_LAYOUTS


def on_disk_entries(
    path: ParamPath, shape: Sequence[int], stored: Mapping[tuple[str, ...], Any], per_layer: bool
) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{stored name: shape} of one parameter: itself, or one tensor per layer of a stacked
    parameter in a per-layer checkpoint."""
    if per_layer and is_stacked(path):
        return {on_disk(path, stored, layer): tuple(shape[1:]) for layer in range(shape[0])}
    return {on_disk(path, stored): tuple(shape)}


class StoredParams:
    """A checkpoint's stored parameter tensors, read one at a time (or one layer of a stacked
    tensor) straight from TensorStore: host memory holds what is read (plus the chunks being
    decoded). The streaming export reads through this."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).absolute()
        self.per_layer = per_layer_layout(read_checkpoint_metadata(self.directory))
        tree = ocp.PyTreeCheckpointHandler().metadata(self.directory / PARAMS_ITEM)
        self.stored = nnx.traversals.flatten_mapping(tree.tree)
        self._use_zarr3 = bool(tree.use_zarr3)
        self._context = ts_utils.get_ts_context(use_ocdbt=True)

    def read(self, path: ParamPath, layer: int | None = None, dtype: Any = None) -> np.ndarray:
        """The parameter at `path` (layer `layer` of a stacked one), cast to `dtype` if given."""
        name = on_disk(path, self.stored, layer if self.per_layer else None)
        if name not in self.stored:
            raise KeyError(f"{self.directory}: no stored tensor {'.'.join(name)}")
        info = types.ParamInfo(
            name=".".join(name),
            parent_dir=self.directory / PARAMS_ITEM,
            is_ocdbt_checkpoint=True,
            use_zarr3=self._use_zarr3,
            ts_context=self._context,
        )
        spec = ts_utils.build_array_read_spec(
            info, use_ocdbt=True, metadata_key=None, raise_array_data_missing_error=True
        )
        store = ts.open(ts.Spec(spec.json), open=True, context=self._context).result()
        if layer is not None and not self.per_layer:
            store = store[layer]
        value = store.read().result()
        return value if dtype is None else value.astype(dtype, copy=False)


# ---------------------------------------------------------------------------- save


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def checkpoint_metadata(
    config: ModelConfig,
    provenance: Mapping[str, Any] | None,
    *,
    source_dtype: str | None = None,
    tokenizer: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The `model_config` item. `source_dtype` and `tokenizer` are described in the module doc."""
    return {
        "layout_version": LAYOUT_VERSION,
        "scan_layers": True,
        "config": config.to_json_dict(),
        "provenance": dict(provenance or {}),
        "source_dtype": source_dtype,
        "tokenizer": None if tokenizer is None else dict(tokenizer),
    }


def params_save_args(params: Mapping[str, Any]) -> Any:
    """Orbax `SaveArgs` for a parameter tree: stacked layer parameters are stored one layer per
    chunk (`shard_axes=(0,)` splits axis 0 down to 1), so a reader of one layer (`StoredParams`,
    the streaming export) decodes that layer only, whatever mesh the checkpoint was written from."""
    flat = nnx.traversals.flatten_mapping(params)
    return nnx.traversals.unflatten_mapping(
        {path: ocp.SaveArgs(shard_axes=(0,) if is_stacked(path) else ()) for path in flat}
    )


def save_params(
    directory: str | Path,
    params: Mapping[str, Any],
    config: ModelConfig,
    *,
    provenance: Mapping[str, Any] | None = None,
    source_dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Saves parameters (a tree of jax/numpy arrays or `LazyTensor`s) and the config as one checkpoint.

    The set of parameter paths and their shapes must be exactly the model's for `config`.
    Orbax writes into a temporary directory and renames it at the end, so a failed save leaves
    nothing at `directory` (with `overwrite`, the previous checkpoint stays until the new one is
    complete).
    """
    directory = Path(directory).absolute()
    expected = {_string_path(p): s.shape for p, s in nnx.traversals.flatten_mapping(abstract_params(config)).items()}
    given = {_string_path(p): tuple(v.shape) for p, v in nnx.traversals.flatten_mapping(params).items()}
    missing = sorted(".".join(p) for p in expected.keys() - given.keys())
    extra = sorted(".".join(p) for p in given.keys() - expected.keys())
    if missing or extra:
        raise ValueError(f"parameters do not match the config: missing {missing}, unexpected {extra}")
    for path, shape in given.items():
        if tuple(expected[path]) != shape:
            raise ValueError(f"{'.'.join(path)}: shape {shape} != expected {tuple(expected[path])}")
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
    # The checkpoint is written beside its place and swapped in complete: a failed save leaves
    # nothing there, or the previous checkpoint untouched (with overwrite).
    with staged_directory(directory) as staging:
        try:
            _checkpointer().save(
                staging,
                args=ocp.args.Composite(
                    **{
                        PARAMS_ITEM: ocp.args.PyTreeSave(params, save_args=params_save_args(params)),
                        CONFIG_ITEM: ocp.args.JsonSave(
                            checkpoint_metadata(config, provenance, source_dtype=source_dtype)
                        ),
                    }
                ),
            )
        except BaseException:
            _remove_partial_saves(staging)
            raise
    return directory


def save_model(
    directory: str | Path, model: Transformer, *, provenance: Mapping[str, Any] | None = None, overwrite: bool = False
) -> Path:
    return save_params(directory, params_of(model), model.config, provenance=provenance, overwrite=overwrite)


def _remove_partial_saves(directory: Path) -> None:
    for leftover in directory.parent.glob(f"{directory.name}.orbax-checkpoint-tmp*"):
        shutil.rmtree(leftover, ignore_errors=True)


# ---------------------------------------------------------------------------- restore


def committed_steps(checkpoints_root: str | Path) -> list[int]:
    """The steps Orbax has committed under a training run's `checkpoints/` directory, oldest first.

    Orbax saves a step into `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` once every
    item is written: a kill mid-save leaves only the temporary directory, which is not a step.
    """
    root = Path(checkpoints_root)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())


def _committed_hint(directory: Path) -> str:
    """Where the committed checkpoints near `directory` are (its siblings, or its `checkpoints/`)."""
    for root in (directory.parent, directory / "checkpoints", directory):
        steps = committed_steps(root)
        if steps:
            return f"; the latest committed step is {root / str(steps[-1])}"
    return ""


def read_checkpoint_metadata(directory: str | Path) -> dict[str, Any]:
    """The `model_config` item of a model checkpoint (a training step directory or an import).

    Refused in one line: a directory Orbax never committed (what a kill mid-save leaves), and a
    directory that is no checkpoint (a training workdir: the message names its latest committed step).
    """
    directory = Path(directory).absolute()
    if directory.is_dir() and not ocp.step.is_checkpoint_finalized(directory):
        raise ValueError(
            f"{directory} is an uncommitted checkpoint (Orbax was stopped while saving it, so its files may be "
            f"incomplete): use a committed one{_committed_hint(directory)}"
        )
    if not (directory / CONFIG_ITEM).is_dir() or not (directory / PARAMS_ITEM).is_dir():
        raise FileNotFoundError(
            f"{directory} is not a prm-jax model checkpoint (expected '{PARAMS_ITEM}/' and '{CONFIG_ITEM}/' "
            f"items){_committed_hint(directory)}"
        )
    restored = _checkpointer().restore(directory, args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()}))
    metadata = dict(restored[CONFIG_ITEM])
    version = metadata.get("layout_version")
    if version not in _READABLE_LAYOUTS:
        raise ValueError(
            f"{directory}: checkpoint layout_version={version}, this prm-jax reads {list(_READABLE_LAYOUTS)}"
        )
    return metadata


def read_model_config(directory: str | Path, **overrides: Any) -> ModelConfig:
    """The ModelConfig stored with a checkpoint; runtime fields may be overridden."""
    source = f"{Path(directory).absolute() / CONFIG_ITEM}"
    return ModelConfig.from_json_dict(read_checkpoint_metadata(directory)["config"], source=source, **overrides)


def restore_params(
    directory: str | Path,
    config: ModelConfig | None = None,
    *,
    mesh: Mesh | None = None,
    rules: LogicalAxisRules | None = None,
    paths: Sequence[ParamPath] | None = None,
    as_numpy: bool = False,
    stored: Mapping[tuple[str, ...], Any] | None = None,
) -> dict[str, Any]:
    """Restores the parameter tree as jax.Arrays sharded for `mesh` (one device when None).

    `paths` restores only those parameters (streaming export reads one tensor at a time);
    `as_numpy` returns host numpy arrays and never touches an accelerator. Values are cast to
    `config.param_dtype`. `stored` is the checkpoint's `stored_tensors`, for callers that restore
    tensor by tensor and read that metadata once. Checks nothing beyond what Orbax does:
    `prm_jax.weights` validates.
    """
    directory = Path(directory).absolute()
    metadata = read_checkpoint_metadata(directory)
    config = config or ModelConfig.from_json_dict(metadata["config"], source=str(directory / CONFIG_ITEM))
    if mesh is None:
        mesh = Mesh(np.array(jax.local_devices()[:1]).reshape(1, 1, 1), MESH_AXES)
    targets = nnx.traversals.flatten_mapping(abstract_params(config, mesh, rules))
    if paths is not None:
        by_name = {_string_path(p): p for p in targets}
        unknown = sorted(".".join(map(str, p)) for p in paths if _string_path(p) not in by_name)
        if unknown:
            raise KeyError(f"no such parameters: {unknown}")
        targets = {by_name[key]: targets[by_name[key]] for key in map(_string_path, paths)}
    stored = stored_tensors(directory) if stored is None else stored
    per_layer = per_layer_layout(metadata)
    restored = {}
    # A per-layer checkpoint restores each stacked parameter's layers and stacks them on the
    # devices, one parameter at a time (transiently one parameter twice, never the model).
    groups = [[p] for p in targets if per_layer and is_stacked(p)]
    plain = [p for p in targets if not (per_layer and is_stacked(p))]
    for group in ([plain] if plain else []) + groups:
        entries = {}
        for p in group:
            for name, shape in on_disk_entries(p, targets[p].shape, stored, per_layer).items():
                target = targets[p]
                sharding = target.sharding
                if len(shape) != len(target.shape):  # one layer of a stacked parameter
                    sharding = NamedSharding(mesh, PartitionSpec(*sharding.spec[1:]))
                entries[name] = jax.ShapeDtypeStruct(shape, target.dtype, sharding=None if as_numpy else sharding)
        absent = sorted(".".join(n) for n in entries if n not in stored)
        if absent:  # Orbax would hand back the abstract leaf of a tensor it does not have
            raise KeyError(
                f"{directory}: no stored tensor(s) {absent} (checkpoint layout {metadata['layout_version']})"
            )
        partial = paths is not None or per_layer
        values = nnx.traversals.flatten_mapping(_restore_entries(directory, entries, as_numpy, partial))
        for p in group:
            names = list(on_disk_entries(p, targets[p].shape, stored, per_layer))
            if len(names) == 1 and not (per_layer and is_stacked(p)):
                restored[p] = values[names[0]]
            elif as_numpy:
                restored[p] = np.stack([values[n] for n in names])
            else:
                target = targets[p]
                layers = [values.pop(n) for n in names]  # restored already; handed over one by one
                restored[p] = stack_on_devices(target.shape, target.dtype, target.sharding, layers.__getitem__)
                del layers
    return nnx.traversals.unflatten_mapping(restored)


def _restore_entries(
    directory: Path, entries: Mapping[tuple[str, ...], jax.ShapeDtypeStruct], as_numpy: bool, partial: bool
) -> Any:
    """Restores the stored tensors `entries` names (`partial`: others may be stored, unread)."""
    item = nnx.traversals.unflatten_mapping(dict(entries))
    if as_numpy:
        restore_args = jax.tree.map(lambda s: ocp.RestoreArgs(restore_type=np.ndarray, dtype=s.dtype), item)
    else:
        restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    return _checkpointer().restore(
        directory,
        args=ocp.args.Composite(
            **{PARAMS_ITEM: ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=partial)}
        ),
    )[PARAMS_ITEM]


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked: jax.Array, layer: jax.Array, index: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stacked, layer.astype(stacked.dtype), index, 0)


def layer_sharding(sharding: Any) -> Any:
    """The sharding of one layer of a stacked parameter sharded as `sharding` (None: none)."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))
    return None


def stack_on_devices(shape: Sequence[int], dtype: Any, sharding: Any, layer: Callable[[int], jax.Array]) -> jax.Array:
    """A stacked parameter built on the devices one layer at a time (`layer(i)`, placed with
    `layer_sharding`): the stacked array is updated in place, so the devices hold it plus one
    layer. The one way layers are stacked: loading HF weights and restoring per-layer checkpoints."""
    stacked = jax.jit(lambda: jnp.zeros(tuple(shape), dtype), out_shardings=sharding)()
    for index in range(shape[0]):
        stacked = _set_layer(stacked, layer(index), np.int32(index))
    return stacked


__all__ = [
    "LazyTensor",
    "StackedLazyTensor",
    "StoredParams",
    "params_save_args",
    "layer_sharding",
    "stack_on_devices",
    "on_disk_entries",
    "per_layer_layout",
    "PARAMS_ITEM",
    "CONFIG_ITEM",
    "save_params",
    "save_model",
    "committed_steps",
    "read_checkpoint_metadata",
    "read_model_config",
    "stored_tensors",
    "on_disk",
    "restore_params",
]
