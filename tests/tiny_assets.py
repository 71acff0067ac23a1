"""Test-side access to the tiny tokenizer (kept as a module so test imports stay short)."""

from prm_jax.tiny_tokenizer import (  # noqa: F401
    ENDOFTEXT,
    IM_END,
    IM_START,
    TINY_CHAT_TEMPLATE,
    TINY_VOCAB_SIZE,
    build_tiny_tokenizer,
)
