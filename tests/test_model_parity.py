"""The NNX decoder matches transformers (torch CPU) on the same random weights."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import jax_arrays_from_torch, jax_model, random_causal_lm, rng_ids
from tiny_assets import tiny_model_config

from prm_jax.models.config import ModelConfig
from prm_jax.models.factory import create_model
from prm_jax.models.transformer import positions_from_segments

CASES = {
    "qwen2_gqa2": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen2_mqa_tied_headdim12": (
        "qwen2",
        dict(num_attention_heads=6, num_key_value_heads=1, head_dim=12, tie_word_embeddings=True),
    ),
    "qwen2_mha_odd_sizes": (
        "qwen2",
        dict(hidden_size=40, intermediate_size=37, vocab_size=101, num_attention_heads=5, num_key_value_heads=5),
    ),
    "llama_no_bias_gqa4": (
        "llama",
        dict(num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=3, rope_theta=500000.0),
    ),
}


def _padded_batch(vocab: int) -> tuple[np.ndarray, np.ndarray]:
    ids = rng_ids(4, 11, vocab, seed=1)
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    mask[3, :2] = 0
    mask[3, 9:] = 0  # both
    return ids, mask


@pytest.mark.parametrize("name", sorted(CASES))
def test_hidden_states_and_lm_logits_match_transformers(name: str) -> None:
    model_type, overrides = CASES[name]
    hf = random_causal_lm(model_type, seed=len(name), **overrides)
    config = ModelConfig.from_hf_dict(hf.config.to_dict(), with_prm_head=False)
    assert config.tie_word_embeddings == overrides.get("tie_word_embeddings", False)
    assert config.attention_bias == (model_type == "qwen2")
    model = jax_model(config, jax_arrays_from_torch(hf, config))

    ids, mask = _padded_batch(config.vocab_size)
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        out = hf(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions, dtype=torch.long),
            output_hidden_states=True,
        )
    # Positions are derived from the segment ids (restart per segment), as HF does from the mask.
    hidden = model(jnp.asarray(ids), jnp.asarray(mask))
    logits = model.lm_logits(hidden)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[real], out.hidden_states[-1].numpy()[real], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(logits)[real], out.logits.numpy()[real], atol=1e-4, rtol=0)


_tiny_config = tiny_model_config


def test_packed_segments_equal_separate_sequences() -> None:
    model = create_model(_tiny_config(), seed=0)
    a, b = rng_ids(1, 7, 64, seed=2)[0], rng_ids(1, 5, 64, seed=3)[0]
    packed = np.concatenate([a, b, np.zeros(4, np.int32)])[None]
    segments = np.array([[1] * 7 + [2] * 5 + [0] * 4])
    hidden = np.asarray(model(jnp.asarray(packed), jnp.asarray(segments)))
    alone_a = np.asarray(model(jnp.asarray(a[None])))
    alone_b = np.asarray(model(jnp.asarray(b[None])))
    np.testing.assert_allclose(hidden[0, :7], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(hidden[0, 7:12], alone_b[0], atol=1e-5)
    step = np.asarray(model.step_logits(jnp.asarray(hidden)))
    assert np.isfinite(step).all()  # padding rows are never fully masked


def test_positions_restart_per_segment() -> None:
    segments = jnp.array([[0, 0, 1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 2, 3, 3, 3]])
    expected = [[0, 1, 0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0, 1, 2]]
    assert positions_from_segments(segments).tolist() == expected


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_does_not_change_values_or_gradients(policy: str) -> None:
    import jax
    from flax import nnx

    ids = jnp.asarray(rng_ids(2, 9, 64, seed=4))

    def loss(model):
        return jnp.mean(model.step_logits(model(ids)) ** 2)

    plain = create_model(_tiny_config(), seed=5)
    remat = create_model(_tiny_config(remat_policy=policy), seed=5)
    g_plain = nnx.grad(loss)(plain)
    g_remat = nnx.grad(loss)(remat)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_bf16_compute_keeps_fp32_params_and_stays_close() -> None:
    fp32 = create_model(_tiny_config(), seed=6)
    bf16 = create_model(_tiny_config(dtype="bfloat16"), seed=6)
    ids = jnp.asarray(rng_ids(2, 9, 64, seed=7))
    h32, h16 = fp32(ids), bf16(ids)
    assert h16.dtype == jnp.bfloat16
    assert bf16.model.layers.mlp.up_proj.kernel[...].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(h16, np.float32), np.asarray(h32), atol=0.1)


def test_config_reads_transformers4_and_5_styles() -> None:
    common = dict(
        model_type="qwen2",
        architectures=["Qwen2ForCausalLM"],
        vocab_size=10,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    v4 = ModelConfig.from_hf_dict({**common, "rope_theta": 12345.0, "torch_dtype": "bfloat16"})
    v5 = ModelConfig.from_hf_dict(
        {**common, "rope_parameters": {"rope_theta": 12345.0, "rope_type": "default"}, "dtype": "bfloat16"}
    )
    assert v4 == v5
    assert v4.rope_theta == 12345.0 and v4.head_dim == 4 and v4.with_lm_head and v4.with_prm_head
    prm = ModelConfig.from_hf_dict({**common, "architectures": ["Qwen2ForProcessRewardModel"]})
    assert prm.with_prm_head and not prm.with_lm_head


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "gpt2"}, "model_type='gpt2'"),
        ({"architectures": ["Qwen2ForSequenceClassification"]}, "Qwen2ForSequenceClassification"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
        ({"use_sliding_window": True}, "use_sliding_window"),
    ],
)
def test_config_rejects_unsupported(change: dict, message: str) -> None:
    from prm_jax.models.config import UnsupportedCheckpointError

    base = dict(
        model_type="qwen2",
        architectures=["Qwen2ForCausalLM"],
        vocab_size=10,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    with pytest.raises(UnsupportedCheckpointError, match=message.replace("(", r"\(").replace("[", r"\[")):
        ModelConfig.from_hf_dict({**base, **change}, source="x/config.json")


def test_scanned_layers_compile_to_one_layer_body() -> None:
    """The layers run as one scanned body: the compiled train-style program (forward, remat and
    backward) does not grow with depth, which is what keeps an 80-layer compile as fast as a
    4-layer one (`launch.plan` times the real presets)."""
    import jax
    from flax import nnx

    def compiled_size(layers: int) -> int:
        config = tiny_model_config(num_hidden_layers=layers, remat_policy="dots_no_batch")
        graphdef, params = nnx.split(create_model(config, seed=0), nnx.Param)
        ids = jnp.zeros((2, 16), jnp.int32)

        def loss(params):
            model = nnx.merge(graphdef, params)
            return jnp.sum(model.step_logits(model(ids)))

        return len(jax.jit(jax.grad(loss)).lower(params).compile().as_text())

    few, many = compiled_size(2), compiled_size(24)
    assert many < 1.1 * few, (few, many)
