"""Hugging Face <-> Orbax conversion, one tensor at a time.

`hf_to_orbax` imports a causal-LM checkpoint (backbone, and the LM head when untied; the PRM head
freshly initialised from a seed) or a `Qwen2ForProcessRewardModel` checkpoint (head included).
`orbax_to_hf` writes the Qwen2.5-Math-PRM layout: `config.json` with `architectures`/`auto_map`/
`num_labels`, our remote-code files, safetensors weights with the Qwen names (no `lm_head`), and
the tokenizer with the step separator as one token: by default the one the training run recorded
in the checkpoint, so the export scores at the very token id the model was trained on.

Qwen3 (`Qwen3ForCausalLM`, q/k norms) converts the same way; its PRM export is the same layout on
the Qwen3 backbone (`Qwen3ForProcessRewardModel`, its own remote-code files), which transformers
loads but vLLM has no native class for: the export says so in its README.md and log.

Export dtype defaults to the dtype the weights were imported in (recorded by `hf_to_orbax`), so
HF -> Orbax -> HF with default settings is exact.

Both directions validate everything they can from metadata alone (names, shapes, dtypes, config)
before writing a byte, stream tensors one by one, and write into a temporary directory that is
renamed only on success: a failure leaves nothing at the destination. Imported tensors must be
finite (NaN or Inf is refused, naming the tensor); config.json, the safetensors index and tokenizer
files must be regular files of bounded size (a FIFO or /dev/zero is refused, not read).

`overwrite` replaces only what this module wrote (`output_paths.replace_problem`): an export
directory is recognised by its config.json (`EXPORT_MARKER`, or for exports written before the
marker our architecture, auto_map and remote-code files), an imported Orbax checkpoint by the
provenance `hf_to_orbax` records. A training workdir, a downloaded model or any other folder is
refused before anything is read.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from prm_jax import jsonl
from prm_jax.checkpoint import CONFIG_ITEM, PARAMS_ITEM, StoredParams, read_checkpoint_metadata, save_params
from prm_jax.conversion.hf_mapping import TensorMapping, tensor_mappings
from prm_jax.conversion.remote_code import REMOTE_CODE, remote_code_for, write_remote_code
from prm_jax.conversion.safetensors_io import SafetensorsCheckpoint, TensorSpec, write_safetensors
from prm_jax.files import check_regular_file, read_regular_text, staged_directory
from prm_jax.models.config import CAUSAL_LM_ARCHITECTURES, ModelConfig, UnsupportedCheckpointError
from prm_jax.models.vocab import grow_vocab_axis, padded_vocab_size
from prm_jax.output_paths import OwnOutput, refuse_output_over_input, refuse_unreplaceable
from prm_jax.tokenization import (
    STEP_SEPARATOR,
    VLLM_DEFAULT_STEP_TAG_ID,
    StepSeparator,
    prepare_step_separator,
    vllm_pooler_setting,
)
from prm_jax.weights import (
    DEFAULT_EXPORT_DTYPE,
    EXPORT_DTYPES,
    MAX_CONFIG_BYTES,
    ConversionError,
    hf_config,
    hf_source_dtype,
    hf_tensors,
)

_log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- what overwrite may replace

#: The config.json entry that marks a directory as an `orbax_to_hf` export.
EXPORT_MARKER: dict[str, str] = {"exported_by": "prm-jax"}
#: `provenance.source_format` of a checkpoint `hf_to_orbax` wrote.
IMPORT_SOURCE_FORMAT = "huggingface"
# The file Orbax's JsonSave writes an item into (its JsonCheckpointHandler's default name).
_ORBAX_JSON_FILE = "metadata"


def _json_object(path: Path) -> dict[str, Any] | None:
    """A small JSON object file, or None when it is absent, irregular, too big or not an object."""
    try:
        value = jsonl.loads(read_regular_text(path, max_bytes=MAX_CONFIG_BYTES))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def is_hf_export(directory: Path) -> bool:
    """Whether `directory` holds an `orbax_to_hf` export: config.json with `EXPORT_MARKER`, or (exports
    written before the marker) a PRM architecture with our auto_map and our remote-code files."""
    config = _json_object(directory / "config.json")
    if config is None:
        return False
    if all(config.get(key) == value for key, value in EXPORT_MARKER.items()):
        return True
    return any(
        config.get("architectures") == [code.architecture]
        and config.get("auto_map") == dict(code.auto_map)
        and all((directory / name).is_file() for name in code.files)
        for code in REMOTE_CODE.values()
    )


def is_orbax_import(directory: Path) -> bool:
    """Whether `directory` holds a checkpoint `hf_to_orbax` wrote (its metadata's provenance says so)."""
    metadata = _json_object(directory / CONFIG_ITEM / _ORBAX_JSON_FILE)
    provenance = (metadata or {}).get("provenance")
    return (
        (directory / PARAMS_ITEM).is_dir()
        and isinstance(provenance, dict)
        and provenance.get("source_format") == IMPORT_SOURCE_FORMAT
    )


HF_EXPORT = OwnOutput("a prm-jax Hugging Face export", is_hf_export)
ORBAX_IMPORT = OwnOutput("an Orbax checkpoint imported by prm-jax", is_orbax_import)

#: Largest tokenizer file read (Qwen's tokenizer.json is 11 MB; the largest vocabularies ~35 MB).
MAX_TOKENIZER_FILE_BYTES = 512 * 2**20
# The tokenizer files transformers may read from a directory (by suffix).
_TOKENIZER_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")


def check_tokenizer_files(directory: str | Path) -> None:
    """Refuses (one line naming it) a tokenizer file that is a FIFO, a device or oversized, before
    transformers reads the directory: it would block, or read without end."""
    for entry in sorted(Path(directory).iterdir()):
        if entry.name.endswith(_TOKENIZER_SUFFIXES) and not entry.is_dir():
            check_regular_file(entry, max_bytes=MAX_TOKENIZER_FILE_BYTES)


# ---------------------------------------------------------------------------- HF -> Orbax


def hf_to_orbax(
    hf_dir: str | Path, orbax_dir: str | Path, *, seed: int = 0, param_dtype: str = "float32", overwrite: bool = False
) -> ModelConfig:
    """Converts an HF causal-LM or PRM checkpoint into an Orbax model checkpoint.

    Returns the stored ModelConfig. Parameters are stored in `param_dtype` (fp32 master weights
    by default; a bf16 source converts exactly). The source tensors' dtype is recorded in the
    checkpoint metadata as `source_dtype`, the default dtype of a later `orbax_to_hf`. The source
    is checked as `prm_jax.weights` checks every load.
    """
    hf_dir, orbax_dir = Path(hf_dir), Path(orbax_dir)
    refuse_output_over_input({"hf_dir": hf_dir}, orbax_dir, "orbax_dir")
    refuse_unreplaceable(orbax_dir, name="orbax_dir", own=ORBAX_IMPORT, overwrite=overwrite)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"hf_dir {hf_dir} does not exist (or is not a directory)")
    config = hf_config(hf_dir, param_dtype=param_dtype)
    is_prm = config.with_prm_head and not config.with_lm_head
    with SafetensorsCheckpoint(hf_dir) as reader:
        params = hf_tensors(reader, config, fresh_heads_seed=None if is_prm else seed)
        source = hf_source_dtype(reader)
        provenance = {
            "source": str(hf_dir.absolute()),
            "source_format": IMPORT_SOURCE_FORMAT,  # also what a later overwrite recognises
            "prm_head": "imported" if is_prm else f"fresh (seed {seed})",
        }
        save_params(
            orbax_dir,
            nnx.traversals.unflatten_mapping(params),
            config,
            provenance=provenance,
            source_dtype=source,
            overwrite=True,  # refuse_unreplaceable has decided: nothing there, empty, or our own import
        )
    _log.info("wrote %s (%d tensors, %s, source %s)", orbax_dir, len(params), provenance["prm_head"], source)
    return config


# ---------------------------------------------------------------------------- Orbax -> HF


def parse_size(size: int | str) -> int:
    """`"5GB"`, `"500MiB"`, `1000` -> bytes (> 0); ValueError naming the value otherwise."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
        text = str(size).strip().upper()
        number, factor = text, 1
        for unit in sorted(units, key=len, reverse=True):
            if text.endswith(unit):
                number, factor = text[: -len(unit)], units[unit]
                break
        try:
            value = int(float(number) * factor)
        except ValueError:
            value = None
    if value is None or value <= 0:
        raise ValueError(f"max_shard_size={size!r}: expected a positive size such as 5GB, 500MB or 2GiB")
    return value


def _recorded_tokenizer_dir(orbax_dir: Path, recorded: dict[str, Any]) -> Path:
    """Where the tokenizer a run recorded is now: beside the checkpoints first (the run directory
    may have been moved or copied), then the absolute path it was saved at."""
    saved = Path(recorded["dir"])
    candidates = [orbax_dir.absolute().parent.parent / saved.name, saved]
    for candidate in candidates:
        if (candidate / "tokenizer_config.json").is_file():
            return candidate
    raise ConversionError(
        f"{orbax_dir}: the checkpoint was trained with the tokenizer saved at {saved}, which is gone "
        f"(also looked at {candidates[0]}); pass tokenizer_dir (--tokenizer_dir) with that vocabulary "
        f"({recorded['vocabulary']}), where {recorded['separator']!r} becomes id {recorded['separator_id']}"
    )


def checkpoint_tokenizer(
    orbax_dir: Path,
    recorded: dict[str, Any] | None,
    tokenizer_dir: str | Path | None,
    separator: str | None,
    add_separator: bool,
) -> tuple[Any, StepSeparator | None]:
    """The separator-bearing tokenizer a checkpoint scores with (saved with its export), and its separator.

    Without `tokenizer_dir` it is the one the run recorded (none for checkpoints that record none).
    A given `tokenizer_dir` goes through the same `prepare_step_separator` as training and must
    then agree with the record on the separator id and the vocabulary; otherwise the export would
    read rewards at a token the model was never trained to score there, so it is refused.
    """
    if recorded is not None:
        if separator is not None and separator != recorded["separator"]:
            raise ConversionError(
                f"{orbax_dir}: separator {separator!r} requested, but the checkpoint was trained with "
                f"{recorded['separator']!r} (id {recorded['separator_id']})"
            )
        separator = recorded["separator"]
    separator = separator or STEP_SEPARATOR
    if tokenizer_dir is None:
        if recorded is None:
            return None, None
        tokenizer_dir = _recorded_tokenizer_dir(orbax_dir, recorded)
    from transformers import AutoTokenizer

    check_tokenizer_files(tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer, step_separator = prepare_step_separator(tokenizer, separator, add_if_missing=add_separator)
    if recorded is not None and (step_separator.token_id, step_separator.vocabulary) != (
        recorded["separator_id"],
        recorded["vocabulary"],
    ):
        raise ConversionError(
            f"tokenizer {tokenizer_dir} disagrees with {orbax_dir}: it gives {separator!r} id "
            f"{step_separator.token_id} (vocabulary {step_separator.vocabulary}), but the model was "
            f"trained with {separator!r} at id {recorded['separator_id']} (vocabulary "
            f"{recorded['vocabulary']}, tokenizer {recorded['dir']}); nothing was written. Omit "
            "--tokenizer_dir to export with the recorded tokenizer."
        )
    if step_separator.origin != "existing":
        _log.info("step separator %r is id %d (%s)", separator, step_separator.token_id, step_separator.origin)
    return tokenizer, step_separator


def vllm_separator_note(separator: str, separator_id: int) -> str:
    """What a user must pass to vLLM when the separator is not at its default step_tag_id 151651."""
    setting = json.dumps(vllm_pooler_setting(separator_id))
    return (
        f"The step separator {separator!r} is token id {separator_id}, not {VLLM_DEFAULT_STEP_TAG_ID} "
        f"(the released Qwen2.5-Math-PRM's id and vLLM's default step_tag_id). vLLM's native PRM must be "
        f"told: `vllm serve MODEL --runner pooling --pooler-config '{setting}'`, or in Python "
        f'`LLM(MODEL, runner="pooling", pooler_config=PoolerConfig(**{setting}))`.'
    )


#: What `orbax_to_hf` can export, and the head each needs.
EXPORT_HEADS = {"prm": "PRM head", "lm": "LM head"}


def orbax_to_hf(
    orbax_dir: str | Path,
    hf_dir: str | Path,
    *,
    dtype: str | None = None,
    tokenizer_dir: str | Path | None = None,
    separator: str | None = None,
    add_separator: bool = True,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    head: str = "prm",
) -> Path:
    """Exports an Orbax model checkpoint in the Qwen2.5-Math-PRM Hugging Face layout, or with
    `head="lm"` as a plain `Qwen2ForCausalLM` (a policy trained with `objective=lm`, for vLLM or
    transformers: backbone and LM head, the tokenizer as recorded or given, no separator, no remote code).
    A Qwen3 checkpoint exports as `Qwen3ForProcessRewardModel` (remote code on `Qwen3Model`) or
    `Qwen3ForCausalLM`.

    `dtype` defaults to the checkpoint's recorded `source_dtype` (the dtype it was imported in),
    else bfloat16. The tokenizer saved beside the weights is the one the training run recorded;
    `tokenizer_dir` may replace it only when it gives the separator the same id over the same
    vocabulary (else `ConversionError`, nothing written). For checkpoints that record no tokenizer
    (imports, older runs), `tokenizer_dir` is prepared like training does
    (`prepare_step_separator`: a Qwen2.5 vocabulary gets `<extra_0>` at 151651; another vocabulary
    gets it as a new special token, `add_separator`, and if its id falls outside the embedding the
    embedding grows by rows set to the mean embedding, transformers' `resize_token_embeddings`
    default); without `add_separator` a splitting separator is refused. A separator id other than
    151651 is written to config.json (`step_separator_id`, `vllm_pooler_config`), logged and
    explained in a README.md beside the weights: vLLM needs it passed explicitly.
    """
    orbax_dir, hf_dir = Path(orbax_dir), Path(hf_dir)
    refuse_output_over_input({"orbax_dir": orbax_dir, "tokenizer_dir": tokenizer_dir}, hf_dir, "hf_dir")
    refuse_unreplaceable(hf_dir, name="hf_dir", own=HF_EXPORT, overwrite=overwrite)
    max_shard_bytes = parse_size(max_shard_size)
    if not orbax_dir.is_dir():
        raise FileNotFoundError(f"orbax_dir {orbax_dir} does not exist (or is not a directory)")
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise FileNotFoundError(f"tokenizer_dir {tokenizer_dir} does not exist (or is not a directory)")
    metadata = read_checkpoint_metadata(orbax_dir)
    config = ModelConfig.from_json_dict(metadata["config"])
    dtype = dtype or metadata.get("source_dtype") or DEFAULT_EXPORT_DTYPE
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose one of {list(EXPORT_DTYPES)}")
    out_dtype = EXPORT_DTYPES[dtype]
    if head not in EXPORT_HEADS:
        raise ValueError(f"head={head!r}; choose one of {list(EXPORT_HEADS)}")
    if not (config.with_prm_head if head == "prm" else config.with_lm_head):
        raise ConversionError(
            f"{orbax_dir}: checkpoint has no {EXPORT_HEADS[head]}; nothing to export with head={head!r}"
        )
    config.to_hf_dict()  # raises early for layouts Qwen2/Qwen3 cannot express
    if head == "prm":
        remote_code = remote_code_for(config.model_type)
        architecture: dict[str, Any] = {
            "architectures": [remote_code.architecture],
            "auto_map": dict(remote_code.auto_map),
        }
    elif config.model_type in CAUSAL_LM_ARCHITECTURES:
        architecture = {"architectures": [CAUSAL_LM_ARCHITECTURES[config.model_type]]}
    else:
        raise UnsupportedCheckpointError(f"no causal-LM export for model_type={config.model_type!r}")

    vocab_size = config.vocab_size
    if head == "lm":
        tokenizer, step_separator = _lm_tokenizer(orbax_dir, metadata.get("tokenizer"), tokenizer_dir), None
    else:
        tokenizer, step_separator = checkpoint_tokenizer(
            orbax_dir, metadata.get("tokenizer"), tokenizer_dir, separator, add_separator
        )
        if tokenizer is not None:
            vocab_size = padded_vocab_size(config.vocab_size, max(len(tokenizer), step_separator.token_id + 1))

    mappings = [m for m in tensor_mappings(config) if m.head != ("score" if head == "lm" else "lm_head")]
    embed_name = "model.embed_tokens.weight"

    def hf_shape(m: TensorMapping) -> tuple[int, ...]:
        return (vocab_size,) + m.hf_shape[1:] if m.hf_name == embed_name else m.hf_shape

    specs = [TensorSpec(m.hf_name, hf_shape(m), out_dtype) for m in mappings]
    by_name = {m.hf_name: m for m in mappings}

    stored = StoredParams(orbax_dir)  # the metadata once, not once per tensor

    def get_tensor(name: str) -> np.ndarray:
        # One HF tensor read from disk: a whole parameter, or one layer of a stacked one.
        m = by_name[name]
        value = m.to_hf(stored.read(m.path, m.layer, config.parameter_dtype))
        if name == embed_name and vocab_size > config.vocab_size:
            value = grow_vocab_axis(value, vocab_size, axis=0)
        return value.astype(out_dtype, copy=False)

    notes = []
    with staged_directory(hf_dir) as staging:
        staging.mkdir()
        write_safetensors(staging, specs, get_tensor, max_shard_bytes=max_shard_bytes)
        config_json = {
            **architecture,
            **config.replace(vocab_size=vocab_size).to_hf_dict(torch_dtype=dtype),
            "transformers_version": _transformers_version(),
            **EXPORT_MARKER,  # what a later overwrite recognises as ours
        }
        if head == "lm" and tokenizer is not None and tokenizer.eos_token_id is not None:
            config_json["eos_token_id"] = tokenizer.eos_token_id
        if step_separator is not None:
            config_json["step_separator"] = step_separator.token
            config_json["step_separator_id"] = step_separator.token_id
            if step_separator.token_id != VLLM_DEFAULT_STEP_TAG_ID:
                config_json["vllm_pooler_config"] = vllm_pooler_setting(step_separator.token_id)
                if remote_code.vllm_native:  # else the note below says vLLM cannot serve it at all
                    notes.append(vllm_separator_note(step_separator.token, step_separator.token_id))
        if head == "prm" and not remote_code.vllm_native:
            notes.append(
                f"vLLM has no native {remote_code.architecture} (it serves Qwen2ForProcessRewardModel only): "
                "score this model with transformers (`AutoModel.from_pretrained(path, trust_remote_code=True)`) "
                "or prm-jax, not with vLLM's pooling runner."
            )
        if notes:
            body = "\n\n".join(notes)
            (staging / "README.md").write_text(f"# Process reward model (prm-jax export)\n\n{body}\n")
        (staging / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
        if head == "prm":
            write_remote_code(staging, config.model_type)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
    _log.info("wrote %s (%d tensors, %s)", hf_dir, len(specs), dtype)
    for note in notes:
        _log.warning("%s: %s", hf_dir, note)
    return hf_dir


def _lm_tokenizer(orbax_dir: Path, recorded: dict[str, Any] | None, tokenizer_dir: str | Path | None) -> Any:
    """The tokenizer a causal-LM export carries: the one given, else the one the run recorded, as is."""
    if tokenizer_dir is None:
        if recorded is None:
            return None
        tokenizer_dir = _recorded_tokenizer_dir(orbax_dir, recorded)
    from transformers import AutoTokenizer

    check_tokenizer_files(tokenizer_dir)
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def _transformers_version() -> str:
    try:
        import transformers

        return transformers.__version__
    except ImportError:  # the export itself does not need transformers without a tokenizer
        return "unknown"


def hf_tensor_names(config: ModelConfig) -> list[str]:
    """Names `orbax_to_hf` writes for this config (tests and docs)."""
    return [m.hf_name for m in tensor_mappings(config) if m.head != "lm_head"]


__all__ = [
    "EXPORT_MARKER",
    "HF_EXPORT",
    "ORBAX_IMPORT",
    "check_tokenizer_files",
    "hf_tensor_names",
    "hf_to_orbax",
    "is_hf_export",
    "is_orbax_import",
    "orbax_to_hf",
    "parse_size",
    "vllm_separator_note",
]
