"""Orbax model checkpoints: parameters plus the model config as metadata.

A model checkpoint directory (what `launch.convert` writes, and what training step directories
contain) holds two Orbax items:

* `params`: the parameter tree (`models.factory`), nested dicts keyed like the parameter path
  (`model/layers/0/self_attn/q_proj/kernel`, ...), unscanned layers;
* `model_config`: JSON with the `ModelConfig`, the layout version, free-form provenance and two
  facts the export needs: `source_dtype` (the dtype of the Hugging Face weights the model was
  imported from, the default export dtype) and `tokenizer` (the step separator, its id, the
  vocabulary fingerprint and the directory of the separator-bearing tokenizer a run trained with).
  Both are absent or null in checkpoints written before they existed.

Layout 1 (before parameters took HF names) named projections `q_kernel`, `q_bias`, `gate_kernel`;
restores read those under today's names, so older checkpoints stay readable.

Restores take `jax.ShapeDtypeStruct`s carrying the target shardings, so a checkpoint saved on one
mesh restores onto any other device count or mesh. Conversion writes parameters through
`LazyTensor` leaves that are materialised one at a time while Orbax writes them, so host memory
stays near the largest tensor instead of the model size.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh
from orbax.checkpoint import type_handlers

from prm_jax.files import staged_directory
from prm_jax.models.config import ModelConfig
from prm_jax.models.factory import ParamPath, abstract_params, params_of
from prm_jax.models.transformer import Transformer
from prm_jax.sharding import MESH_AXES, LogicalAxisRules

PARAMS_ITEM = "params"
CONFIG_ITEM = "model_config"
LAYOUT_VERSION = 2  # bump when the parameter tree layout changes; 2: HF-named projections
_READABLE_LAYOUTS = (1, LAYOUT_VERSION)


# ---------------------------------------------------------------------------- lazy leaves


@dataclasses.dataclass(frozen=True, eq=False)
class LazyTensor:
    """A checkpoint leaf whose value is produced only when Orbax writes it."""

    shape: tuple[int, ...]
    dtype: np.dtype
    load: Callable[[], np.ndarray]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def ndim(self) -> int:
        return len(self.shape)

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
    finally:
        absl_logger.setLevel(level)


_register_lazy_tensor_handler()


# ---------------------------------------------------------------------------- tree layout


def _string_path(path: Iterable[Any]) -> tuple[str, ...]:
    return tuple(str(p) for p in path)


def stored_tensors(directory: str | Path) -> dict[tuple[str, ...], Any]:
    """{on-disk path: metadata with `shape` and `dtype`} of a checkpoint's parameters; no data is read."""
    tree = ocp.PyTreeCheckpointHandler().metadata(Path(directory).absolute() / PARAMS_ITEM).tree
    return nnx.traversals.flatten_mapping(tree)


def on_disk(path: ParamPath, stored: Mapping[tuple[str, ...], Any]) -> tuple[str, ...]:
    """Where a parameter is stored: its path, or its layout-1 name (`q_proj/kernel` was `q_kernel`)."""
    name = _string_path(path)
    if name in stored or not name[-2].endswith("_proj"):
        return name
    old = name[:-2] + (f"{name[-2].removesuffix('_proj')}_{name[-1]}",)
    return old if old in stored else name


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
        "scan_layers": False,
        "config": config.to_json_dict(),
        "provenance": dict(provenance or {}),
        "source_dtype": source_dtype,
        "tokenizer": None if tokenizer is None else dict(tokenizer),
    }


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
                        PARAMS_ITEM: ocp.args.PyTreeSave(params),
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


def read_checkpoint_metadata(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory).absolute()
    if not (directory / CONFIG_ITEM).is_dir() or not (directory / PARAMS_ITEM).is_dir():
        raise FileNotFoundError(
            f"{directory} is not a prm-jax model checkpoint (expected '{PARAMS_ITEM}/' and '{CONFIG_ITEM}/' items)"
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
    return ModelConfig.from_json_dict(read_checkpoint_metadata(directory)["config"], **overrides)


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
    config = config or read_model_config(directory)
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
    names = {path: on_disk(path, stored) for path in targets}
    item = nnx.traversals.unflatten_mapping(
        {
            names[p]: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=None if as_numpy else s.sharding)
            for p, s in targets.items()
        }
    )
    if as_numpy:
        restore_args = jax.tree.map(lambda s: ocp.RestoreArgs(restore_type=np.ndarray, dtype=s.dtype), item)
    else:
        restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    restored = _checkpointer().restore(
        directory,
        args=ocp.args.Composite(
            **{
                PARAMS_ITEM: ocp.args.PyTreeRestore(
                    item=item, restore_args=restore_args, partial_restore=paths is not None
                )
            }
        ),
    )[PARAMS_ITEM]
    restored = nnx.traversals.flatten_mapping(restored)
    return nnx.traversals.unflatten_mapping({p: restored[names[p]] for p in targets})


__all__ = [
    "LazyTensor",
    "PARAMS_ITEM",
    "CONFIG_ITEM",
    "save_params",
    "save_model",
    "read_checkpoint_metadata",
    "read_model_config",
    "stored_tensors",
    "on_disk",
    "restore_params",
]
