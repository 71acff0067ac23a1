"""The tokenizer an evaluation scores with; the model itself loads through `prm_jax.weights`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prm_jax.checkpoint import read_checkpoint_metadata
from prm_jax.conversion.hf_checkpoint import check_tokenizer_files, checkpoint_tokenizer
from prm_jax.weights import checkpoint_kind

__all__ = ["load_tokenizer"]


def load_tokenizer(model_path: str | Path, tokenizer_path: str | Path | None = None) -> Any:
    """The tokenizer to evaluate with.

    A training checkpoint records the tokenizer it was trained with: by default that one, and a
    `tokenizer_path` must give the separator the same id over the same vocabulary (the rule of
    the export, `checkpoint_tokenizer`). Otherwise `tokenizer_path` if given, else the one
    saved in a Hugging Face model directory; an Orbax checkpoint that records none needs
    `tokenizer_path`."""
    from transformers import AutoTokenizer

    if checkpoint_kind(model_path) == "orbax":
        recorded = read_checkpoint_metadata(model_path).get("tokenizer")
        if recorded is not None:
            return checkpoint_tokenizer(Path(model_path), recorded, tokenizer_path, None, add_separator=True)[0]
        if tokenizer_path is None:
            raise ValueError(
                f"{model_path} is an Orbax checkpoint that records no tokenizer; pass the tokenizer directory "
                "(e.g. the base model's or the exported HF directory) with --tokenizer"
            )
    source = Path(tokenizer_path or model_path)
    if source.is_dir():  # a FIFO or a device named tokenizer.json would block transformers, or never end
        check_tokenizer_files(source)
    return AutoTokenizer.from_pretrained(str(source))
