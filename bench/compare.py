"""JAX vs the PyTorch/transformers path users would otherwise pick (TRL PRMTrainer, OpenRLHF).

Both paths run the same Qwen2-shaped PRM (backbone + `Linear(h,h) -> ReLU -> Linear(h,2)`) from the
same random weights, on the same global batch, sequence length and dtype:

* JAX: the project's Trainer train step (jitted, sharded over all devices, donated buffers,
  `jax.nn.dot_product_attention`: the XLA kernel by default in jax 0.10, cuDNN with
  `--attention_impl=cudnn`), or its forward pass;
* torch: transformers `Qwen2Model` + the identical head, cross-entropy at separator positions,
  bf16 autocast, gradient checkpointing on (TRL's default), SDPA attention, AdamW; optionally a
  `torch.compile`d copy as a third row.

Before timing, a correctness guard computes the loss of one batch from the same weights in fp32 on
both paths; they must agree within 1e-3 relative, so the timings never compare different work.
Timed batches hold one sequence per row (no padding, no packing) so both paths do the same FLOPs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from prm_jax.tiny_tokenizer import TINY_VOCAB_SIZE
from prm_jax.training.presets import QWEN2_5_MATH_1_5B

_SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
)

# Qwen2.5 shapes (the PRM drops the LM head; embeddings are still there).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    ),
    "0.5b": dict(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        head_dim=64,
        tie_word_embeddings=True,
    ),
    # The Qwen2.5(-Math)-1.5B shape, from the preset's architecture (one copy of it).
    "1.5b": {k: v for k, v in QWEN2_5_MATH_1_5B.items() if k in _SHAPE_FIELDS},
    "7b": dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        head_dim=128,
    ),
}


class GuardError(AssertionError):
    """The two paths disagree on the loss of the same batch: they would not time the same work."""


def check_same_loss(jax_loss: float, torch_loss: float, rtol: float = 1e-3) -> float:
    relative = abs(jax_loss - torch_loss) / max(abs(torch_loss), 1e-12)
    if not math.isfinite(relative) or relative > rtol:
        raise GuardError(
            f"correctness guard failed: JAX loss {jax_loss:.6g} vs torch loss {torch_loss:.6g} "
            f"(relative difference {relative:.3g} > {rtol})"
        )
    return relative


@dataclasses.dataclass
class Batch:
    input_ids: np.ndarray  # [B, T] int32
    attention_mask: np.ndarray  # [B, T] 1 = token, 0 = padding
    loss_mask: np.ndarray  # [B, T] 1 at separator positions
    labels: np.ndarray  # [B, T] 0/1


def make_batch(rows: int, seq_len: int, vocab: int, seed: int, label_every: int = 64, pad_last: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    attention = np.ones((rows, seq_len), np.int32)
    if pad_last:
        attention[:, seq_len - pad_last :] = 0
    loss_mask = np.zeros((rows, seq_len), np.float32)
    loss_mask[:, label_every - 1 :: label_every] = 1.0
    loss_mask *= attention
    return Batch(
        rng.integers(0, vocab, (rows, seq_len)).astype(np.int32),
        attention,
        loss_mask,
        (rng.random((rows, seq_len)) < 0.7).astype(np.float32),
    )


# ---------------------------------------------------------------------------- torch path


def build_torch_prm(arch: dict[str, Any], seed: int, attn: str = "sdpa"):
    import torch
    from transformers import Qwen2Config, Qwen2Model

    torch.manual_seed(seed)
    config = Qwen2Config(**{k: v for k, v in arch.items()}, attn_implementation=attn, use_cache=False)

    class TorchPRM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Qwen2Model(config)
            h = config.hidden_size
            self.score = torch.nn.Sequential(torch.nn.Linear(h, h), torch.nn.ReLU(), torch.nn.Linear(h, 2))

        def forward(self, input_ids, attention_mask):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return self.score(hidden)

    return TorchPRM()


def torch_loss(logits, labels, loss_mask):
    import torch

    log_probs = torch.log_softmax(logits.float(), dim=-1)
    token_loss = -(labels * log_probs[..., 1] + (1 - labels) * log_probs[..., 0])
    return (token_loss * loss_mask).sum() / loss_mask.sum().clamp(min=1)


def jax_arrays_from_torch_prm(module, config) -> dict:
    """Our parameter tree (numpy) of a TorchPRM."""
    from prm_jax.conversion.hf_mapping import params_from_hf

    # TorchPRM's names are exactly the Qwen2ForProcessRewardModel layout (model.*, score.0/2.*).
    state = {k: v.detach().float().cpu().numpy() for k, v in module.state_dict().items()}
    return params_from_hf(config, state.__getitem__)


# ---------------------------------------------------------------------------- guard


def guard_losses(
    torch_model, model_config, arrays, jax_batch: Batch, torch_batch: Batch, device
) -> tuple[float, float]:
    """fp32 loss of `jax_batch` on the JAX path and of `torch_batch` on the torch path."""
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from prm_jax.models.factory import abstract_model
    from prm_jax.training.train_step import _loss_sums

    fp32 = model_config.replace(dtype="float32")
    params = jax.tree.map(lambda v: jnp.asarray(v, fp32.parameter_dtype), arrays)
    graphdef = nnx.graphdef(abstract_model(fp32))
    inputs = {
        "input_ids": jnp.asarray(jax_batch.input_ids),
        "segment_ids": jnp.asarray(jax_batch.attention_mask),
        "positions": jnp.asarray(np.maximum(np.cumsum(jax_batch.attention_mask, 1) - 1, 0).astype(np.int32)),
        "loss_mask": jnp.asarray(jax_batch.loss_mask),
        "labels": jnp.asarray(jax_batch.labels),
        "targets": jnp.zeros(jax_batch.input_ids.shape, jnp.int32),
    }
    with jax.default_matmul_precision("highest"):
        sums = _loss_sums(graphdef, "prm", params, inputs)[0]
    jax_value = float(sums["loss_sum"] / sums["weight"])
    torch_model = torch_model.float()
    with torch.no_grad():
        logits = torch_model(
            torch.tensor(torch_batch.input_ids, device=device).long(),
            torch.tensor(torch_batch.attention_mask, device=device),
        )
        torch_value = float(
            torch_loss(
                logits,
                torch.tensor(torch_batch.labels, device=device),
                torch.tensor(torch_batch.loss_mask, device=device),
            )
        )
    return jax_value, torch_value


# ---------------------------------------------------------------------------- runner


def _time(fn: Callable[[], Any], steps: int, sync: Callable[[Any], Any]) -> float:
    sync(fn())  # warm-up / compile
    sync(fn())
    start = time.perf_counter()
    out = None
    for _ in range(steps):
        out = fn()
    sync(out)
    return (time.perf_counter() - start) / steps


def run(
    suite: str,
    size: str,
    *,
    rows: int,
    seq_len: int,
    steps: int,
    torch_compile: bool = False,
    remat_policy: str = "dots_no_batch",
    attention_impl: str = "auto",
    guard_rows: int = 2,
    guard_seq_len: int = 128,
) -> dict[str, Any]:
    import jax
    import torch

    from prm_jax.training import flops
    from prm_jax.training.config import default_config
    from prm_jax.training.trainer import Trainer, _to_global

    if suite not in ("train", "score"):
        raise ValueError(f"suite={suite!r}; choose train or score")
    arch = dict(SIZES[size])
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    torch_model = build_torch_prm(arch, seed=0).to(device)

    config = default_config()
    config.model.arch.update(**{k: arch.get(k, config.model.arch.get(k)) for k in config.model.arch})
    config.model.dtype = "bfloat16"
    config.model.remat_policy = remat_policy if suite == "train" else "none"
    config.model.attention_impl = attention_impl
    config.train.global_batch_rows = rows
    config.data.seq_len = seq_len
    config.optimizer.warmup_steps = 0
    config.train.num_steps = 10**6

    # ---- correctness guard: same weights, same batch, fp32 on both sides.
    guard_batch = make_batch(
        guard_rows, guard_seq_len, arch["vocab_size"], seed=1, label_every=16, pad_last=guard_seq_len // 8
    )
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(config, workdir)
        model_config = trainer.model_config
        arrays = jax_arrays_from_torch_prm(torch_model, model_config)
        jax_guard, torch_guard = guard_losses(torch_model, model_config, arrays, guard_batch, guard_batch, device)
        relative = check_same_loss(jax_guard, torch_guard)

        # ---- timing batch: one sequence per row, no padding.
        batch = make_batch(rows, seq_len, arch["vocab_size"], seed=2)
        ones = np.ones_like(batch.input_ids)
        host = {
            "input_ids": batch.input_ids,
            "segment_ids": ones,
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), batch.input_ids.shape).copy(),
            "loss_mask": batch.loss_mask,
            "labels": batch.labels,
            "targets": np.zeros_like(batch.input_ids),
        }
        global_batch = _to_global(host, trainer.batch_sharding)
        params = jax.device_put(arrays, trainer.param_shardings)
        if suite == "train":
            with jax.set_mesh(trainer.mesh):
                opt_state = jax.jit(trainer.optimizer.init, out_shardings=trainer.opt_shardings)(params)
            state = {"params": params, "opt": opt_state}

            def jax_step():
                with jax.set_mesh(trainer.mesh):
                    state["params"], state["opt"], metrics = trainer.train_step(
                        state["params"], state["opt"], global_batch, np.int32(0)
                    )
                return metrics
        else:

            def jax_step():
                with jax.set_mesh(trainer.mesh):
                    return trainer.eval_step(params, global_batch)

        jax_step_s = _time(jax_step, steps, jax.block_until_ready)
        jax_peak = _jax_peak_memory()
        trainer.close()

    # ---- torch timing
    ids = torch.tensor(batch.input_ids, device=device).long()
    mask = torch.ones_like(ids)
    labels = torch.tensor(batch.labels, device=device)
    loss_mask = torch.tensor(batch.loss_mask, device=device)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def torch_runner(module):
        if suite == "train":
            module.train()
            checkpoint_kwargs = {"use_reentrant": False}
            if hasattr(module.model, "activation_checkpointing_enable"):  # transformers >= 5
                module.model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
            else:
                module.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
            optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5, fused=on_gpu)

            def step():
                with autocast:
                    loss = torch_loss(module(ids, mask), labels, loss_mask)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                return loss
        else:
            module.eval()

            def step():
                with torch.no_grad(), autocast:
                    return torch.softmax(module(ids, mask).float(), -1)[..., 1]

        return step

    def torch_sync(x):
        if on_gpu:
            torch.cuda.synchronize()
        return x

    torch_model = torch_model.float()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    torch_step_s = _time(torch_runner(torch_model), steps, torch_sync)
    torch_peak = torch.cuda.max_memory_allocated() if on_gpu else None
    compiled_step_s = None
    if torch_compile:
        compiled = torch.compile(torch_model)
        compiled_step_s = _time(torch_runner(compiled), steps, torch_sync)

    tokens = rows * seq_len
    per_token = (flops.training_flops_per_token if suite == "train" else flops.forward_flops_per_token)(
        model_config, seq_len, "prm"
    )
    peak = flops.peak_flops_per_device()
    devices = jax.device_count()

    def mfu(step_s):
        return None if peak is None else round(tokens * per_token / step_s / (peak * devices), 4)

    result = {
        "suite": suite,
        "size": size,
        "date": time.strftime("%Y-%m-%d"),
        "device": jax.devices()[0].device_kind,
        "devices": devices,
        "torch_device": str(device),
        "global_batch_rows": rows,
        "seq_len": seq_len,
        "dtype": "bfloat16",
        "remat_policy": config.model.remat_policy,
        "attention_impl": attention_impl,
        "parameters": model_config.num_parameters(),
        "guard": {"jax_loss_fp32": jax_guard, "torch_loss_fp32": torch_guard, "relative_difference": relative},
        "jax_step_s": round(jax_step_s, 5),
        "torch_step_s": round(torch_step_s, 5),
        "jax_tokens_per_s": round(tokens / jax_step_s, 1),
        "torch_tokens_per_s": round(tokens / torch_step_s, 1),
        "ratio": round(torch_step_s / jax_step_s, 3),
        "jax_mfu": mfu(jax_step_s),
        "torch_mfu": mfu(torch_step_s),
        "jax_peak_memory_bytes": jax_peak,
        "torch_peak_memory_bytes": torch_peak,
    }
    if compiled_step_s is not None:
        result.update(
            {
                "torch_compile_step_s": round(compiled_step_s, 5),
                "torch_compile_tokens_per_s": round(tokens / compiled_step_s, 1),
                "torch_compile_mfu": mfu(compiled_step_s),
            }
        )
    return result


def _jax_peak_memory() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def format_table(result: dict[str, Any]) -> str:
    rows = [("path", "step s", "tokens/s", "MFU", "peak memory")]
    rows.append(
        ("jax", result["jax_step_s"], result["jax_tokens_per_s"], result["jax_mfu"], result["jax_peak_memory_bytes"])
    )
    rows.append(
        (
            "torch",
            result["torch_step_s"],
            result["torch_tokens_per_s"],
            result["torch_mfu"],
            result["torch_peak_memory_bytes"],
        )
    )
    if "torch_compile_step_s" in result:
        rows.append(
            (
                "torch.compile",
                result["torch_compile_step_s"],
                result["torch_compile_tokens_per_s"],
                result["torch_compile_mfu"],
                None,
            )
        )
    lines = [
        f"{result['suite']} {result['size']}: {result['global_batch_rows']} x {result['seq_len']} tokens, "
        f"{result['device']} x{result['devices']}, guard rel. diff {result['guard']['relative_difference']:.2e}"
    ]
    for row in rows:
        lines.append("  ".join(f"{str(v if v is not None else '-'):>14}" for v in row))
    lines.append(f"ratio (torch step / jax step): {result['ratio']}")
    return "\n".join(lines)


def dump(result: dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
