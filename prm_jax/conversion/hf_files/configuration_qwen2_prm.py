"""Configuration for the Qwen2 process reward model (Hugging Face remote code).

This file is copied next to exported weights and loaded by transformers through the config's
`auto_map` (`trust_remote_code=True`), so it must only import what both transformers 4.45+ and
5.x provide. It deliberately adds nothing to `Qwen2Config`: the PRM has exactly the Qwen2 backbone
hyper-parameters plus `num_labels` (a standard `PretrainedConfig` field), and keeping
`model_type = "qwen2"` lets tools that dispatch on the model type (vLLM, transformers' own
rope/dtype handling) treat the checkpoint as a plain Qwen2 backbone with a different head.
"""

from transformers.models.qwen2.configuration_qwen2 import Qwen2Config


class Qwen2PRMConfig(Qwen2Config):
    """`Qwen2Config` under its own name, so `auto_map` can point at a class that ships with the weights.

    A separate class (rather than pointing `auto_map` at transformers' own `Qwen2Config`) is what
    makes `AutoConfig`/`AutoModel` resolve our modeling file; subclassing instead of copying keeps
    every field, default and backward-compatibility shim (`rope_theta` vs `rope_parameters`,
    `torch_dtype` vs `dtype`) exactly as the installed transformers version defines them.
    """

    model_type = "qwen2"
