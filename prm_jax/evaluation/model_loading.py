"""Load a model for evaluation from an Orbax checkpoint or a Hugging Face directory, sharded.

Evaluation takes whatever a researcher has at hand: a training step directory or a converted
Orbax checkpoint (``restore_model``), or a Hugging Face checkpoint (our ``orbax_to_hf`` export, a
released Qwen2.5-Math-PRM, or a causal LM for the critic). Hugging Face directories are read
straight from safetensors through the conversion mapping table, one tensor at a time: each tensor
is read, relaid out for JAX, placed onto the mesh with its sharding and released, so host memory
stays near the largest tensor and no temporary Orbax copy (a full extra write of the model) is
made. Placement goes through ``jax.make_array_from_callback``, so on several hosts each process
only materialises the shards its devices own.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from prm_jax.checkpoint import CONFIG_ITEM, PARAMS_ITEM, read_checkpoint_metadata, read_model_config, restore_model
from prm_jax.conversion.hf_checkpoint import ConversionError, checkpoint_tokenizer
from prm_jax.conversion.hf_mapping import tensor_mappings
from prm_jax.conversion.safetensors_io import SafetensorsCheckpoint
from prm_jax.models.config import ModelConfig
from prm_jax.models.factory import abstract_model, abstract_param_state
from prm_jax.models.transformer import Transformer
from prm_jax.sharding import LogicalAxisRules, state_shardings

__all__ = ["checkpoint_kind", "load_model", "load_tokenizer", "load_hf_model"]

_log = logging.getLogger(__name__)
Head = Literal["prm", "lm"]


def checkpoint_kind(path: str | Path) -> Literal["orbax", "hf"]:
    """``"orbax"`` for a prm-jax model checkpoint, ``"hf"`` for a directory with ``config.json``."""
    path = Path(path)
    if (path / PARAMS_ITEM).is_dir() and (path / CONFIG_ITEM).is_dir():
        return "orbax"
    if (path / "config.json").is_file():
        return "hf"
    raise FileNotFoundError(
        f"{path} is neither a prm-jax Orbax checkpoint ('{PARAMS_ITEM}/' and '{CONFIG_ITEM}/') nor a "
        "Hugging Face checkpoint (config.json)"
    )


def _placed(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host value, each process filling only its addressable shards."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def load_hf_model(
    hf_dir: str | Path,
    *,
    mesh: Mesh,
    rules: LogicalAxisRules | None = None,
    head: Head = "prm",
    dtype: str = "float32",
    param_dtype: str = "float32",
) -> Transformer:
    """Builds the model straight from a Hugging Face directory's safetensors, sharded on ``mesh``.

    ``head="prm"`` needs a ``Qwen2ForProcessRewardModel`` checkpoint (its ``score.*`` head);
    ``head="lm"`` loads a causal LM (its ``lm_head``, or the tied embedding) for generation.
    """
    hf_dir = Path(hf_dir)
    base = ModelConfig.from_hf_file(hf_dir)
    is_prm_checkpoint = base.with_prm_head and not base.with_lm_head
    if head == "prm" and not is_prm_checkpoint:
        raise ConversionError(
            f"{hf_dir}: a causal LM, not a process reward model (architectures in config.json do not include "
            "Qwen2ForProcessRewardModel); its PRM head would be untrained. Train or convert a PRM first."
        )
    if head == "lm" and is_prm_checkpoint:
        raise ConversionError(f"{hf_dir}: a process reward model has no LM head; the critic needs a causal LM")
    config = base.replace(
        with_prm_head=head == "prm", with_lm_head=head == "lm", dtype=dtype, param_dtype=param_dtype
    )
    abstract_state = abstract_param_state(config)
    shardings = dict(nnx.to_flat_state(state_shardings(abstract_state, mesh, rules)))
    mappings = {m.path: m for m in tensor_mappings(config)}
    target_dtype = np.dtype(config.parameter_dtype)
    leaves = []
    with SafetensorsCheckpoint(hf_dir) as reader:
        available = set(reader.names())
        missing = sorted(m.hf_name for m in mappings.values() if m.hf_name not in available)
        if missing:
            raise ConversionError(f"{hf_dir}: missing tensor(s) {missing}")
        for m in mappings.values():
            shape = tuple(reader.spec(m.hf_name).shape)
            if shape != m.hf_shape:
                raise ConversionError(f"{hf_dir}: tensor {m.hf_name} has shape {shape}, expected {m.hf_shape}")
        for path, variable in nnx.to_flat_state(abstract_state):
            path = tuple(path)
            m = mappings[path]
            value = m.to_jax(reader.get(m.hf_name)).astype(target_dtype, copy=False)
            sharding = shardings[path]
            sharding = sharding.get_value() if isinstance(sharding, nnx.Variable) else sharding
            leaves.append((path, variable.replace(_placed(value, sharding))))
            del value
    graphdef, _ = nnx.split(abstract_model(config))
    _log.info("loaded %s (%s head, %d tensors) from safetensors", hf_dir, head, len(leaves))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def load_model(
    path: str | Path,
    *,
    mesh: Mesh,
    rules: LogicalAxisRules | None = None,
    head: Head = "prm",
    dtype: str = "float32",
    param_dtype: str | None = None,
) -> Transformer:
    """The model at ``path`` (Orbax or Hugging Face), sharded on ``mesh``, with the head asked for.

    ``dtype`` is the compute dtype; ``param_dtype`` the storage dtype (default: the checkpoint's for
    Orbax, float32 for Hugging Face; bfloat16 halves the memory of a 7B/72B evaluation).
    """
    if checkpoint_kind(path) == "hf":
        return load_hf_model(path, mesh=mesh, rules=rules, head=head, dtype=dtype, param_dtype=param_dtype or "float32")
    stored = read_model_config(path)
    if head == "prm" and not stored.with_prm_head:
        raise ConversionError(f"{path}: checkpoint has no PRM head")
    if head == "lm" and not stored.with_lm_head:
        raise ConversionError(
            f"{path}: checkpoint has no causal-LM head (a PRM checkpoint?); the critic needs a causal LM"
        )
    overrides: dict[str, Any] = {"dtype": dtype}
    if param_dtype is not None:
        overrides["param_dtype"] = param_dtype
    return restore_model(path, mesh=mesh, rules=rules, **overrides)


def load_tokenizer(model_path: str | Path, tokenizer_path: str | Path | None = None) -> Any:
    """The tokenizer to evaluate with.

    A training checkpoint records the tokenizer it was trained with: by default that one, and a
    ``tokenizer_path`` must give the separator the same id over the same vocabulary (the rule of
    the export, :func:`checkpoint_tokenizer`). Otherwise ``tokenizer_path`` if given, else the one
    saved in a Hugging Face model directory; an Orbax checkpoint that records none needs
    ``tokenizer_path``."""
    from transformers import AutoTokenizer

    if checkpoint_kind(model_path) == "orbax":
        recorded = read_checkpoint_metadata(model_path).get("tokenizer")
        if recorded is not None:
            return checkpoint_tokenizer(Path(model_path), recorded, tokenizer_path, None, add_separator=True)[0]
        if tokenizer_path is None:
            raise ValueError(
                f"{model_path} is an Orbax checkpoint that records no tokenizer; pass the tokenizer directory "
                "(e.g. the base model's or the exported HF directory) with --tokenizer"
            )
    return AutoTokenizer.from_pretrained(str(tokenizer_path or model_path))
