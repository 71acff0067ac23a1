"""Flax NNX decoder for the Qwen2 / Qwen3 / Llama family with a causal-LM head and a PRM step head.

Parameter paths read like the Hugging Face names: layer 3's slice of the stacked
`model.layers.self_attn.q_proj.kernel` is HF's `model.layers.3.self_attn.q_proj.weight` (a `kernel`
or `embedding` leaf is HF's `weight`; the decoder layers are stacked on a leading axis and scanned,
see `Decoder`). Layouts
differ: kernels are `[in, out]` where torch stores `[out, in]`, and attention projections are
head-major (`[embed, heads, head_dim]`) so tensor parallelism can split heads. The PRM head's leaves
are the one naming exception (HF's `score` is a `Sequential`: `score.0`, `score.2`);
`conversion.hf_mapping` holds the layouts and that exception.

Sequences are described by `segment_ids` (0 = padding, 1..k = packed examples) and per-token
`positions`; attention never crosses segments, which covers left/right padding and packing alike
(`prm_jax.models.attention` holds the kernels).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from prm_jax.models.attention import packed_attention, resolve_attention_impl
from prm_jax.models.config import ModelConfig
from prm_jax.sharding import logical_constraint

_KERNEL_INIT = jax.nn.initializers.normal(stddev=0.02)
#: Logical axis of the stacked layer parameters (replicated by the default rules).
LAYERS_AXIS = "layers"


def _param(
    rngs: nnx.Rngs | None,
    init: Callable[..., jax.Array],
    shape: tuple[int, ...],
    axes: tuple[str | None, ...],
    dtype: jnp.dtype,
) -> nnx.Param:
    # Sharding is applied by the caller from the logical names (see sharding.state_shardings),
    # not eagerly at creation, so the same module builds on one device or a mesh.
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(init(key, shape, dtype), out_sharding=axes, eager_sharding=False)


def _zeros(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    del key
    return jnp.zeros(shape, dtype)


def _ones(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    del key
    return jnp.ones(shape, dtype)


# ---------------------------------------------------------------------------- sequence helpers


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Position of each token inside its contiguous segment (restarts at 0 per segment)."""
    length = segment_ids.shape[-1]
    index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), segment_ids.shape)
    previous = jnp.concatenate([segment_ids[..., :1] - 1, segment_ids[..., :-1]], axis=-1)
    starts = jnp.where(segment_ids != previous, index, 0)
    return index - jax.lax.cummax(starts, axis=segment_ids.ndim - 1)


def attention_impl_for(config: ModelConfig, platform: str | None = None) -> str:
    """The attention kernel a model runs: `config.attention_impl` resolved for the platform
    (`attention.resolve_attention_impl`); cuDNN takes only 16-bit inputs, so an fp32 model's
    cuDNN choice falls back to XLA."""
    impl = resolve_attention_impl(config.attention_impl, platform)
    if impl in ("cudnn", "cudnn_bias") and config.compute_dtype == jnp.float32:
        return "xla"
    return impl


def rotary_cos_sin(positions: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, T, head_dim] in fp32, HF "rotate_half" convention."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    scaled = positions.astype(jnp.float32) / config.rope_scaling_factor
    freqs = scaled[..., None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, T, heads, head_dim]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per-layer keys/values [B, S, kv_heads, head_dim] and slot segments [B, S] (0 = empty/pad).

    One array per layer, not one stacked array: each decode step updates its slots in place and
    attention reads them directly (a stacked cache made XLA:CPU copy a layer per step: 3x slower)."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    segments: jax.Array

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, slots: int, dtype: jnp.dtype | None = None) -> KVCache:
        shape = (batch, slots, config.num_key_value_heads, config.head_dim)
        dtype = dtype or config.compute_dtype
        layers = range(config.num_hidden_layers)
        return cls(
            tuple(jnp.zeros(shape, dtype) for _ in layers),
            tuple(jnp.zeros(shape, dtype) for _ in layers),
            jnp.zeros((batch, slots), jnp.int32),
        )

    def take_rows(self, rows: jax.Array) -> KVCache:
        """The cache of selected rows (e.g. one prefilled prompt repeated for its n samples)."""
        return KVCache(tuple(k[rows] for k in self.keys), tuple(v[rows] for v in self.values), self.segments[rows])


# ---------------------------------------------------------------------------- layers


def residual_constraint(x: jax.Array) -> jax.Array:
    """The residual stream [B, T, E] between blocks: sharded over its length on `tensor` by the
    default rules (`activation_norm_length`, Megatron-style sequence parallelism). Norms and
    residual adds then run on T/tensor tokens per device and each layer keeps T/tensor of its
    input for the backward; attention and the MLP gather the sequence and scatter it back.
    """
    return logical_constraint(x, ("activation_batch", "activation_norm_length", "activation_embed"))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, config: ModelConfig, rngs: nnx.Rngs | None):
        self.eps = config.rms_norm_eps
        self.compute_dtype = config.compute_dtype
        self.weight = _param(rngs, _ones, (dim,), ("norm",), config.parameter_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        # Normalise in fp32 and scale in the compute dtype, as transformers' Qwen2RMSNorm does.
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.compute_dtype) * normed.astype(self.compute_dtype)


class Embedding(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs | None):
        self.compute_dtype = config.compute_dtype
        self.embedding = _param(
            rngs, _KERNEL_INIT, (config.vocab_size, config.hidden_size), ("vocab", "embed"), config.parameter_dtype
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.compute_dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied LM head: logits against the embedding matrix."""
        return jnp.einsum("bte,ve->btv", x, self.embedding[...].astype(x.dtype))


class Projection(nnx.Module):
    """The parameters of one HF `nn.Linear` (`kernel`, optional `bias`), so paths read like HF names."""

    def __init__(self, kernel: nnx.Param, bias: nnx.Param | None = None):
        self.kernel = kernel
        self.bias = bias


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs | None):
        e, n, k, d = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        pd = config.parameter_dtype
        self.config = config
        wq = _param(rngs, _KERNEL_INIT, (e, n, d), ("embed", "heads", "head_dim"), pd)
        wk = _param(rngs, _KERNEL_INIT, (e, k, d), ("embed", "kv_heads", "head_dim"), pd)
        wv = _param(rngs, _KERNEL_INIT, (e, k, d), ("embed", "kv_heads", "head_dim"), pd)
        wo = _param(rngs, _KERNEL_INIT, (n, d, e), ("heads", "head_dim", "embed"), pd)
        # Biases are drawn after all kernels, so a seed initialises what it did before these names.
        biases = [None] * 3
        if config.attention_bias:
            biases = [
                _param(rngs, _zeros, (h, d), (axis, "head_dim"), pd)
                for h, axis in ((n, "heads"), (k, "kv_heads"), (k, "kv_heads"))
            ]
        self.q_proj, self.k_proj, self.v_proj = (Projection(w, b) for w, b in zip((wq, wk, wv), biases))
        self.o_proj = Projection(wo)
        # Qwen3's per-head q/k RMSNorm (HF `self_attn.q_norm.weight`, [head_dim]), drawn last so a
        # config without it initialises exactly what it did before.
        self.q_norm = RMSNorm(d, config, rngs) if config.qk_norm else None
        self.k_norm = RMSNorm(d, config, rngs) if config.qk_norm else None

    def _project(self, x: jax.Array, proj: Projection) -> jax.Array:
        y = jnp.einsum("bte,end->btnd", x, proj.kernel[...].astype(x.dtype))
        if proj.bias is not None:
            y = y + proj.bias[...].astype(x.dtype)
        return y

    def _qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        q, k = self._project(x, self.q_proj), self._project(x, self.k_proj)
        if self.q_norm is not None:  # Qwen3: each head's q and k normalised over head_dim, before rotary
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        v = self._project(x, self.v_proj)
        q = logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", None))
        k = logical_constraint(k, ("activation_batch", "activation_length", "activation_kv_heads", None))
        v = logical_constraint(v, ("activation_batch", "activation_length", "activation_kv_heads", None))
        return q, k, v

    def _output(self, attended: jax.Array) -> jax.Array:
        return jnp.einsum("btnd,nde->bte", attended, self.o_proj.kernel[...].astype(attended.dtype))

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """Self-attention over packed rows through the configured kernel (`attention.packed_attention`)."""
        q, k, v = self._qkv(x, cos, sin)
        impl = attention_impl_for(self.config)
        attended = packed_attention(
            q, k, v, segment_ids, impl=impl, max_segments_per_row=self.config.max_segments_per_row
        )
        return self._output(attended)

    def call_with_cache(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array,
        cache_k: jax.Array,
        cache_v: jax.Array,
        write_index: jax.Array,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Writes this chunk's keys/values at `write_index` and attends over the whole cache (XLA with
        the cache's slot mask: decoding reads a cache, not packed rows)."""
        q, k, v = self._qkv(x, cos, sin)
        start = (0, write_index, 0, 0)
        cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start)
        cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start)
        attended = jax.nn.dot_product_attention(
            q, cache_k.astype(q.dtype), cache_v.astype(q.dtype), mask=mask, implementation="xla"
        )
        return self._output(attended), cache_k, cache_v


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs | None):
        e, i, pd = config.hidden_size, config.intermediate_size, config.parameter_dtype
        self.gate_proj = Projection(_param(rngs, _KERNEL_INIT, (e, i), ("embed", "mlp"), pd))
        self.up_proj = Projection(_param(rngs, _KERNEL_INIT, (e, i), ("embed", "mlp"), pd))
        self.down_proj = Projection(_param(rngs, _KERNEL_INIT, (i, e), ("mlp", "embed"), pd))

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = x @ self.gate_proj.kernel[...].astype(x.dtype)
        up = x @ self.up_proj.kernel[...].astype(x.dtype)
        hidden = logical_constraint(jax.nn.silu(gate) * up, ("activation_batch", "activation_length", "activation_mlp"))
        return hidden @ self.down_proj.kernel[...].astype(x.dtype)


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs | None):
        self.input_layernorm = RMSNorm(config.hidden_size, config, rngs)
        self.self_attn = Attention(config, rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config, rngs)
        self.mlp = MLP(config, rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array) -> jax.Array:
        x = residual_constraint(x + self.self_attn(self.input_layernorm(x), cos, sin, segment_ids))
        return residual_constraint(x + self.mlp(self.post_attention_layernorm(x)))

    def call_with_cache(self, x, cos, sin, mask, cache_k, cache_v, write_index):
        attn, cache_k, cache_v = self.self_attn.call_with_cache(
            self.input_layernorm(x), cos, sin, mask, cache_k, cache_v, write_index
        )
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, cache_k, cache_v


_REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def stacked_layers(config: ModelConfig, rngs: nnx.Rngs | None) -> DecoderLayer:
    """All decoder layers as one module whose parameters are stacked on a leading `layers` axis.

    The layers are drawn one after another from `rngs` and then stacked, so a seed gives the
    values it gave unstacked layers. Inside a jit (`create_model`) the stacking is a copy XLA
    fuses into the initialisation.
    """
    layers = [DecoderLayer(config, rngs) for _ in range(config.num_hidden_layers)]
    graphdef = nnx.graphdef(layers[0])
    state = jax.tree.map(lambda *xs: jnp.stack(xs), *(nnx.state(layer) for layer in layers))
    state = nnx.spmd.add_axis(state, 0, {nnx.PARTITION_NAME: LAYERS_AXIS})
    return nnx.merge(graphdef, state)


def unstack_layers(layers: DecoderLayer) -> nnx.List:
    """The stacked layers as one module per layer (copies of each layer's parameter slices): the
    KV-cache decode's layout (`Decoder.call_with_cache`, `JaxSampler`)."""
    graphdef, state = nnx.split(layers)
    count = jax.tree.leaves(state)[0].shape[0]

    def layer_state(index: int) -> nnx.State:
        # tree.map makes new Variables: dropping the axis from their metadata leaves `layers`' own.
        sliced = jax.tree.map(lambda stacked: stacked[index], state)
        return nnx.spmd.remove_axis(sliced, 0, {nnx.PARTITION_NAME: LAYERS_AXIS})

    return nnx.List([nnx.merge(graphdef, layer_state(i)) for i in range(count)])


def _scan_layers(
    body: Callable[[Any, DecoderLayer], tuple[Any, Any]], carry: Any, layers: DecoderLayer, remat_policy: str = "none"
) -> tuple[Any, Any]:
    """`body(carry, layer) -> (carry, y)` over the stacked layers.

    A `jax.lax.scan` over the layers' split state, each step merging one layer's slice: unlike
    `nnx.scan`, it runs at any trace level (inside another scan or jit of the caller's). The remat
    policy wraps one layer, so the backward pass keeps one layer's residuals per step.
    """
    graphdef, state = nnx.split(layers)

    def step(carry: Any, layer_state: Any) -> tuple[Any, Any]:
        return body(carry, nnx.merge(graphdef, layer_state))

    if remat_policy != "none":
        step = jax.checkpoint(step, policy=_REMAT_POLICIES[remat_policy], prevent_cse=False)
    return jax.lax.scan(step, carry, state)


class Decoder(nnx.Module):
    """Embedding, decoder layers, final norm: the backbone both heads share.

    The layers are one `DecoderLayer` with stacked parameters (`stacked_layers`), run by a scan:
    compile time stays flat in depth (80 layers compile like one), and the remat policy applies
    per layer inside the scan.
    """

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs | None):
        self.config = config
        self.embed_tokens = Embedding(config, rngs)
        self.layers = stacked_layers(config, rngs)
        self.norm = RMSNorm(config.hidden_size, config, rngs)

    def __call__(
        self, input_ids: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None
    ) -> jax.Array:
        if segment_ids is None:
            segment_ids = jnp.ones_like(input_ids, dtype=jnp.int32)
        if positions is None:
            positions = positions_from_segments(segment_ids)
        cos, sin = rotary_cos_sin(positions, self.config)
        x = residual_constraint(self.embed_tokens(input_ids))

        def run_layer(x: jax.Array, layer: DecoderLayer) -> tuple[jax.Array, None]:
            return layer(x, cos, sin, segment_ids), None

        x, _ = _scan_layers(run_layer, x, self.layers, remat_policy=self.config.remat_policy)
        return self.norm(x)

    def call_with_cache(
        self, input_ids: jax.Array, positions: jax.Array, segment_ids: jax.Array, cache: KVCache, write_index: jax.Array
    ) -> tuple[jax.Array, KVCache]:
        """Runs new tokens [B, t] against a KV cache (prefill when the cache is empty, else decode).

        The new tokens occupy cache slots write_index..write_index+t-1 with their `segment_ids`
        (1 = real, 0 = left padding); a query sees the slots of its own segment up to its own slot.
        """
        length = input_ids.shape[1]
        slots = jnp.arange(cache.segments.shape[1], dtype=jnp.int32)
        new_slots = write_index + jnp.arange(length, dtype=jnp.int32)
        segments = jax.lax.dynamic_update_slice(cache.segments, segment_ids.astype(jnp.int32), (0, write_index))
        query_segments = segment_ids
        visible = slots[None, None, :] <= new_slots[None, :, None]
        # Padding queries see padding (never a fully masked row), real queries see real slots.
        mask = (visible & (segments[:, None, :] == query_segments[:, :, None]))[:, None]
        cos, sin = rotary_cos_sin(positions, self.config)
        x = self.embed_tokens(input_ids)

        # Layer by layer, each with its own cache arrays updated in place. A scan over stacked layers
        # and a stacked cache ran decoding 3.5x slower on XLA:CPU (8 layers, 4 x 4096 slots): every
        # step copied each layer's cache out of the stack. The sampler unstacks the weights once
        # (`unstack_layers`); sliced here instead, every step would copy each layer's weights.
        layers = self.layers if isinstance(self.layers, nnx.List) else unstack_layers(self.layers)
        keys, values = [], []
        for layer, cache_k, cache_v in zip(layers, cache.keys, cache.values):
            x, cache_k, cache_v = layer.call_with_cache(x, cos, sin, mask, cache_k, cache_v, write_index)
            keys.append(cache_k)
            values.append(cache_v)
        return self.norm(x), KVCache(tuple(keys), tuple(values), segments)


class LMHead(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs | None):
        self.kernel = _param(
            rngs, _KERNEL_INIT, (config.hidden_size, config.vocab_size), ("embed", "vocab"), config.parameter_dtype
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.kernel[...].astype(x.dtype)


class StepHead(nnx.Module):
    """The PRM head: Linear(h, h) -> ReLU -> Linear(h, num_labels), both with bias (HF `score.0/2`)."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs | None):
        h, pd = config.hidden_size, config.parameter_dtype
        self.hidden_kernel = _param(rngs, _KERNEL_INIT, (h, h), ("embed", "mlp"), pd)
        self.hidden_bias = _param(rngs, _zeros, (h,), ("mlp",), pd)
        self.out_kernel = _param(rngs, _KERNEL_INIT, (h, config.num_labels), ("mlp", "labels"), pd)
        self.out_bias = _param(rngs, _zeros, (config.num_labels,), ("labels",), pd)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(x @ self.hidden_kernel[...].astype(x.dtype) + self.hidden_bias[...].astype(x.dtype))
        return h @ self.out_kernel[...].astype(x.dtype) + self.out_bias[...].astype(x.dtype)


class Transformer(nnx.Module):
    """Backbone plus the heads the config asks for.

    `model` is the decoder stack (embedding, layers, final norm); it mirrors HF's
    `Qwen2ForCausalLM.model` so that parameter paths read as HF names (`model.layers.*`, stacked),
    which is why it is not called `decoder`. Calling the transformer returns final hidden states;
    `lm_logits` and `step_logits` apply the heads (fp32 outputs), so a training step runs the
    backbone once and only the head it needs.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs | None):
        if not (config.with_lm_head or config.with_prm_head):
            raise ValueError("a model needs at least one head (with_lm_head or with_prm_head)")
        self.config = config
        self.model = Decoder(config, rngs)
        self.lm_head = LMHead(config, rngs) if config.with_lm_head and not config.tie_word_embeddings else None
        self.score = StepHead(config, rngs) if config.with_prm_head else None

    def __call__(
        self, input_ids: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None
    ) -> jax.Array:
        return self.model(input_ids, segment_ids, positions)

    def lm_logits(self, hidden: jax.Array) -> jax.Array:
        if not self.config.with_lm_head:
            raise ValueError("this model was built without the causal-LM head (with_lm_head=False)")
        if self.lm_head is None:
            logits = self.model.embed_tokens.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        logits = logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))
        return logits.astype(jnp.float32)

    def lm_head_weight(self) -> tuple[jax.Array, bool]:
        """(weight, vocab_major) of the LM head `lm_logits` applies, for losses that apply it chunk
        by chunk: the `lm_head` kernel [embed, vocab], or the tied embedding [vocab, embed]
        (vocab_major), in the parameter dtype."""
        if not self.config.with_lm_head:
            raise ValueError("this model was built without the causal-LM head (with_lm_head=False)")
        if self.lm_head is None:
            return self.model.embed_tokens.embedding[...], True
        return self.lm_head.kernel[...], False

    def step_logits(self, hidden: jax.Array) -> jax.Array:
        if self.score is None:
            raise ValueError("this model was built without the PRM head (with_prm_head=False)")
        return self.score(hidden).astype(jnp.float32)


def step_rewards(step_logits: jax.Array) -> jax.Array:
    """Probability of the positive class ("step is correct") at every position."""
    return jax.nn.softmax(step_logits.astype(jnp.float32), axis=-1)[..., 1]
