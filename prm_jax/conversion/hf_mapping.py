"""The table between Hugging Face tensor names and our NNX parameter paths.

One `TensorMapping` per tensor says where it lives on both sides and how its layout changes
(torch `Linear` stores `[out, in]`; our kernels are `[in, out]`, attention kernels head-major).
Both conversion directions and the parity tests read this one table.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from prm_jax.models.config import ModelConfig

ParamPath = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    hf_name: str
    path: ParamPath
    hf_shape: tuple[int, ...]
    jax_shape: tuple[int, ...]
    to_jax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    is_head: bool = False  # part of the PRM step head (absent from causal-LM checkpoints)
    is_lm_head: bool = False


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)


def _linear(hf_name: str, path: ParamPath, n_in: int, n_out: int, **kw) -> TensorMapping:
    return TensorMapping(hf_name, path, (n_out, n_in), (n_in, n_out), _transpose, _transpose, **kw)


def _in_proj(hf_name: str, path: ParamPath, embed: int, heads: int, head_dim: int) -> TensorMapping:
    """q/k/v: HF [heads*head_dim, embed] <-> ours [embed, heads, head_dim]."""
    return TensorMapping(
        hf_name,
        path,
        (heads * head_dim, embed),
        (embed, heads, head_dim),
        lambda w: np.ascontiguousarray(w.T.reshape(embed, heads, head_dim)),
        lambda k: np.ascontiguousarray(k.reshape(embed, heads * head_dim).T),
    )


def _in_bias(hf_name: str, path: ParamPath, heads: int, head_dim: int) -> TensorMapping:
    return TensorMapping(
        hf_name,
        path,
        (heads * head_dim,),
        (heads, head_dim),
        lambda b: b.reshape(heads, head_dim),
        lambda b: b.reshape(heads * head_dim),
    )


def _out_proj(hf_name: str, path: ParamPath, embed: int, heads: int, head_dim: int) -> TensorMapping:
    """o: HF [embed, heads*head_dim] <-> ours [heads, head_dim, embed]."""
    return TensorMapping(
        hf_name,
        path,
        (embed, heads * head_dim),
        (heads, head_dim, embed),
        lambda w: np.ascontiguousarray(w.T.reshape(heads, head_dim, embed)),
        lambda k: np.ascontiguousarray(k.reshape(heads * head_dim, embed).T),
    )


def _vector(hf_name: str, path: ParamPath, size: int, **kw) -> TensorMapping:
    return TensorMapping(hf_name, path, (size,), (size,), _identity, _identity, **kw)


def tensor_mappings(config: ModelConfig) -> list[TensorMapping]:
    """Every tensor of a model with this config, in HF checkpoint order."""
    e, i, n, k, d, v = (
        config.hidden_size,
        config.intermediate_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        config.vocab_size,
    )
    table = [
        TensorMapping(
            "model.embed_tokens.weight", ("model", "embed_tokens", "embedding"), (v, e), (v, e),
            _identity, _identity,
        )
    ]
    for layer in range(config.num_hidden_layers):
        hf = f"model.layers.{layer}."
        ours: ParamPath = ("model", "layers", layer)
        attn = ours + ("self_attn",)
        table += [
            _in_proj(hf + "self_attn.q_proj.weight", attn + ("q_kernel",), e, n, d),
            _in_proj(hf + "self_attn.k_proj.weight", attn + ("k_kernel",), e, k, d),
            _in_proj(hf + "self_attn.v_proj.weight", attn + ("v_kernel",), e, k, d),
        ]
        if config.attention_bias:
            table += [
                _in_bias(hf + "self_attn.q_proj.bias", attn + ("q_bias",), n, d),
                _in_bias(hf + "self_attn.k_proj.bias", attn + ("k_bias",), k, d),
                _in_bias(hf + "self_attn.v_proj.bias", attn + ("v_bias",), k, d),
            ]
        table += [
            _out_proj(hf + "self_attn.o_proj.weight", attn + ("o_kernel",), e, n, d),
            _linear(hf + "mlp.gate_proj.weight", ours + ("mlp", "gate_kernel"), e, i),
            _linear(hf + "mlp.up_proj.weight", ours + ("mlp", "up_kernel"), e, i),
            _linear(hf + "mlp.down_proj.weight", ours + ("mlp", "down_kernel"), i, e),
            _vector(hf + "input_layernorm.weight", ours + ("input_layernorm", "weight"), e),
            _vector(hf + "post_attention_layernorm.weight", ours + ("post_attention_layernorm", "weight"), e),
        ]
    table.append(_vector("model.norm.weight", ("model", "norm", "weight"), e))
    if config.with_lm_head and not config.tie_word_embeddings:
        table.append(_linear("lm_head.weight", ("lm_head", "kernel"), e, v, is_lm_head=True))
    if config.with_prm_head:
        c = config.num_labels
        table += [
            _linear("score.0.weight", ("score", "hidden_kernel"), e, e, is_head=True),
            _vector("score.0.bias", ("score", "hidden_bias"), e, is_head=True),
            _linear("score.2.weight", ("score", "out_kernel"), e, c, is_head=True),
            _vector("score.2.bias", ("score", "out_bias"), c, is_head=True),
        ]
    return table
