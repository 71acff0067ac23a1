"""Hugging Face <-> Orbax conversion, one tensor at a time.

`hf_to_orbax` imports a causal-LM checkpoint (backbone, and the LM head when untied; the PRM head
freshly initialised from a seed) or a `Qwen2ForProcessRewardModel` checkpoint (head included).
`orbax_to_hf` writes the Qwen2.5-Math-PRM layout: `config.json` with `architectures`/`auto_map`/
`num_labels`, our remote-code files, safetensors weights with the Qwen names (no `lm_head`), and
optionally the tokenizer with the step separator as one special token.

Both directions validate everything they can from metadata alone (names, shapes, dtypes, config)
before writing a byte, stream tensors one by one, and write into a temporary directory that is
renamed only on success: a failure leaves nothing at the destination.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from flax import nnx

from prm_jax.checkpoint import LazyTensor, read_model_config, restore_params, save_params
from prm_jax.conversion.hf_mapping import TensorMapping, tensor_mappings
from prm_jax.conversion.remote_code import ARCHITECTURE, AUTO_MAP, write_remote_code
from prm_jax.conversion.safetensors_io import SafetensorsCheckpoint, TensorSpec, write_safetensors
from prm_jax.models.config import ModelConfig
from prm_jax.models.transformer import StepHead
from prm_jax.tokenization import STEP_SEPARATOR, ensure_step_separator

_log = logging.getLogger(__name__)

EXPORT_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
# Tensors some checkpoints carry that hold no parameters of ours.
_IGNORABLE_SUFFIXES = (".rotary_emb.inv_freq",)


class ConversionError(ValueError):
    """The source checkpoint does not match what the conversion expects."""


# ---------------------------------------------------------------------------- HF -> Orbax


def _fresh_step_head(config: ModelConfig, seed: int) -> dict[tuple[str, ...], np.ndarray]:
    """Initialises only the PRM head (h*h + 2h parameters), never the whole model."""
    head = StepHead(config, nnx.Rngs(seed))
    return {
        ("score",) + tuple(path): np.asarray(var.get_value())
        for path, var in nnx.to_flat_state(nnx.state(head, nnx.Param))
    }


def _check_source_tensors(
    reader: SafetensorsCheckpoint, expected: list[TensorMapping], config: ModelConfig, source: Path
) -> None:
    available = set(reader.names())
    wanted = {m.hf_name for m in expected}
    missing = sorted(wanted - available)
    extra = sorted(
        n
        for n in available - wanted
        if not n.endswith(_IGNORABLE_SUFFIXES)
        and not (n == "lm_head.weight" and config.tie_word_embeddings)
    )
    problems = []
    if missing:
        problems.append(f"missing tensor(s) {missing}")
    if extra:
        problems.append(f"unexpected tensor(s) {extra}")
    for m in expected:
        if m.hf_name in available:
            shape = tuple(reader.spec(m.hf_name).shape)
            if shape != m.hf_shape:
                problems.append(f"tensor {m.hf_name}: shape {shape} in checkpoint, expected {m.hf_shape}")
    if problems:
        raise ConversionError(f"{source}: " + "; ".join(problems))


def hf_to_orbax(
    hf_dir: str | Path,
    orbax_dir: str | Path,
    *,
    seed: int = 0,
    param_dtype: str = "float32",
    overwrite: bool = False,
) -> ModelConfig:
    """Converts an HF causal-LM or PRM checkpoint into an Orbax model checkpoint.

    Returns the stored ModelConfig. Parameters are stored in `param_dtype` (fp32 master weights
    by default; a bf16 source converts exactly).
    """
    hf_dir, orbax_dir = Path(hf_dir), Path(orbax_dir)
    config = ModelConfig.from_hf_file(hf_dir, param_dtype=param_dtype)
    is_prm = config.with_prm_head and not config.with_lm_head
    mappings = tensor_mappings(config)
    imported = [m for m in mappings if is_prm or not m.is_head]
    dtype = np.dtype(config.parameter_dtype)
    with SafetensorsCheckpoint(hf_dir) as reader:
        _check_source_tensors(reader, imported, config, hf_dir)
        params: dict[tuple, Any] = {}
        for m in imported:
            params[m.path] = LazyTensor(
                m.jax_shape, dtype, lambda m=m: m.to_jax(reader.get(m.hf_name)).astype(dtype, copy=False)
            )
        if not is_prm:
            params.update({p: v.astype(dtype) for p, v in _fresh_step_head(config, seed).items()})
        provenance = {
            "source": str(hf_dir.absolute()),
            "source_format": "huggingface",
            "prm_head": "imported" if is_prm else f"fresh (seed {seed})",
        }
        save_params(orbax_dir, params, config, provenance=provenance, overwrite=overwrite)
    _log.info("wrote %s (%d tensors, %s)", orbax_dir, len(params), provenance["prm_head"])
    return config


# ---------------------------------------------------------------------------- Orbax -> HF


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    text = size.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * units[unit])
    return int(text)


def _prepare_destination(hf_dir: Path, overwrite: bool) -> Path:
    if hf_dir.exists() and any(hf_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{hf_dir} exists and is not empty; pass overwrite to replace it")
    hf_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{hf_dir.name}.tmp-", dir=hf_dir.parent))


def _resized_vocab(config: ModelConfig, needed: int) -> int:
    """Embedding rows after making room for `needed` token ids (rounded up to 64 rows)."""
    if needed <= config.vocab_size:
        return config.vocab_size
    return int(math.ceil(needed / 64) * 64)


def orbax_to_hf(
    orbax_dir: str | Path,
    hf_dir: str | Path,
    *,
    dtype: str = "bfloat16",
    tokenizer_dir: str | Path | None = None,
    separator: str = STEP_SEPARATOR,
    add_separator: bool = True,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Exports an Orbax model checkpoint in the Qwen2.5-Math-PRM Hugging Face layout.

    With `tokenizer_dir`, the tokenizer is saved beside the weights; a separator that splits into
    several tokens is added as a special token (`add_separator`) and, if its id falls outside the
    embedding, the embedding grows by rows set to the mean embedding (transformers'
    `resize_token_embeddings` default); without `add_separator` such a tokenizer is refused.
    """
    orbax_dir, hf_dir = Path(orbax_dir), Path(hf_dir)
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose one of {list(EXPORT_DTYPES)}")
    out_dtype = EXPORT_DTYPES[dtype]
    config = read_model_config(orbax_dir)
    if not config.with_prm_head:
        raise ConversionError(f"{orbax_dir}: checkpoint has no PRM head; nothing to export as a PRM")
    config.to_hf_dict()  # raises early for layouts Qwen2 cannot express

    tokenizer = None
    vocab_size = config.vocab_size
    separator_id = None
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        separator_id, added = ensure_step_separator(tokenizer, separator, add_if_missing=add_separator)
        vocab_size = _resized_vocab(config, max(len(tokenizer), separator_id + 1))
        if added:
            _log.warning("step separator %r added to the tokenizer as id %d", separator, separator_id)

    mappings = [m for m in tensor_mappings(config) if not m.is_lm_head]
    embed_name = "model.embed_tokens.weight"

    def hf_shape(m: TensorMapping) -> tuple[int, ...]:
        return (vocab_size,) + m.hf_shape[1:] if m.hf_name == embed_name else m.hf_shape

    specs = [TensorSpec(m.hf_name, hf_shape(m), out_dtype) for m in mappings]
    by_name = {m.hf_name: m for m in mappings}

    def get_tensor(name: str) -> np.ndarray:
        m = by_name[name]
        value = restore_params(orbax_dir, config, paths=[m.path], as_numpy=True)[m.path]
        value = m.to_hf(np.asarray(value))
        if name == embed_name and vocab_size > config.vocab_size:
            new_rows = np.broadcast_to(value.mean(axis=0), (vocab_size - config.vocab_size, value.shape[1]))
            value = np.concatenate([value, new_rows], axis=0)
        return value.astype(out_dtype, copy=False)

    staging = _prepare_destination(hf_dir, overwrite)
    try:
        write_safetensors(staging, specs, get_tensor, max_shard_bytes=_parse_size(max_shard_size))
        hf_config = {
            "architectures": [ARCHITECTURE],
            "auto_map": dict(AUTO_MAP),
            **config.replace(vocab_size=vocab_size).to_hf_dict(torch_dtype=dtype),
            "transformers_version": _transformers_version(),
        }
        if separator_id is not None:
            hf_config["step_separator"] = separator
            hf_config["step_separator_id"] = separator_id
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        write_remote_code(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        if hf_dir.exists():
            shutil.rmtree(hf_dir)
        staging.rename(hf_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _log.info("wrote %s (%d tensors, %s)", hf_dir, len(specs), dtype)
    return hf_dir


def _transformers_version() -> str:
    try:
        import transformers

        return transformers.__version__
    except ImportError:  # the export itself does not need transformers without a tokenizer
        return "unknown"


def hf_tensor_names(config: ModelConfig) -> list[str]:
    """Names `orbax_to_hf` writes for this config (tests and docs)."""
    return [m.hf_name for m in tensor_mappings(config) if not m.is_lm_head]


__all__ = ["hf_to_orbax", "orbax_to_hf", "ConversionError", "hf_tensor_names", "EXPORT_DTYPES"]
