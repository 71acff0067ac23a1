"""Tiny random Hugging Face models built locally (no hub) for parity and conversion tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import torch
from flax import nnx

from prm_jax.checkpoint import read_model_config, restore_params
from prm_jax.conversion.hf_mapping import params_from_hf
from prm_jax.models.config import ModelConfig
from prm_jax.models.factory import abstract_model, abstract_params

TINY_QWEN2: dict[str, Any] = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)

#: A Qwen2.5-shaped tiny model for tests that stand for a real Qwen checkpoint: the real 151,936-row
#: padded embedding (tokenized with the real vocabulary, `qwen_tokenizer_dirs`), head_dim 64 as
#: attention kernels need, everything else tiny.
TINY_QWEN2_5: dict[str, Any] = dict(
    vocab_size=151_936,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=1,
    num_key_value_heads=1,
    head_dim=64,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)


def random_causal_lm(model_type: str = "qwen2", seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A random-init transformers causal LM (fp32, eval mode) with non-trivial norms and biases."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    fields = {**TINY_QWEN2, **overrides}
    torch.manual_seed(seed)
    if model_type == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**fields))
    elif model_type == "qwen3":  # q/k norms, no q/k/v bias; head_dim given (Qwen3's default is 128)
        model = Qwen3ForCausalLM(
            Qwen3Config(**{"head_dim": fields["hidden_size"] // fields["num_attention_heads"], **fields})
        )
    elif model_type == "llama":
        model = LlamaForCausalLM(LlamaConfig(attention_bias=False, mlp_bias=False, **fields))
    else:
        raise ValueError(model_type)
    # Default init leaves norms at 1 and biases at 0, which would hide layout bugs.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("norm.weight") else 0.0))
    return model.eval()


def jax_arrays_from_torch(model: torch.nn.Module, config: ModelConfig) -> dict:
    """Our parameter tree of numpy arrays from a transformers state dict, via the mapping table."""
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    return params_from_hf(config, state.__getitem__)


def jax_model(config: ModelConfig, params: dict, mesh: jax.sharding.Mesh | None = None) -> nnx.Module:
    """A Transformer from a parameter tree of host arrays, cast and placed (sharded on `mesh`)."""
    targets = abstract_params(config, mesh)
    placed = jax.tree.map(lambda v, t: jax.device_put(np.asarray(v, t.dtype), t.sharding), params, targets)
    return nnx.merge(nnx.graphdef(abstract_model(config)), placed)


def restore_model(directory: Path, *, mesh: jax.sharding.Mesh | None = None, **overrides: Any) -> nnx.Module:
    """The model exactly as a checkpoint stores it (every head), for round-trip tests."""
    config = read_model_config(directory, **overrides)
    return nnx.merge(nnx.graphdef(abstract_model(config)), restore_params(directory, config, mesh=mesh))


def save_hf(model: torch.nn.Module, out_dir: Path) -> Path:
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def rng_ids(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length)).astype(np.int32)


def save_raw_checkpoint(directory: Path, params: dict, metadata: dict) -> Path:
    """An Orbax model checkpoint written as is (no checks): for tampered or older layouts."""
    import orbax.checkpoint as ocp

    from prm_jax import checkpoint

    ocp.Checkpointer(ocp.CompositeCheckpointHandler()).save(
        directory,
        args=ocp.args.Composite(
            **{checkpoint.PARAMS_ITEM: ocp.args.PyTreeSave(params), checkpoint.CONFIG_ITEM: ocp.args.JsonSave(metadata)}
        ),
    )
    return directory


def per_layer_params(flat: dict) -> dict:
    """Stacked layer parameters ({path: array}) split into one tensor per layer, as layouts 1 and 2
    (before scanned layers) stored them: `model/layers/0/...`."""
    out = {}
    for path, value in flat.items():
        if tuple(map(str, path[:2])) == ("model", "layers"):
            out.update({(*path[:2], str(i), *path[2:]): np.asarray(layer) for i, layer in enumerate(value)})
        else:
            out[path] = np.asarray(value)
    return out
