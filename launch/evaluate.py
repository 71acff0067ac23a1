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

import jax
from absl import app, flags

from launch import errors
from launch.logs import configure_logging
from prm_jax.data.records import DataError

_TASK = flags.DEFINE_enum("task", None, ["processbench", "bon"], "Evaluation task.")
_DATA = flags.DEFINE_string("data", None, "Data file (JSONL or JSON array) or directory of *.jsonl/*.json files.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_MODEL = flags.DEFINE_string("model", None, "PRM checkpoint: Orbax model checkpoint or Hugging Face directory.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer directory (required for Orbax checkpoints).")
_PREDICTIONS = flags.DEFINE_string("predictions", None, "processbench: {id, pred} JSONL of an external critic.")
_MISSING = flags.DEFINE_enum("missing", "error", ["error", "wrong"], "Records without a prediction: error, or score as wrong.")
_CRITIC = flags.DEFINE_string("critic_model", None, "processbench: causal LM used as a critic (critique prompt).")
_BACKEND = flags.DEFINE_enum("backend", "jax", ["jax", "vllm"], "Scoring / generation backend.")
_THRESHOLD = flags.DEFINE_float("threshold", 0.5, "First step with reward below this is the predicted error.")
_TUNE_ON = flags.DEFINE_string("tune_threshold_on", None, "Also tune the threshold on this subset (e.g. gsm8k), apply to all.")
_AGGREGATIONS = flags.DEFINE_list("aggregations", ["product", "min", "last", "mean"], "bon: step-reward aggregations.")
_BON_K = flags.DEFINE_list("bon_k", [], "bon: also report metrics using only the first k responses, e.g. 1,2,4,8.")
_MAX_LENGTH = flags.DEFINE_integer(
    "max_length", None, "The model's trained context in tokens (default: max_position_embeddings; 0: no limit).")
_OVER_LENGTH = flags.DEFINE_enum(
    "over_length", "score", ["score", "skip"],
    "Inputs longer than max_length: score them anyway (RoPE extrapolates, as the model card does) or skip their "
    "record (BoN: the whole problem); counted in results.json either way.")
_MAX_RECORD_BYTES = flags.DEFINE_integer(
    "max_record_bytes", 16 * 2**20,
    "Longest data record (a JSONL line or a JSON array element) in bytes; a longer one is refused before it is "
    "parsed or tokenized.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype (jax backend).")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "bfloat16", ["bfloat16", "float32"], "Parameter dtype in memory (jax backend).")
_MESH = flags.DEFINE_string("mesh", "fsdp=-1", "Mesh axes, e.g. 'data=2,fsdp=-1,tensor=1' (-1: remaining devices).")
_TOKENS_PER_BATCH = flags.DEFINE_integer("tokens_per_batch", 16384, "Padded tokens per scoring batch.")
_MAX_ROWS = flags.DEFINE_integer("max_rows", 64, "Most sequences per scoring batch / generation group.")
_MIN_LENGTH = flags.DEFINE_integer("min_length", 64, "Smallest length bucket.")
_SAMPLES = flags.DEFINE_integer("critic_samples", 1, "critic: samples per solution (majority vote when > 1).")
_TEMPERATURE = flags.DEFINE_float("critic_temperature", 0.0, "critic: sampling temperature (0 = greedy).")
_TOP_P = flags.DEFINE_float("critic_top_p", 1.0, "critic: nucleus sampling.")
_MAX_TOKENS = flags.DEFINE_integer("critic_max_tokens", 8192, "critic: generated tokens per sample (ProcessBench: 8192).")
_OFFICIAL_PARSE = flags.DEFINE_bool(
    "official_parse", False,
    "critic: parse verdicts exactly as ProcessBench's extract_answer (last \\boxed{([^}]*)}, int()) instead of the lenient parser.",
)
_CRITIC_BATCH = flags.DEFINE_integer("critic_batch", 64, "critic: solutions per generate call.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_TP = flags.DEFINE_integer("tensor_parallel_size", 1, "vllm: GPUs per engine.")
_GPU_MEM = flags.DEFINE_float("gpu_memory_utilization", 0.9, "vllm: fraction of GPU memory.")
_TRUST_REMOTE_CODE = flags.DEFINE_bool(
    "trust_remote_code", False,
    "vllm: let the engine run Python code shipped in the checkpoint directory. Off by default: vLLM serves "
    "Qwen2ForProcessRewardModel natively; pass it only for a checkpoint whose code you have read.")
_PLOTS = flags.DEFINE_bool("plots", True, "Write PNG plots.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing DIR/results.json.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (TPU pods, SLURM, MPI).")
flags.mark_flags_as_required(["task", "data", "out"])

#: Library errors reported as one line (EvaluationDataError is a DataError; see launch.errors).
USER_ERRORS = (DataError,)


def _bon_k() -> tuple[int, ...]:
    try:
        return tuple(int(k) for k in _BON_K.value)
    except ValueError:
        raise ValueError(f"--bon_k={','.join(_BON_K.value)}: expected positive integers such as 1,2,4,8") from None


def build_config():
    """The run's EvaluationConfig from the flags; every invalid value in one ValueError."""
    from prm_jax.evaluation.runner import EvaluationConfig, parse_mesh_shape

    return EvaluationConfig(
        task=_TASK.value, data=_DATA.value, out=_OUT.value, model=_MODEL.value, tokenizer=_TOKENIZER.value,
        predictions=_PREDICTIONS.value, missing=_MISSING.value, critic_model=_CRITIC.value, backend=_BACKEND.value,
        threshold=_THRESHOLD.value, tune_threshold_on=_TUNE_ON.value, aggregations=tuple(_AGGREGATIONS.value),
        bon_k=_bon_k(), max_length=_MAX_LENGTH.value, over_length=_OVER_LENGTH.value, dtype=_DTYPE.value,
        param_dtype=_PARAM_DTYPE.value, mesh_shape=parse_mesh_shape(_MESH.value),
        tokens_per_batch=_TOKENS_PER_BATCH.value, max_rows=_MAX_ROWS.value, min_length=_MIN_LENGTH.value,
        critic_samples=_SAMPLES.value, critic_temperature=_TEMPERATURE.value, critic_top_p=_TOP_P.value,
        critic_max_tokens=_MAX_TOKENS.value, official_parse=_OFFICIAL_PARSE.value, critic_batch=_CRITIC_BATCH.value,
        seed=_SEED.value, tensor_parallel_size=_TP.value, gpu_memory_utilization=_GPU_MEM.value,
        trust_remote_code=_TRUST_REMOTE_CODE.value, max_record_bytes=_MAX_RECORD_BYTES.value, plots=_PLOTS.value, overwrite=_OVERWRITE.value,
        check_paths=True,
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from prm_jax.evaluation.runner import check_inputs, run_evaluation, summary_line

    config = build_config()
    check_inputs(config)
    configure_logging()
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    output = run_evaluation(config)
    if jax.process_index() == 0:
        print(summary_line(output.results))
        print(f"wrote {_OUT.value}/results.json, results.md, predictions.jsonl")


if __name__ == "__main__":
    errors.run(main, extra_user_errors=USER_ERRORS)
