"""Generation backends built from a config section (the policy's or the judge's).

``backend = "jax"`` (default) runs :class:`~prm_jax.generation.jax_sampler.JaxSampler` in this
process on CPU, TPU or GPU; the model comes from an Orbax model checkpoint (what
``launch.convert`` writes; restored directly onto the mesh) or a Hugging Face directory (read
with the same tensor mapping the converter uses; host memory holds the whole model once, so
convert big models to Orbax first). ``backend = "vllm"`` serves an HF directory with vLLM on GPUs
(optional extra; imported only here, lazily). Both take prompts as rendered strings and return
the same :class:`RequestOutput`, so the stages cannot tell them apart.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from data_pipeline.config import BACKENDS
from prm_jax.generation.types import GenerationBackend

_log = logging.getLogger(__name__)


def _mesh_from_string(spec: str):
    """``"fsdp=4,tensor=2"`` -> a mesh; empty -> None (one device)."""
    if not spec:
        return None
    from prm_jax.sharding import make_mesh

    shape = {}
    for part in spec.split(","):
        axis, _, size = part.partition("=")
        if not size:
            raise ValueError(f"mesh {spec!r}: expected axis=size pairs like 'fsdp=4,tensor=2'")
        shape[axis.strip()] = int(size)
    return make_mesh(shape)


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def load_policy_model(model_path: str, *, mesh=None, dtype: str = "float32", param_dtype: str = "float32"):
    """A Transformer with its causal-LM head from an Orbax or Hugging Face directory."""
    path = Path(model_path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if _is_hf_dir(path):
        from prm_jax.conversion.hf_mapping import tensor_mappings
        from prm_jax.conversion.safetensors_io import SafetensorsCheckpoint
        from prm_jax.models.config import ModelConfig
        from prm_jax.models.factory import model_from_arrays

        config = ModelConfig.from_hf_file(path, with_prm_head=False, with_lm_head=True, dtype=dtype,
                                          param_dtype=param_dtype)
        with SafetensorsCheckpoint(path) as reader:
            arrays = {m.path: m.to_jax(reader.get(m.hf_name)) for m in tensor_mappings(config)}
        model = model_from_arrays(config, arrays, mesh=mesh)
    else:
        from prm_jax.checkpoint import restore_model

        model = restore_model(path, mesh=mesh, dtype=dtype)
    if not model.config.with_lm_head:
        raise ValueError(f"{path} has no causal-LM head (a PRM checkpoint?); the policy and the judge "
                         "must be causal LMs")
    return model


def build_backend(section: Any, *, seed: int = 0) -> GenerationBackend:
    """The backend a config section (``config.policy`` or ``config.judge``) describes."""
    kind = section.backend
    if kind not in BACKENDS:
        raise ValueError(f"backend={kind!r}; choose one of {BACKENDS}")
    if not section.model_path:
        raise ValueError("model_path is empty: set --config.policy.model_path (and judge.model_path)")
    if not Path(section.model_path).exists() and kind == "jax":
        raise FileNotFoundError(f"model_path {section.model_path} does not exist")
    tokenizer_path = section.tokenizer_path or section.model_path
    if kind == "vllm":
        from prm_jax.generation.vllm_backend import VLLMBackend

        backend = VLLMBackend(
            section.model_path, tokenizer=section.tokenizer_path or None,
            tensor_parallel_size=section.vllm.tensor_parallel_size,
            gpu_memory_utilization=section.vllm.gpu_memory_utilization,
            max_model_len=section.vllm.max_model_len or None, dtype=section.vllm.dtype, seed=seed,
            trust_remote_code=bool(section.vllm.get("trust_remote_code", False)),
        )
        backend.context_length = section.vllm.max_model_len or None
        return backend
    from transformers import AutoTokenizer

    from prm_jax.generation.jax_sampler import JaxSampler, SamplerConfig

    if not _is_hf_dir(Path(section.model_path)) and not section.tokenizer_path:
        raise ValueError(f"{section.model_path} is an Orbax checkpoint: set tokenizer_path as well")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    mesh = _mesh_from_string(section.mesh)
    model = load_policy_model(section.model_path, mesh=mesh, dtype=section.dtype, param_dtype=section.param_dtype)
    sampler_config = SamplerConfig(max_batch_rows=section.sampler.max_batch_rows,
                                   chunk_size=section.sampler.chunk_size,
                                   length_bucket=section.sampler.length_bucket)
    _log.info("loaded %s (%s, %d layers) for the JAX sampler", section.model_path, section.dtype,
              model.config.num_hidden_layers)
    return JaxSampler(model, tokenizer, mesh=mesh, config=sampler_config)


def context_length(backend: GenerationBackend) -> int | None:
    """The longest prompt + generation the backend accepts, when it says (None = unknown)."""
    value = getattr(backend, "context_length", None)
    return int(value) if value else None


def prompt_lengths(backend: GenerationBackend, prompts: Sequence[str]) -> list[int]:
    """Token counts of rendered prompts (as ``render_prompt`` encodes them)."""
    tokenizer = backend.tokenizer
    return [len(tokenizer.encode(p, add_special_tokens=False)) for p in prompts]
