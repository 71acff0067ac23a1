"""Generation backends built from a config section (the policy's or the judge's).

`backend = "jax"` (default) runs `prm_jax.generation.jax_sampler.JaxSampler` in this process on
CPU, TPU or GPU; the model comes from an Orbax model checkpoint (what `launch.convert` writes) or a
Hugging Face directory, loaded by `prm_jax.weights` one tensor at a time onto the mesh.
`backend = "vllm"` serves an HF directory with vLLM (optional extra, on GPUs or vLLM's CPU build;
imported only here, lazily). `backend = "openai"` sends the requests to an OpenAI-compatible server
(`section.openai.base_url`, e.g. vLLM's `python -m vllm.entrypoints.openai.api_server`) serving
`model_path` as its model name, with prompts rendered by the local `tokenizer_path` (a judge may use
the chat endpoint instead). All take rendered strings (the policy's prompts and step prefixes) or chat
messages (the judge's) and return the same `RequestOutput`, so the stages cannot tell them apart.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_pipeline.config import BACKENDS
from prm_jax.generation.types import GenerationBackend, Prompt, render_prompt

_log = logging.getLogger(__name__)


def mesh_shape(spec: str) -> dict[str, int]:
    """`"fsdp=4,tensor=2"` -> `{"fsdp": 4, "tensor": 2}`; empty -> {} (one device)."""
    shape = {}
    for part in spec.split(",") if spec else ():
        axis, _, size = part.partition("=")
        if not size:
            raise ValueError(f"mesh {spec!r}: expected axis=size pairs like 'fsdp=4,tensor=2'")
        shape[axis.strip()] = int(size)
    return shape


def _mesh_from_string(spec: str):
    """`"fsdp=4,tensor=2"` -> a mesh; empty -> None (one device)."""
    if not spec:
        return None
    from prm_jax.sharding import make_mesh

    return make_mesh(mesh_shape(spec))


def build_backend(section: Any, *, seed: int = 0) -> GenerationBackend:
    """The backend a config section (`config.policy` or `config.judge`) describes."""
    kind = section.backend
    if kind not in BACKENDS:
        raise ValueError(f"backend={kind!r}; choose one of {BACKENDS}")
    if not section.model_path:
        raise ValueError("model_path is empty: set --config.policy.model_path (and judge.model_path)")
    if not Path(section.model_path).exists() and kind == "jax":
        raise FileNotFoundError(f"model_path {section.model_path} does not exist")
    if kind == "openai":
        from prm_jax.generation.openai_backend import OpenAIBackend

        server = section.openai
        return OpenAIBackend(
            server.base_url,
            section.model_path,
            tokenizer=section.tokenizer_path or None,
            api=server.api,
            api_key_env=server.api_key_env,
            max_concurrency=server.max_concurrency,
            max_retries=server.max_retries,
            timeout_s=server.timeout_s,
        )
    tokenizer_path = section.tokenizer_path or section.model_path
    if kind == "vllm":
        from prm_jax.generation.types import VLLMEngineConfig
        from prm_jax.generation.vllm_backend import VLLMBackend

        return VLLMBackend(
            section.model_path,
            tokenizer=section.tokenizer_path or None,
            engine=VLLMEngineConfig(**section.vllm),
            seed=seed,
        )
    from transformers import AutoTokenizer

    from prm_jax.generation.jax_sampler import JaxSampler, SamplerConfig
    from prm_jax.weights import checkpoint_kind, load_model

    is_hf = checkpoint_kind(section.model_path) == "hf"
    if not is_hf and not section.tokenizer_path:
        raise ValueError(f"{section.model_path} is an Orbax checkpoint: set tokenizer_path as well")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    mesh = _mesh_from_string(section.mesh)
    # param_dtype applies to HF weights; an Orbax checkpoint keeps the dtype it was saved in.
    model = load_model(
        section.model_path,
        head="lm",
        mesh=mesh,
        dtype=section.dtype,
        param_dtype=section.param_dtype if is_hf else None,
    )
    sampler_config = SamplerConfig(**section.sampler)
    _log.info(
        "loaded %s (%s, %d layers) for the JAX sampler",
        section.model_path,
        section.dtype,
        model.config.num_hidden_layers,
    )
    return JaxSampler(model, tokenizer, mesh=mesh, config=sampler_config)


def context_length(backend: GenerationBackend) -> int | None:
    """The longest prompt + generation the backend accepts, when it says (None = unknown)."""
    value = getattr(backend, "context_length", None)
    return int(value) if value else None


def prompt_lengths(backend: GenerationBackend, prompts: Sequence[Prompt]) -> list[int]:
    """Token counts of prompts as the backend's tokenizer renders them (`render_prompt`)."""
    return [len(render_prompt(backend.tokenizer, p)) for p in prompts]
