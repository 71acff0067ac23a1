"""Model FLOPs per token and device peak FLOP/s, for MFU.

MFU = achieved model FLOPs / (devices x peak). Training FLOPs per token = 6 x (parameters used in
matmuls) + attention: 12 x layers x heads x head_dim x seq_len for QK^T and AV, halved for the
causal mask (6 x ...), the convention of recent MaxText. The embedding lookup is not a matmul and
does not count; the LM head counts only when the objective uses it.
"""

from __future__ import annotations

import jax

from prm_jax.models.config import ModelConfig

# Dense bf16 peak FLOP/s per device (no sparsity). Matched against `device_kind` in order, the
# more specific names first: v5p reports "TPU v5", v5e "TPU v5 lite", v6e "TPU v6 lite".
PEAK_BF16_FLOPS = (
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100", 989e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100", 312e12),
    ("NVIDIA L4", 121e12),
    ("TPU v6 lite", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
)


def matmul_parameters(config: ModelConfig, objective: str) -> int:
    h, i, n, k, d = (
        config.hidden_size,
        config.intermediate_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    )
    per_layer = h * n * d + 2 * h * k * d + n * d * h + 3 * h * i
    total = config.num_hidden_layers * per_layer
    if objective == "lm":
        total += h * config.vocab_size
    else:
        total += h * h + h * config.num_labels
    return total


def training_flops_per_token(config: ModelConfig, seq_len: int, objective: str) -> float:
    attention = 6 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6 * matmul_parameters(config, objective) + attention


def forward_flops_per_token(config: ModelConfig, seq_len: int, objective: str) -> float:
    return training_flops_per_token(config, seq_len, objective) / 3


def peak_flops_per_device(device: jax.Device | None = None, override: float = 0.0) -> float | None:
    """Peak bf16 FLOP/s of one device, or None when unknown (e.g. CPU) and not overridden."""
    if override > 0:
        return override
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for prefix, flops in PEAK_BF16_FLOPS:
        if kind.startswith(prefix):
            return flops
    return None
