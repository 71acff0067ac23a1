"""Test-side access to the tiny tokenizer and the tiny model shape (kept as a module so test imports stay short)."""

from prm_jax.models.config import ModelConfig
from prm_jax.tiny_tokenizer import (  # noqa: F401
    ENDOFTEXT,
    IM_END,
    IM_START,
    TINY_CHAT_TEMPLATE,
    TINY_VOCAB_SIZE,
    build_tiny_tokenizer,
)


def tiny_model_config(**overrides) -> ModelConfig:
    """A 2-layer model small enough for any test (GQA: 4 heads over 2 KV heads of 8 dims)."""
    shape = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    return ModelConfig(**{**shape, **overrides})
