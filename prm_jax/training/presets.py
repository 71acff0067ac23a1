"""The architectures the training presets declare, and the check of a checkpoint against them.

A preset (`configs/qwen2_5_math_*.py`) sets `model.arch` to its base model's real shapes and names it
in `model.arch_name`. That makes a preset plannable without any checkpoint (`launch.plan` compiles
the step from `model.arch`), and with `model.init_from` the checkpoint must be that model: its
shapes must equal the declared ones (`arch_differences`), or the memory plan, the batch and mesh
sizes and the learning rate of the preset describe another model than the one being trained.

A config whose `model.arch_name` is "" (the default, `configs/tiny.py`) declares no base model:
`model.arch` is then only the architecture of a model trained from scratch and is ignored with
`init_from`, whatever that checkpoint's shapes are.

Values below are those of the released Hugging Face `config.json` files of Qwen2.5-Math-*-Instruct
(the base models share them): rope_theta 10000 and max_position_embeddings 4096 (not Qwen2.5's
1e6 and 32768), q/k/v biases, head_dim 128.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prm_jax.models.config import ModelConfig

#: Fields that do not change any array's shape: a checkpoint that differs there is still the
#: preset's model for memory and compile purposes; its own values are the ones trained with, and
#: the difference is reported as a warning (`arch_differences(..., shapes_only=False)`).
NON_SHAPE_FIELDS = ("rope_theta", "rope_scaling_factor", "rms_norm_eps", "max_position_embeddings")

_QWEN2_5_MATH_COMMON = dict(
    head_dim=128, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=4096, attention_bias=True
)

QWEN2_5_MATH_1_5B: dict[str, Any] = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    **_QWEN2_5_MATH_COMMON,
)
QWEN2_5_MATH_7B: dict[str, Any] = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    tie_word_embeddings=False,
    **_QWEN2_5_MATH_COMMON,
)
QWEN2_5_MATH_72B: dict[str, Any] = dict(
    vocab_size=152064,
    hidden_size=8192,
    intermediate_size=29568,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    tie_word_embeddings=False,
    **_QWEN2_5_MATH_COMMON,
)

#: `model.arch_name` -> architecture, for the presets.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "Qwen2.5-Math-1.5B-Instruct": QWEN2_5_MATH_1_5B,
    "Qwen2.5-Math-7B-Instruct": QWEN2_5_MATH_7B,
    "Qwen2.5-Math-72B-Instruct": QWEN2_5_MATH_72B,
}


def arch_differences(declared: Mapping[str, Any], checkpoint: ModelConfig, *, shapes_only: bool = True) -> list[str]:
    """`field: preset X, checkpoint Y` for each declared field the checkpoint's config differs in.

    `shapes_only` (the error) compares the fields that size arrays; False lists the others
    (`NON_SHAPE_FIELDS`, a warning). Fields `ModelConfig` does not have are skipped.
    """
    out = []
    for name, value in declared.items():
        if (name in NON_SHAPE_FIELDS) == shapes_only or not hasattr(checkpoint, name):
            continue
        theirs = getattr(checkpoint, name)
        if isinstance(theirs, float) or isinstance(value, float):
            same = float(theirs) == float(value)
        else:
            same = theirs == value
        if not same:
            out.append(f"{name}: preset {value}, checkpoint {theirs}")
    return out


def arch_mismatch_message(arch_name: str, init_from: str, differences: list[str]) -> str:
    return (
        f"model.init_from={init_from} is not the preset's model {arch_name} ({'; '.join(differences)}): "
        "use the preset of that model, or set --config.model.arch_name='' to train this checkpoint with "
        "the preset's other settings (the preset's memory plan then does not apply)"
    )


__all__ = [
    "ARCHITECTURES",
    "NON_SHAPE_FIELDS",
    "QWEN2_5_MATH_1_5B",
    "QWEN2_5_MATH_7B",
    "QWEN2_5_MATH_72B",
    "arch_differences",
    "arch_mismatch_message",
]
