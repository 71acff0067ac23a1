"""Self-attention over packed rows, through XLA or a flash kernel.

A row of `segment_ids` [B, T] (0 = padding, 1..k = packed examples, each one contiguous run)
describes the attention pattern: causal, never across segments, and padding tokens attend
causally to earlier padding only (so no query row is fully masked). `attention_mask` builds that
pattern as a [B, 1, T, T] boolean mask; `packed_attention` computes attention with it through one
of `ATTENTION_IMPLEMENTATIONS`:

- `xla`: `jax.nn.dot_product_attention` with the mask (materialises [B, N, T, T] logits).
- `cudnn_bias`: the same call with `implementation="cudnn"`: cuDNN flash attention, the mask
  passed as a [B, 1, T, T] bias. Works on any cuDNN-capable GPU; the fallback for `cudnn`.
- `cudnn`: cuDNN flash attention with native sequence packing (per-row segment lengths and
  offsets, `PADDING_CAUSAL`), no T x T mask at all. Needs a Hopper (sm90+) GPU, fp16/bf16 inputs
  and a static bound on the segments per row (`max_segments_per_row`); see `packed_attention`.
- `splash`: TPU splash attention (Pallas, block-sparse causal mask plus segment ids).
- `pallas_gpu`: the Pallas/Triton flash attention of `jax.experimental.pallas.ops.gpu`.

The two Pallas kernels run on CPU with `interpret=True` (slowly; that is how the tests check
them). Under a mesh set with `jax.set_mesh` they run per shard in a `jax.shard_map` over the batch
(`activation_batch`) and head (`activation_heads`) axes of the logical rules.

Every implementation gives the `xla` result on real (segment > 0) tokens up to float rounding;
`cudnn` differs on padding tokens (their output is 0), which losses mask anyway. The decode path
with a KV cache keeps its own mask and XLA attention; this module covers self-attention only.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Final

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from prm_jax.sharding import logical_to_partition_spec

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "DEFAULT_MAX_SEGMENTS_PER_ROW",
    "attention_mask",
    "cudnn_segment_layout",
    "max_segments_in_batch",
    "packed_attention",
    "resolve_attention_impl",
]

_log = logging.getLogger(__name__)

#: Names accepted by `resolve_attention_impl` and `packed_attention` ("auto" picks per platform).
ATTENTION_IMPLEMENTATIONS: Final = ("auto", "xla", "cudnn", "cudnn_bias", "splash", "pallas_gpu")

#: The `cudnn` kernel's default bound on segments per row. cuDNN keeps softmax statistics of shape
#: [B * max_segments, N, T] (fp32) for the backward pass, so the bound costs memory linearly; rows
#: with more segments than the bound get NaN outputs on the excess segments (see packed_attention).
DEFAULT_MAX_SEGMENTS_PER_ROW: Final = 32

# Splash (TPU) tiles are multiples of 128 lanes; the Triton kernel's forward blocks are 128 too.
_LANES = 128


# ---------------------------------------------------------------------------- the mask


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, 1, T, T] causal mask that never crosses segments.

    Padding (segment 0) attends to earlier padding only, so no query row is fully masked (fully
    masked rows give NaN in some kernels, which would then poison masked reductions).
    """
    length = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same_segment)[:, None]


# ---------------------------------------------------------------------------- choosing a kernel


def _gpu_auto_choice() -> str:
    """`cudnn` on a live CUDA GPU of compute capability >= 9.0, else what cuDNN can still do."""
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        return "cudnn"
    if not devices:
        return "cudnn"
    if "rocm" in getattr(devices[0].client, "platform_version", "").lower():
        return "xla"
    capability = getattr(devices[0], "compute_capability", None)
    if capability is not None:
        major_minor = tuple(int(part) for part in str(capability).split(".")[:2])
        if major_minor < (9, 0):
            return "cudnn_bias"  # cuDNN's packed layout needs Hopper or later
    return "cudnn"


def resolve_attention_impl(name: str, platform: str | None = None) -> str:
    """The concrete implementation for `name`; `auto` picks the best one per platform.

    `auto`: TPU -> `splash`; CUDA GPU -> `cudnn` (packed); CPU and anything else -> `xla`. With
    `platform=None` the platform is `jax.default_backend()`, and on a live GPU `auto` also looks at
    the devices: ROCm -> `xla`, a CUDA GPU older than Hopper -> `cudnn_bias` (the packed layout
    needs sm90+). An explicit `platform` ("cpu", "gpu"/"cuda", "rocm", "tpu") is taken as given,
    which is what a deviceless (AOT) compile for another platform wants. Other names are returned
    unchanged; unknown names raise ValueError.
    """
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {name!r}; choose one of {ATTENTION_IMPLEMENTATIONS}")
    if name != "auto":
        return name
    detected = platform is None
    platform = (jax.default_backend() if detected else platform).lower()
    if platform == "tpu":
        return "splash"
    if platform in ("gpu", "cuda"):
        return _gpu_auto_choice() if detected else "cudnn"
    return "xla"


# ---------------------------------------------------------------------------- entry point


def packed_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    impl: str,
    interpret: bool | None = None,
    max_segments_per_row: int | None = None,
) -> jax.Array:
    """Causal self-attention over packed rows: q [B, T, N, D], k/v [B, T, K, D] -> [B, T, N, D].

    N must be a multiple of K (grouped-query attention; query head h reads kv head h // (N // K)).
    The softmax scale is 1/sqrt(D) for every implementation. `impl` is one of
    `ATTENTION_IMPLEMENTATIONS` (`auto` goes through `resolve_attention_impl`).

    `interpret` runs the Pallas kernels (`splash`, `pallas_gpu`) in the Pallas interpreter, which
    is how they run on CPU; it is ignored by the other implementations. None (the default) decides
    by the platform the program is lowered for (`jax.lax.platform_dependent`): interpreted on CPU,
    the real kernel on TPU/GPU, also when compiling deviceless for a TPU or GPU target from a CPU
    host (`launch.plan`). Both Pallas kernels pad T
    internally to a multiple of 128 (appended tokens come after every real one, so causality keeps
    them out of the real outputs) and slice the result back.

    `max_segments_per_row` (static, only for `cudnn`; default `DEFAULT_MAX_SEGMENTS_PER_ROW`) is
    the number of segments per row cuDNN's packed layout is sized for (at least 2, at most T).
    Semantics of `cudnn` that differ from `xla`:

    - Padding tokens (segment 0) belong to no cuDNN segment: they are zeroed on the way in, their
      output is 0 (XLA's is attention over earlier padding), and no gradient reaches them.
      Losses mask padding, and real tokens never attend to padding, so nothing else changes.
    - Segments beyond `max_segments_per_row` in a row are outside cuDNN's layout too; their tokens
      output NaN, so an undersized bound shows up as a NaN loss instead of silently wrong
      attention. Size it from the data (`max_segments_in_batch`, or the packer's limit).
    - A segment is a contiguous run of one id; an id that reappears after a different one starts
      a new segment (the XLA mask would join the runs). The packers never do that.
    - Inputs must be fp16 or bf16 (cuDNN's limit), D a multiple of 8 and <= 256 (<= 128 before
      Hopper), and the GPU Hopper or later.
    - Tracing runs jax's cuDNN checks: the cuDNN version (from the CUDA plugin; without it,
      RuntimeError "cuDNN is not detected") and, for the packed layout, a device of compute
      capability >= 9.0 on the default backend. A deviceless lowering for a GPU target
      (`jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`) works once both checks pass
      (the tests stub `check_cudnn_version` and `check_compute_capability` of
      `jax._src.cudnn.fused_attention_stablehlo`). Under a mesh, jax emits the cuDNN call while
      XLA partitions the program (custom_partitioning), i.e. at compile time.
    - GQA: jax 0.10.2 scales packed kv offsets by the query heads' stride (jax-ml/jax#39521), so
      when K < N the kv heads are repeated to N unless the installed jax has the fix (probed).
    """
    impl = resolve_attention_impl(impl)
    _check_shapes(q, k, v, segment_ids)
    segment_ids = segment_ids.astype(jnp.int32)
    if impl == "xla":
        return jax.nn.dot_product_attention(q, k, v, mask=attention_mask(segment_ids), implementation="xla")
    if impl == "cudnn_bias":
        return jax.nn.dot_product_attention(q, k, v, mask=attention_mask(segment_ids), implementation="cudnn")
    if impl == "cudnn":
        return _cudnn_packed(q, k, v, segment_ids, max_segments_per_row)
    if impl in ("splash", "pallas_gpu"):
        local = _splash_local if impl == "splash" else _pallas_gpu_local

        def kernel(interpret: bool) -> Callable[..., jax.Array]:
            return lambda *args: _per_shard(functools.partial(local, interpret=interpret), *args)

        if interpret is not None:
            return kernel(interpret)(q, k, v, segment_ids)
        return jax.lax.platform_dependent(q, k, v, segment_ids, cpu=kernel(True), default=kernel(False))
    raise AssertionError(impl)  # resolve_attention_impl only returns the names above


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> None:
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [B,T,N,D] and k, v [B,T,K,D]; got {q.shape}, {k.shape}, {v.shape}")
    batch, length, heads, dim = q.shape
    if k.shape[0] != batch or k.shape[1] != length or k.shape[3] != dim:
        raise ValueError(f"self-attention needs k/v [B,T,K,D] matching q {q.shape}; got {k.shape}")
    if heads % k.shape[2]:
        raise ValueError(f"{heads} query heads are not a multiple of {k.shape[2]} kv heads")
    if segment_ids.shape != (batch, length):
        raise ValueError(f"segment_ids {segment_ids.shape} do not match q's [B, T] = {(batch, length)}")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_length(x: jax.Array, length: int, axis: int = 1) -> jax.Array:
    if x.shape[axis] == length:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad)


def _repeat_kv(x: jax.Array, heads: int) -> jax.Array:
    """[B, T, K, D] -> [B, T, heads, D], kv head j repeated so that head h reads j = h // (heads // K)."""
    return x if x.shape[2] == heads else jnp.repeat(x, heads // x.shape[2], axis=2)


# ---------------------------------------------------------------------------- shard_map over a mesh

LocalAttention = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def _axes_size(mesh, axes) -> int:
    if axes is None:
        return 1
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def _mesh_head_layout(mesh, q_shape: tuple[int, ...], kv_heads: int) -> tuple[PartitionSpec, int]:
    """(spec of q, k and v, kv heads to expand to) for attention split over batch and heads.

    Batch and heads follow the logical rules (`activation_batch`, `activation_heads`; a size that
    does not divide is replicated); the sequence and head_dim axes are never split. The kv heads
    must be split over the same mesh axes as the query heads so that each shard keeps whole query
    groups with their kv heads: if K does not divide but lcm(K, shards) divides N, the kv heads are
    repeated to lcm(K, shards) (Qwen2.5-1.5B: 12 query / 2 kv heads on tensor=4 -> 4 kv heads);
    otherwise the heads are replicated (every head shard computes all heads of its batch shard).
    """
    heads = q_shape[2]
    spec = logical_to_partition_spec(("activation_batch", None, "activation_heads", None), q_shape, mesh)
    head_axes = spec[2]
    shards = _axes_size(mesh, head_axes)
    expand_to = kv_heads
    if shards > 1 and kv_heads % shards:
        target = math.lcm(kv_heads, shards)
        if heads % target == 0:
            expand_to = target
        else:
            _log.info("attention heads (%d q / %d kv) replicated over %s", heads, kv_heads, head_axes)
            spec = PartitionSpec(spec[0], None, None, None)
    return spec, expand_to


def _per_shard(fn: LocalAttention, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """`fn` on the whole arrays, or per shard under the `jax.set_mesh` mesh (batch and head axes)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(q, k, v, segment_ids)
    spec, kv_heads = _mesh_head_layout(mesh, q.shape, k.shape[2])
    k, v = _repeat_kv(k, kv_heads), _repeat_kv(v, kv_heads)
    sharded = jax.shard_map(
        fn, mesh=mesh, in_specs=(spec, spec, spec, PartitionSpec(spec[0], None)), out_specs=spec, check_vma=False
    )
    return sharded(q, k, v, segment_ids)


# ---------------------------------------------------------------------------- splash (TPU)


def _splash_tiling(length: int) -> tuple[int, int]:
    """(padded length, block size): T padded to a multiple of 128, blocks of 512/256/128."""
    padded = _round_up(length, _LANES)
    block = next(b for b in (512, 256, _LANES) if padded % b == 0)
    return padded, block


def _splash_local(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, interpret: bool) -> jax.Array:
    """Splash attention on one shard: a kernel per example under `jax.vmap`.

    GQA is native (`make_splash_mha` takes N query and K kv heads, N % K == 0); one kv head uses
    the MQA kernel. Splash does not scale logits, so q is scaled by 1/sqrt(D) first.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    _, length, heads, dim = q.shape
    kv_heads = k.shape[2]
    padded, block = _splash_tiling(length)
    q = q * jnp.asarray(1.0 / math.sqrt(dim), q.dtype)
    # [B, T, H, D] -> [B, H, T_padded, D]; appended tokens get segment 0 (after every real token).
    q, k, v = (_pad_length(x, padded).transpose(0, 2, 1, 3) for x in (q, k, v))
    segment_ids = _pad_length(segment_ids, padded)

    block_sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        use_fused_bwd_kernel=True,
    )
    mask = splash.MultiHeadMask([splash.CausalMask((padded, padded))] * heads)
    make = splash.make_splash_mqa if kv_heads == 1 else splash.make_splash_mha
    kernel = make(mask, block_sizes=block_sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    if kv_heads == 1:
        k, v = k[:, 0], v[:, 0]
    ids = splash.SegmentIds(q=segment_ids, kv=segment_ids)
    out = jax.vmap(kernel)(q, k, v, ids)
    return out.transpose(0, 2, 1, 3)[:, :length]


# ---------------------------------------------------------------------------- Pallas/Triton (GPU)


def _pallas_gpu_local(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, interpret: bool
) -> jax.Array:
    """The Triton flash kernel on one shard. It needs as many kv heads as query heads (its kv
    BlockSpec indexes the query head), so GQA repeats the kv heads; T is padded to 128."""
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    length, heads, dim = q.shape[1], q.shape[2], q.shape[3]
    padded = _round_up(length, _LANES)
    k, v = _repeat_kv(k, heads), _repeat_kv(v, heads)
    q, k, v, segment_ids = (_pad_length(x, padded) for x in (q, k, v, segment_ids))
    out = gpu_attention.mha(q, k, v, segment_ids, sm_scale=1.0 / math.sqrt(dim), causal=True, interpret=interpret)
    return out[:, :length]


# ---------------------------------------------------------------------------- cuDNN packed


def max_segments_in_batch(segment_ids: np.ndarray | jax.Array) -> int:
    """Host-side: the most segments (contiguous runs of one non-zero id) in any row of a batch."""
    ids = np.asarray(segment_ids)
    previous = np.concatenate([np.zeros_like(ids[:, :1]), ids[:, :-1]], axis=1)
    starts = (ids != 0) & (ids != previous)
    return int(starts.sum(axis=1).max(initial=0))


def _segment_ranks(segment_ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(real, starts, rank) [B, T]: non-padding tokens, first tokens of segments, and each real
    token's segment index within its row (0, 1, ...; a new run of ids starts a new segment)."""
    ids = segment_ids.astype(jnp.int32)
    previous = jnp.concatenate([jnp.zeros_like(ids[:, :1]), ids[:, :-1]], axis=1)
    real = ids != 0
    starts = real & (ids != previous)
    return real, starts, jnp.cumsum(starts, axis=1, dtype=jnp.int32) - 1


def cudnn_segment_layout(segment_ids: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array]:
    """cuDNN's packed layout of `segment_ids` [B, T]: (seqlen [B, M], offsets [B, M + 1]), int32.

    Row b's i-th segment starts at token offsets[b, i] and has seqlen[b, i] tokens; unused entries
    are -1 (and the last offsets column always is), as the `q_seqlen`/`q_offsets` arguments of
    `jax._src.cudnn.fused_attention_stablehlo.dot_product_attention` expect. Segments beyond M are
    left out of the layout.
    """
    real, starts, rank = _segment_ranks(segment_ids)
    positions = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)

    def one_row(starts: jax.Array, real: jax.Array, rank: jax.Array) -> tuple[jax.Array, jax.Array]:
        # Index M is out of bounds: the scatters of non-start and padding tokens are dropped.
        offsets = jnp.full((max_segments,), -1, jnp.int32)
        offsets = offsets.at[jnp.where(starts, rank, max_segments)].set(positions, mode="drop")
        lengths = jnp.zeros((max_segments,), jnp.int32)
        lengths = lengths.at[jnp.where(real, rank, max_segments)].add(1, mode="drop")
        return jnp.where(offsets >= 0, lengths, -1), offsets

    seqlen, offsets = jax.vmap(one_row)(starts, real, rank)
    return seqlen, jnp.concatenate([offsets, jnp.full_like(offsets[:, :1], -1)], axis=1)


@functools.cache
def _cudnn_kv_offsets_use_kv_heads() -> bool:
    """Whether jax scales packed kv offsets by the kv heads' stride (fixed by jax-ml/jax#39521).

    jax 0.10.2's `_fix_seqlen_offsets` multiplies kv_offsets by the *query* stride N * D, so with
    fewer kv heads the keys of every segment but the first are read from the wrong tokens, with no
    error. Probed on a tiny example (host arithmetic, no GPU); when in doubt, False.
    """
    try:
        from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

        def kv_offsets(seqlen: jax.Array, offsets: jax.Array) -> jax.Array:
            query = jnp.zeros((1, 4, 2, 8), jnp.bfloat16)  # 2 query heads
            key = jnp.zeros((1, 4, 1, 8), jnp.bfloat16)  # 1 kv head
            return cudnn_attention._fix_seqlen_offsets(seqlen, seqlen, offsets, offsets, query, key)[3]

        with jax.ensure_compile_time_eval():  # concrete even when first called inside a trace
            fixed = jax.jit(kv_offsets)(np.array([[2, 2]], np.int32), np.array([[0, 2, -1]], np.int32))
            # The second segment starts at token 2: 2 * (1 kv head * 8) elements when fixed.
            return int(np.asarray(fixed).reshape(-1)[1]) == 2 * 1 * 8
    except Exception:  # noqa: BLE001 - a changed private API: fall back to the always-correct path
        return False


def _cudnn_packed(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, max_segments: int | None
) -> jax.Array:
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention impl 'cudnn' needs bf16/fp16 inputs, got {q.dtype}; use 'xla' for fp32")
    length, heads, dim = q.shape[1], q.shape[2], q.shape[3]
    # At least 2: with one segment per row jax passes no offsets, so a left-padded row would break.
    bound = DEFAULT_MAX_SEGMENTS_PER_ROW if max_segments is None else int(max_segments)
    bound = max(2, min(bound, length))
    seqlen, offsets = cudnn_segment_layout(segment_ids, bound)
    real, _, rank = _segment_ranks(segment_ids)
    covered = (real & (rank < bound))[:, :, None, None]

    kv_heads = k.shape[2]
    if kv_heads != heads and not _cudnn_kv_offsets_use_kv_heads():
        kv_heads = heads
    mesh = jax.sharding.get_abstract_mesh()
    spec = None
    if not mesh.empty and mesh.size > 1:
        # jax partitions the cuDNN call itself (custom_partitioning), but needs q, k and v sharded
        # alike: kv heads are expanded to split like the query heads, or all heads replicated.
        spec, kv_heads = _mesh_head_layout(mesh, q.shape, kv_heads)
    k, v = _repeat_kv(k, kv_heads), _repeat_kv(v, kv_heads)
    # cuDNN never reads or writes tokens outside its segments. Selecting zeros there (a select, so
    # even NaN garbage drops out) makes their q/k/v gradients exact zeros whatever cuDNN leaves in
    # those rows of dq/dk/dv; the select on the output does the same for the forward.
    q, k, v = (jnp.where(covered, x, jnp.zeros((), x.dtype)) for x in (q, k, v))
    if spec is not None:
        q, k, v = (jax.lax.with_sharding_constraint(x, spec) for x in (q, k, v))
    out = cudnn_attention.dot_product_attention(
        q,
        k,
        v,
        q_seqlen=seqlen,
        kv_seqlen=seqlen,
        q_offsets=offsets,
        kv_offsets=offsets,
        scale=1.0 / math.sqrt(dim),
        mask_type=cudnn_attention.MaskType.PADDING_CAUSAL,
        qkv_layout="BTNH",
    )
    overflow = jnp.where(real[:, :, None, None], jnp.asarray(jnp.nan, out.dtype), jnp.zeros((), out.dtype))
    return jnp.where(covered, out, overflow)
