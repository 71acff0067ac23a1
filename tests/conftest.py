"""Test setup: several CPU devices for mesh tests, fp32 matmuls for parity."""

import jax

# Must run before any JAX backend is initialised: 4 CPU devices let tests build real meshes.
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_default_matmul_precision", "highest")


# ---------------------------------------------------------------------------- real Qwen2.5 vocabulary

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def qwen_tokenizer_dirs(tmp_path_factory) -> dict[str, Path]:
    """The real-vocabulary Qwen2.5 tokenizers, built once per session (a few seconds each) from the
    BPE ranks in the ``dashscope`` wheel: ``base`` (base/Instruct: ``<extra_0>`` splits, 151651 is
    ``<|quad_end|>``) and ``prm`` (the released Qwen2.5-Math-PRM's: 151651 is ``<extra_0>``)."""
    pytest.importorskip("dashscope", reason="the real Qwen vocabulary ships in the dashscope wheel")
    from qwen_vocab import build_qwen2_5_tokenizer

    root = tmp_path_factory.mktemp("qwen2_5_tokenizers")
    return {
        "base": build_qwen2_5_tokenizer(root / "base"),
        "prm": build_qwen2_5_tokenizer(root / "prm", prm=True),
    }
