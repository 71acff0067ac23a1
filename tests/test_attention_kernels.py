"""Packed attention kernels against the XLA path, on CPU.

The Pallas kernels (`splash`, `pallas_gpu`) run in the Pallas interpreter and must equal XLA on
real tokens, forward and backward, in fp32. cuDNN cannot run here: its `cudnn`/`cudnn_bias` paths
are traced and lowered for a CUDA target without a GPU, and the packed wrapper's arithmetic is
checked against a stand-in with cuDNN's packed semantics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

from prm_jax.models import attention
from prm_jax.models.attention import (
    ATTENTION_IMPLEMENTATIONS,
    attention_mask,
    cudnn_segment_layout,
    max_segments_in_batch,
    packed_attention,
    resolve_attention_impl,
)
from prm_jax.sharding import make_mesh


def packed_rows(length: int, rows: list[list[int]], left_pad: list[int] | None = None) -> jnp.ndarray:
    """segment_ids [B, T]: optional left padding, then segments of the given lengths, then padding."""
    out = np.zeros((len(rows), length), np.int32)
    for b, lengths in enumerate(rows):
        t = (left_pad or [0] * len(rows))[b]
        for i, n in enumerate(lengths):
            out[b, t : t + n] = i + 1
            t += n
        assert t <= length
    return jnp.asarray(out)


def random_qkv(seed: int, batch: int, length: int, heads: int, kv_heads: int, dim: int, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, length, heads, dim), dtype)
    k = jax.random.normal(keys[1], (batch, length, kv_heads, dim), dtype)
    v = jax.random.normal(keys[2], (batch, length, kv_heads, dim), dtype)
    weights = jax.random.normal(keys[3], (batch, length, heads, dim), jnp.float32)
    return q, k, v, weights


def outputs_and_grads(impl: str, q, k, v, segment_ids, weights, **kwargs):
    """Attention output and d/d(q, k, v) of sum(output * weights) over real (segment > 0) tokens."""
    real = (segment_ids > 0)[:, :, None, None]

    def loss(q, k, v):
        out = packed_attention(q, k, v, segment_ids, impl=impl, **kwargs)
        return jnp.sum(jnp.where(real, out.astype(jnp.float32) * weights, 0.0)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def assert_close_on_real(actual, expected, segment_ids, *, rtol: float, atol: float) -> None:
    real = np.asarray(segment_ids > 0)
    np.testing.assert_allclose(
        np.asarray(actual, np.float32)[real], np.asarray(expected, np.float32)[real], rtol=rtol, atol=atol
    )


# ---------------------------------------------------------------------------- mask, layout, resolver


def test_attention_mask_is_causal_within_segments_and_padding_sees_padding() -> None:
    segment_ids = jnp.asarray([[0, 0, 1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 2, 3, 0, 0]], jnp.int32)
    mask = np.asarray(attention_mask(segment_ids))
    ids = np.asarray(segment_ids)
    expected = np.array([[[s <= t and ids[b, s] == ids[b, t] for s in range(8)] for t in range(8)] for b in range(2)])[
        :, None
    ]
    assert mask.shape == (2, 1, 8, 8) and mask.dtype == np.bool_
    np.testing.assert_array_equal(mask, expected)
    assert mask.any(axis=-1).all()  # no fully masked query row, padding included


def test_resolve_attention_impl_per_platform() -> None:
    assert resolve_attention_impl("auto", "tpu") == "splash"
    assert resolve_attention_impl("auto", "gpu") == "cudnn"
    assert resolve_attention_impl("auto", "cuda") == "cudnn"
    assert resolve_attention_impl("auto", "rocm") == "xla"
    assert resolve_attention_impl("auto", "cpu") == "xla"
    # Without a platform: the default backend's (a live GPU may step down to cudnn_bias or xla).
    expected = {"cpu": {"xla"}, "tpu": {"splash"}, "gpu": {"cudnn", "cudnn_bias", "xla"}}
    assert resolve_attention_impl("auto") in expected.get(jax.default_backend(), {"xla"})
    for name in ATTENTION_IMPLEMENTATIONS[1:]:
        assert resolve_attention_impl(name, "tpu") == name
    with pytest.raises(ValueError, match="choose one of"):
        resolve_attention_impl("flash")


def test_cudnn_segment_layout_and_segment_count() -> None:
    segment_ids = packed_rows(12, [[3, 2], [4, 1, 2], [5]], left_pad=[2, 0, 0])
    layout = jax.jit(cudnn_segment_layout, static_argnums=1)
    seqlen, offsets = layout(segment_ids, 4)
    np.testing.assert_array_equal(seqlen, [[3, 2, -1, -1], [4, 1, 2, -1], [5, -1, -1, -1]])
    np.testing.assert_array_equal(offsets, [[2, 5, -1, -1, -1], [0, 4, 5, -1, -1], [0, -1, -1, -1, -1]])
    assert max_segments_in_batch(segment_ids) == 3
    # A bound below the row's count leaves the excess segments out.
    seqlen, offsets = layout(segment_ids, 2)
    np.testing.assert_array_equal(seqlen[1], [4, 1])
    np.testing.assert_array_equal(offsets[1], [0, 4, -1])


# ---------------------------------------------------------------------------- Pallas kernels (interpret)

# (impl, T, N, K, D): T=200 pads to 256 (one 256 block), T=384 runs three 128 blocks; K=1 takes
# splash's MQA kernel; Qwen2.5 head dims.
PALLAS_CASES = [
    ("splash", 200, 4, 2, 64),
    ("splash", 384, 4, 1, 128),
    ("pallas_gpu", 384, 4, 2, 64),
    ("pallas_gpu", 200, 4, 2, 128),
]


@pytest.mark.parametrize(("impl", "length", "heads", "kv_heads", "dim"), PALLAS_CASES)
def test_pallas_kernel_matches_xla_forward_and_backward(impl, length, heads, kv_heads, dim) -> None:
    # Several segments per row, trailing padding, and a left-padded row.
    segment_ids = packed_rows(length, [[50, 70, 41], [97, 30, 22, 9]], left_pad=[0, 5])
    q, k, v, weights = random_qkv(1, 2, length, heads, kv_heads, dim)
    out, grads = outputs_and_grads(impl, q, k, v, segment_ids, weights, interpret=True)
    ref_out, ref_grads = outputs_and_grads("xla", q, k, v, segment_ids, weights)
    assert out.shape == ref_out.shape == (2, length, heads, dim)
    assert_close_on_real(out, ref_out, segment_ids, rtol=1e-5, atol=1e-5)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("impl", "mesh_shape", "kv_heads_per_shard"),
    [
        ("splash", {"data": 2, "tensor": 2}, 1),  # 4 q / 2 kv heads split 2 ways
        ("splash", {"tensor": 4}, 1),  # 2 kv heads on 4 shards: expanded to 4, one per shard
        ("pallas_gpu", {"fsdp": 2, "tensor": 2}, 1),
    ],
)
def test_kernel_under_mesh_runs_per_shard(impl, mesh_shape, kv_heads_per_shard) -> None:
    length, heads, kv_heads, dim = 128, 4, 2, 64
    segment_ids = packed_rows(length, [[40, 30, 20], [100, 9]])
    q, k, v, weights = random_qkv(2, 2, length, heads, kv_heads, dim)
    ref_out, ref_grads = outputs_and_grads("xla", q, k, v, segment_ids, weights)
    mesh = make_mesh(mesh_shape)
    with jax.set_mesh(mesh):
        out, grads = outputs_and_grads(impl, q, k, v, segment_ids, weights, interpret=True)
        jaxpr = jax.jit(lambda q, k, v: packed_attention(q, k, v, segment_ids, impl=impl, interpret=True)).trace(
            q, k, v
        )
    # One shard_map over (data, fsdp) x tensor, with the kv heads split like the query heads.
    (eqn,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "shard_map"]
    # The kernel's constant mask tables come first, then q, k, v and the segment ids.
    q_spec, k_spec, _, seg_spec = eqn.params["in_specs"][-4:]
    batch_axis = "data" if "data" in mesh_shape else "fsdp" if "fsdp" in mesh_shape else None
    assert q_spec == k_spec == jax.sharding.PartitionSpec(batch_axis, None, "tensor", None)
    assert seg_spec == jax.sharding.PartitionSpec(batch_axis, None)
    kv_in = eqn.invars[-3].aval.shape[2]
    assert kv_in // mesh.shape["tensor"] == kv_heads_per_shard
    assert_close_on_real(out, ref_out, segment_ids, rtol=1e-5, atol=1e-5)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), rtol=1e-4, atol=1e-4)


def test_heads_that_do_not_split_are_replicated() -> None:
    # 6 query / 3 kv heads on tensor=4: neither 6 nor lcm(3, 4) = 12 divides -> heads replicated.
    mesh = make_mesh({"tensor": 4})
    spec, kv_heads = attention._mesh_head_layout(mesh.abstract_mesh, (2, 128, 6, 64), 3)
    assert spec == jax.sharding.PartitionSpec(None, None, None, None) and kv_heads == 3
    # Qwen2.5-1.5B (12 / 2) on tensor=4: kv heads expanded to 4, split like the query heads.
    spec, kv_heads = attention._mesh_head_layout(make_mesh({"data": 1, "tensor": 4}).abstract_mesh, (4, 8, 12, 128), 2)
    assert spec == jax.sharding.PartitionSpec(None, None, "tensor", None) and kv_heads == 4


# ---------------------------------------------------------------------------- cuDNN


@pytest.fixture
def cuda_tracing(monkeypatch):
    """Lets the cuDNN wrappers trace on a host without a GPU: a cuDNN version (only when no CUDA
    plugin provides one) and a Hopper device for the packed-layout check. Lowering is then done
    for the "cuda" platform explicitly."""
    try:
        cudnn_attention.check_cudnn_version()
    except RuntimeError:  # no jax_cuda12_plugin: pretend cuDNN 9.10
        monkeypatch.setattr(cudnn_attention, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(cudnn_attention, "check_compute_capability", lambda capability: True)


@pytest.mark.parametrize("impl", ["cudnn", "cudnn_bias"])
def test_cudnn_paths_trace_and_lower_for_cuda(impl, cuda_tracing) -> None:
    batch, length, heads, kv_heads, dim = 2, 256, 12, 2, 128
    q = jax.ShapeDtypeStruct((batch, length, heads, dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((batch, length, kv_heads, dim), jnp.bfloat16)
    segment_ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)

    def loss(q, k, v, segment_ids):
        out = packed_attention(q, k, v, segment_ids, impl=impl, max_segments_per_row=8)
        return out.astype(jnp.float32).sum()

    traced = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, segment_ids)
    names = {eqn.primitive.name for eqn in traced.jaxpr.eqns}
    assert {"dot_product_attention_fwd_wrapper", "dot_product_attention_bwd_wrapper"} <= names
    hlo = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert hlo.count("__cudnn$fmha") == 2  # forward and backward custom calls
    if impl == "cudnn":
        assert "\\22mask_type\\22: \\22PADDING_CAUSAL\\22" in hlo
        assert "\\22max_seg_per_batch\\22: 8" in hlo
    else:
        assert "tensor<2x1x256x256xbf16>" in hlo  # the mask as a bias


def test_cudnn_packed_lowers_under_a_mesh(cuda_tracing) -> None:
    q = jax.ShapeDtypeStruct((4, 256, 12, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((4, 256, 2, 128), jnp.bfloat16)
    segment_ids = jax.ShapeDtypeStruct((4, 256), jnp.int32)
    with jax.set_mesh(make_mesh({"data": 2, "tensor": 2})):
        traced = jax.jit(lambda q, k, v, s: packed_attention(q, k, v, s, impl="cudnn")).trace(q, kv, kv, segment_ids)
        hlo = traced.lower(lowering_platforms=("cuda",)).as_text()
    # Under a mesh jax's custom partitioning emits the cuDNN call when XLA partitions (compile time).
    assert "CustomSPMDPartitioning" in hlo
    constraints = [e.params["sharding"].spec for e in traced.jaxpr.eqns if e.primitive.name == "sharding_constraint"]
    assert constraints and all(spec == jax.sharding.PartitionSpec("data", None, "tensor", None) for spec in constraints)


def _fake_cudnn_attention(
    query, key, value, bias=None, mask=None, q_seqlen=None, kv_seqlen=None, q_offsets=None, kv_offsets=None, **kwargs
):
    """cuDNN's packed PADDING_CAUSAL attention, in XLA: token t of row b is in segment i when
    offsets[b, i] <= t < offsets[b, i] + seqlen[b, i]; attention is causal within a segment.
    Tokens outside every segment are never computed by cuDNN: here their output and their q/k/v
    gradients are NaN (like memory nobody wrote), which the wrapper must not let through."""
    assert bias is None and mask is None and kwargs["qkv_layout"] == "BTNH"
    assert kwargs["mask_type"] == cudnn_attention.MaskType.PADDING_CAUSAL
    assert q_seqlen is kv_seqlen and q_offsets is kv_offsets  # self-attention
    length = query.shape[1]
    t = jnp.arange(length)[None, :, None]
    starts, ends = q_offsets[:, None, :-1], (q_offsets[:, :-1] + q_seqlen)[:, None, :]
    inside = (starts >= 0) & (t >= starts) & (t < ends)  # [B, T, M]
    member = jnp.where(inside.any(-1), jnp.argmax(inside, axis=-1), -1)
    covered = member >= 0
    causal = jnp.tril(jnp.ones((length, length), bool))[None]
    allowed = (member[:, :, None] == member[:, None, :]) & causal
    allowed = allowed | (~covered[:, :, None] & jnp.eye(length, dtype=bool)[None])  # keep rows finite
    scale = kwargs["scale"]

    @jax.custom_vjp
    def attend(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], scale=scale, implementation="xla")

    def fwd(q, k, v):
        out, vjp = jax.vjp(attend.fun, q, k, v)
        return out, vjp

    def bwd(vjp, g):
        return tuple(jnp.where(covered[:, :, None, None], d, jnp.nan) for d in vjp(g))

    attend.defvjp(fwd, bwd)
    f32 = [x.astype(jnp.float32) for x in (query, key, value)]
    out = attend(*f32)
    return jnp.where(covered[:, :, None, None], out, jnp.nan).astype(query.dtype)


def test_cudnn_packed_wrapper_semantics(monkeypatch) -> None:
    """What `impl="cudnn"` adds around the kernel: the packed layout, zeroed padding (output and
    gradients finite and 0 there), GQA, and NaN on segments beyond `max_segments_per_row`."""
    monkeypatch.setattr(cudnn_attention, "dot_product_attention", _fake_cudnn_attention)
    length, heads, kv_heads, dim = 64, 4, 2, 64
    segment_ids = packed_rows(length, [[10, 20, 5], [30, 12]], left_pad=[0, 7])
    q, k, v, weights = random_qkv(3, 2, length, heads, kv_heads, dim, jnp.bfloat16)
    out, grads = outputs_and_grads("cudnn", q, k, v, segment_ids, weights, max_segments_per_row=3)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref_out, ref_grads = outputs_and_grads("xla", *f32, segment_ids, weights)
    padding = np.asarray(segment_ids == 0)
    assert out.dtype == jnp.bfloat16
    assert_close_on_real(out, ref_out, segment_ids, rtol=2e-2, atol=2e-2)
    assert not np.asarray(out, np.float32)[padding].any()  # padding outputs are exactly 0
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        grad = np.asarray(grad, np.float32)
        assert np.isfinite(grad).all() and not grad[padding].any()
        np.testing.assert_allclose(grad, np.asarray(ref_grad), rtol=2e-2, atol=2e-2)

    # Row 0 has 3 segments: a bound of 2 leaves the third out, and its tokens come back NaN.
    out = jax.jit(lambda q, k, v: packed_attention(q, k, v, segment_ids, impl="cudnn", max_segments_per_row=2))(q, k, v)
    third = np.asarray(segment_ids == 3)
    assert np.isnan(np.asarray(out, np.float32)[third]).all()
    assert np.isfinite(np.asarray(out, np.float32)[~third]).all()
    assert_close_on_real(
        np.where(third[..., None, None], 0, out),
        np.where(third[..., None, None], 0, ref_out),
        segment_ids,
        rtol=2e-2,
        atol=2e-2,
    )


def test_cudnn_packed_rejects_fp32() -> None:
    q, kv = np.zeros((1, 8, 2, 8), np.float32), np.zeros((1, 8, 1, 8), np.float32)
    with pytest.raises(ValueError, match="bf16/fp16"):
        packed_attention(q, kv, kv, np.ones((1, 8), np.int32), impl="cudnn")


def test_cudnn_kv_offsets_probe_matches_installed_jax() -> None:
    # jax 0.10.2 scales packed kv offsets by the query heads' stride (jax-ml/jax#39521): the probe
    # must notice, so GQA goes to cuDNN with repeated kv heads. A fixed jax may pass K heads.
    def kv_offsets(seqlen, offsets):
        query, key = jnp.zeros((1, 4, 2, 8), jnp.bfloat16), jnp.zeros((1, 4, 1, 8), jnp.bfloat16)
        return cudnn_attention._fix_seqlen_offsets(seqlen, seqlen, offsets, offsets, query, key)[3]

    second = jax.jit(kv_offsets)(np.array([[2, 2]], np.int32), np.array([[0, 2, -1]], np.int32)).reshape(-1)[1]
    assert int(second) in (2 * 8, 2 * 2 * 8)  # K * D (fixed) or N * D (jax 0.10.2)
    assert attention._cudnn_kv_offsets_use_kv_heads() == (int(second) == 2 * 8)


@pytest.mark.parametrize("impl", ["splash", "pallas_gpu"])
def test_the_model_through_each_kernel_equals_xla(impl: str) -> None:
    """The whole decoder (scanned layers, GQA, head_dim 64) on packed rows with padding: hidden
    states on real tokens and the PRM loss's parameter gradients equal the XLA path's."""
    from flax import nnx

    from prm_jax.models.config import ModelConfig
    from prm_jax.models.factory import create_model

    config = ModelConfig(
        vocab_size=97, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, attention_impl="xla",
    )  # fmt: skip
    segment_ids = packed_rows(200, [[60, 90, 30], [120, 50]])
    ids = jax.random.randint(jax.random.key(1), segment_ids.shape, 0, config.vocab_size)
    real = segment_ids > 0

    def hidden_and_grads(attention_impl: str):
        model = create_model(config.replace(attention_impl=attention_impl), seed=2)
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(params):
            m = nnx.merge(graphdef, params)
            hidden = m(ids, segment_ids)
            rewards = m.step_logits(hidden)[..., 1]
            return jnp.sum(jnp.where(real, rewards, 0.0)), hidden

        (_, hidden), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return hidden, nnx.traversals.flatten_mapping(nnx.to_pure_dict(grads))

    hidden_xla, grads_xla = hidden_and_grads("xla")
    hidden, grads = hidden_and_grads(impl)
    np.testing.assert_allclose(np.asarray(hidden)[real], np.asarray(hidden_xla)[real], rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_xla.keys()
    for path, grad in grads.items():
        np.testing.assert_allclose(
            np.asarray(grad), np.asarray(grads_xla[path]), rtol=1e-4, atol=1e-5, err_msg=str(path)
        )


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (cuDNN, Triton); CI has none")
@pytest.mark.parametrize("impl", ["cudnn", "cudnn_bias", "pallas_gpu"])
def test_gpu_kernels_match_xla_in_bf16(impl: str) -> None:
    """On a GPU: each GPU kernel against XLA on packed rows with padding, bf16, GQA, head_dim 128
    (bench.gpu_validate measures the same at the 1.5B/7B shapes and T=4096)."""
    if impl == "cudnn" and float(jax.devices()[0].compute_capability) < 9.0:
        pytest.skip("the packed cuDNN layout needs Hopper or later")
    segment_ids = packed_rows(512, [[150, 200, 90], [300, 120, 40]], left_pad=[0, 7])
    q, k, v, weights = random_qkv(3, 2, 512, 8, 2, 128, dtype=jnp.bfloat16)
    out, grads = outputs_and_grads(impl, q, k, v, segment_ids, weights, interpret=False)
    ref_out, ref_grads = outputs_and_grads("xla", q, k, v, segment_ids, weights)
    real = np.asarray(segment_ids > 0)
    for got, ref in zip((out, *grads), (ref_out, *ref_grads), strict=True):
        got, ref = np.asarray(got, np.float32)[real], np.asarray(ref, np.float32)[real]
        assert np.isfinite(got).all() and np.abs(got - ref).max() <= 2e-2 * np.abs(ref).max()
