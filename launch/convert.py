r"""Convert between Hugging Face checkpoints and prm-jax Orbax checkpoints.

  python -m launch.convert --direction=hf_to_orbax --hf_dir=SRC --orbax_dir=DST [--seed=0]
  python -m launch.convert --direction=orbax_to_hf --orbax_dir=SRC --hf_dir=DST \
      [--tokenizer_dir=T] [--dtype=bfloat16|float32|float16] [--max_shard_size=5GB]

hf_to_orbax accepts a causal LM (Qwen2/Qwen3/Llama layout; the PRM head is initialised from --seed) or a
Qwen2/Qwen3ForProcessRewardModel checkpoint (head imported), and records the source weights' dtype.
orbax_to_hf writes the Qwen2.5-Math-PRM layout, loadable with
AutoModel.from_pretrained(dir, trust_remote_code=True) and by vLLM, in the recorded source dtype
unless --dtype says otherwise, with the tokenizer the training run recorded (a --tokenizer_dir
whose separator id or vocabulary disagrees with that record is refused).

The destination must be absent or empty; --overwrite replaces only what this tool wrote (an HF
export recognised by its config.json, an Orbax checkpoint by its import metadata): a training
workdir or any other folder is refused before anything is read. A conversion writes beside the
destination and swaps in at the end; what a killed conversion left there is removed by the next.
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags

from launch import errors
from launch.logs import configure_logging
from prm_jax.conversion.hf_checkpoint import HF_EXPORT, ORBAX_IMPORT, hf_to_orbax, orbax_to_hf, parse_size
from prm_jax.conversion.safetensors_io import SafetensorsFormatError
from prm_jax.output_paths import overlapping_inputs, replace_problem
from prm_jax.tokenization import STEP_SEPARATOR
from prm_jax.weights import DEFAULT_EXPORT_DTYPE, EXPORT_DTYPES, ConversionError

_DIRECTION = flags.DEFINE_enum("direction", None, ["hf_to_orbax", "orbax_to_hf"], "Conversion direction.")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face checkpoint directory (source or destination).")
_ORBAX_DIR = flags.DEFINE_string("orbax_dir", None, "Orbax model checkpoint directory (source or destination).")
_TOKENIZER_DIR = flags.DEFINE_string(
    "tokenizer_dir",
    None,
    "orbax_to_hf: tokenizer to save beside the weights (default: the one the training run recorded; "
    "a disagreeing one is refused).",
)
_DTYPE = flags.DEFINE_enum(
    "dtype",
    None,
    list(EXPORT_DTYPES),
    f"orbax_to_hf: weight dtype (default: the dtype the model was imported in, else {DEFAULT_EXPORT_DTYPE}).",
)
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"], "hf_to_orbax: stored dtype.")
_SEED = flags.DEFINE_integer("seed", 0, "hf_to_orbax: seed of a freshly initialised PRM head.")
_MAX_SHARD_SIZE = flags.DEFINE_string("max_shard_size", "5GB", "orbax_to_hf: safetensors shard size limit.")
_SEPARATOR = flags.DEFINE_string(
    "separator", None, f"orbax_to_hf: step separator token (default: the recorded one, else {STEP_SEPARATOR})."
)
_ADD_SEPARATOR = flags.DEFINE_bool(
    "add_separator", True, "orbax_to_hf: add the separator as a special token if it splits (else refuse)."
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite",
    False,
    "Replace an existing destination, only if this tool wrote it (an HF export, an imported Orbax checkpoint).",
)
_HEAD = flags.DEFINE_enum(
    "head", "prm", ["prm", "lm"], "orbax_to_hf: export the PRM (Qwen2.5-Math-PRM layout) or the causal LM (a policy)."
)

flags.mark_flags_as_required(["direction", "hf_dir", "orbax_dir"])

#: Library errors reported as one line (see launch.errors).
USER_ERRORS = (ConversionError, SafetensorsFormatError)
#: What a rerun after a full disk does: nothing partial is kept (the output is swapped in whole).
RERUN_NOTE = "it starts over: a conversion keeps nothing partial"


def _missing_dir(name: str, value: str | None) -> list[str]:
    if value is not None and not Path(value).is_dir():
        return [f"--{name}={value} does not exist (or is not a directory)"]
    return []


def config_problems() -> list[str]:
    """Every problem with the flags, found without reading a checkpoint."""
    if _DIRECTION.value == "hf_to_orbax":
        source, destination, inputs, own = "hf_dir", "orbax_dir", {"--hf_dir": _HF_DIR.value}, ORBAX_IMPORT
    else:
        source, destination, own = "orbax_dir", "hf_dir", HF_EXPORT
        inputs = {"--orbax_dir": _ORBAX_DIR.value, "--tokenizer_dir": _TOKENIZER_DIR.value}
    problems = _missing_dir(source, flags.FLAGS[source].value) + _missing_dir("tokenizer_dir", _TOKENIZER_DIR.value)
    overlaps = overlapping_inputs(inputs, flags.FLAGS[destination].value, f"--{destination}")
    problems += overlaps
    if not overlaps:  # else the destination is an input: that problem is the one to fix
        replace = replace_problem(
            flags.FLAGS[destination].value, name=f"--{destination}", own=own, overwrite=_OVERWRITE.value
        )
        problems += [replace] if replace else []
    if _SEED.value < 0:
        problems.append(f"--seed={_SEED.value} must be >= 0")
    try:
        parse_size(_MAX_SHARD_SIZE.value)
    except ValueError as error:
        problems.append(f"--{error}")
    if _SEPARATOR.value is not None and not _SEPARATOR.value.strip():
        problems.append("--separator is empty")
    return problems


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    problems = config_problems()
    if problems:
        raise errors.UserError("invalid conversion: " + "; ".join(problems))
    configure_logging()
    if _DIRECTION.value == "hf_to_orbax":
        config = hf_to_orbax(
            _HF_DIR.value,
            _ORBAX_DIR.value,
            seed=_SEED.value,
            param_dtype=_PARAM_DTYPE.value,
            overwrite=_OVERWRITE.value,
        )
        print(f"wrote Orbax checkpoint {_ORBAX_DIR.value}: {config.num_parameters():,} parameters")
    else:
        orbax_to_hf(
            _ORBAX_DIR.value,
            _HF_DIR.value,
            dtype=_DTYPE.value,
            tokenizer_dir=_TOKENIZER_DIR.value,
            separator=_SEPARATOR.value,
            add_separator=_ADD_SEPARATOR.value,
            max_shard_size=_MAX_SHARD_SIZE.value,
            overwrite=_OVERWRITE.value,
            head=_HEAD.value,
        )
        print(f"wrote Hugging Face {'PRM' if _HEAD.value == 'prm' else 'causal LM'} {_HF_DIR.value}")


if __name__ == "__main__":
    errors.run(main, extra_user_errors=USER_ERRORS, rerun_note=RERUN_NOTE)
