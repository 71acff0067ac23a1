"""Test-side access to the tiny tokenizer, the tiny model shape and the tiny training config."""

import importlib.util
from pathlib import Path

from prm_jax.models.config import ModelConfig
from prm_jax.tiny_tokenizer import (  # noqa: F401
    ENDOFTEXT,
    IM_END,
    IM_START,
    TINY_CHAT_TEMPLATE,
    TINY_VOCAB_SIZE,
    build_tiny_tokenizer,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


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


def tiny_config(**overrides):
    """`configs/tiny.py` with dotted overrides (`{"train.num_steps": 4}`)."""
    spec = importlib.util.spec_from_file_location("tiny", CONFIGS / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config
