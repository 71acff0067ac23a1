"""Generation backends behind one interface: the JAX sampler (CPU/TPU/GPU) and vLLM (GPU)."""

from prm_jax.generation.types import Completion, GenerationBackend, Prompt, RequestOutput, SamplingParams, render_prompt  # noqa: F401
