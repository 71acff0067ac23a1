"""Configuration for the Qwen3 process reward model (Hugging Face remote code).

The Qwen3 counterpart of `configuration_qwen2_prm.py`, shipped only with Qwen3-based exports (so a
Qwen2 export keeps loading on transformers older than 4.51, the first with Qwen3). It adds nothing
to `Qwen3Config`: the PRM has exactly the Qwen3 backbone hyper-parameters plus `num_labels`, and
`model_type = "qwen3"` keeps tools that dispatch on the model type treating the backbone as Qwen3.
"""

from transformers.models.qwen3.configuration_qwen3 import Qwen3Config


class Qwen3PRMConfig(Qwen3Config):
    """`Qwen3Config` under its own name, so `auto_map` can point at a class that ships with the weights."""

    model_type = "qwen3"
