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
    BPE ranks in the `dashscope` wheel: `base` (base/Instruct: `<extra_0>` splits, 151651 is
    `<|quad_end|>`) and `prm` (the released Qwen2.5-Math-PRM's: 151651 is `<extra_0>`)."""
    pytest.importorskip("dashscope", reason="the real Qwen vocabulary ships in the dashscope wheel")
    from qwen_vocab import build_qwen2_5_tokenizer

    root = tmp_path_factory.mktemp("qwen2_5_tokenizers")
    return {"base": build_qwen2_5_tokenizer(root / "base"), "prm": build_qwen2_5_tokenizer(root / "prm", prm=True)}


@pytest.fixture(scope="session")
def qwen_prm_checkpoint(qwen_tokenizer_dirs, tmp_path_factory) -> dict[str, Path]:
    """A tiny Qwen2.5-shaped base (`hf_models.TINY_QWEN2_5`) imported to Orbax (`orbax`, fresh
    head) and exported as a PRM in fp32 with the real base tokenizer (`hf_prm`): what converting
    Qwen2.5-Math-Instruct gives, `<extra_0>` at 151651. Built once per session (a few seconds)."""
    from hf_models import TINY_QWEN2_5, random_causal_lm, save_hf

    from prm_jax.conversion.hf_checkpoint import hf_to_orbax, orbax_to_hf

    root = tmp_path_factory.mktemp("qwen2_5_prm")
    hf_lm = save_hf(random_causal_lm(seed=21, **TINY_QWEN2_5), root / "hf_lm")
    hf_to_orbax(hf_lm, root / "orbax", seed=5)
    orbax_to_hf(root / "orbax", root / "hf_prm", tokenizer_dir=qwen_tokenizer_dirs["base"])
    return {"hf_lm": hf_lm, "orbax": root / "orbax", "hf_prm": root / "hf_prm"}


@pytest.fixture(scope="session")
def qwen_lm_dir(qwen_tokenizer_dirs, tmp_path_factory) -> Path:
    """A tiny Qwen2.5-shaped causal LM (`hf_models.TINY_QWEN2_5`, untied: head_dim 64, the 151,936-row
    embedding) in fp32 safetensors, with the real base tokenizer in the same directory: one HF
    directory that vLLM, the JAX sampler and transformers all load. Built once per session."""
    import shutil

    from hf_models import TINY_QWEN2_5, random_causal_lm, save_hf

    out = tmp_path_factory.mktemp("qwen2_5_lm") / "lm"
    # Untied and initialised wide: at the default init a random model repeats one token greedily,
    # which would make the stop and greedy-parity tests trivial.
    save_hf(random_causal_lm(seed=11, **{**TINY_QWEN2_5, "tie_word_embeddings": False, "initializer_range": 0.2}), out)
    for file in qwen_tokenizer_dirs["base"].iterdir():
        shutil.copy(file, out / file.name)
    return out


@pytest.fixture(scope="session")
def qwen_lm_sampler(qwen_lm_dir):
    """The JAX sampler on `qwen_lm_dir`'s fp32 weights: the reference the vLLM backends are held to."""
    from transformers import AutoTokenizer

    from prm_jax.generation.jax_sampler import JaxSampler
    from prm_jax.generation.types import SamplerConfig
    from prm_jax.weights import load_model

    model = load_model(qwen_lm_dir, head="lm", dtype="float32", param_dtype="float32")
    return JaxSampler(model, AutoTokenizer.from_pretrained(qwen_lm_dir), config=SamplerConfig(max_batch_rows=16))
