r"""One GPU validation run: kernel parity, the 1.5B train step against torch, plan vs measured memory.

  python -m bench.gpu_validate [--out=gpu_validation.json] [--smoke] [--only=kernel_parity,...]

Prepared to run once, as is, on one lent H100/H200 (one process, one GPU: device 0) in at most
8 minutes. It prints a readable report and writes every figure as JSON (`--out`). `--smoke` runs
the same code paths on the CPU with tiny shapes (CI runs it: `tests/test_gpu_validate.py`).

Sections (budgets on one H100/H200; the whole run is held to 8 minutes):

1. `kernel_parity` (budget 90 s): `prm_jax.models.attention.packed_attention` kernels `cudnn`
   (packed), `cudnn_bias` and `pallas_gpu` (Triton, interpret=False) against `xla`, in bf16, at the
   attention shapes of Qwen2.5-1.5B (N=12, K=2, D=128) and 7B (N=28, K=4, D=128), 2 rows x T=4096
   packed with several segments, a left-padded row and trailing padding. Forward outputs and the
   gradients wrt q, k, v of sum(out * w) over real tokens are compared on real (segment > 0)
   tokens. Error = max|kernel - xla| / max|xla| per array (output, dq, dk, dv); a kernel passes
   when every array is finite and its worst error is <= 2e-2 in bf16 (1e-4 in fp32): a few bf16
   rounding steps (2^-8) at the reference's scale. The error of each path against an fp32 XLA
   reference ("vs fp32", matmul precision highest) is reported beside it: what bf16 itself costs.
   Each kernel's jitted fwd+bwd is timed (median of 5 runs after the compile run).
   `--smoke`: `splash` and `pallas_gpu` in the Pallas interpreter, T=200, fp32 and bf16.
2. `train_step_vs_torch` (budget 210 s): `bench.compare.run("train", "1.5b", ...)`, the
   comparison of `launch.benchmark` (its `SIZES` has Qwen2.5-1.5B's shape): the JAX Trainer's step
   with attention `auto` (cuDNN packed on Hopper) vs transformers + torch (bf16 autocast, gradient
   checkpointing, SDPA, AdamW), same weights, one 4096-token sequence per row, after the fp32
   correctness guard (losses within 1e-3). 4 rows on a GPU with >= 90 GiB usable by JAX (H200),
   else 2 (H100): JAX keeps its pool after its half, and torch needs ~30 GB beside it. Reports
   step time, tokens/s and MFU of both. `--smoke`: the `tiny` size, 2 x 64 tokens, 2 steps.
3. `plan_vs_peak` (budget 150 s): `configs/qwen2_5_math_1_5b.py` on one device (mesh 1x1x1,
   grad_accum_steps 1, seq_len 4096, global_batch_rows 4 where >= 90 GiB is usable, else 2; a
   batch the plan refuses is halved and planned again). The estimate is `Trainer.preflight()`:
   `training.plan.compile_step` of the Trainer's own step and its `per_device_bytes`
   (argument + output + temp - alias), the procedure and program of
   `plan_training(config, "local")`; the run then trains with that compiled executable, a few steps
   on random packed batches (several segments per row, trailing padding), and the measured figure
   is `jax.local_devices()[0].memory_stats()["peak_bytes_in_use"]`. Reports estimate, measured and
   measured / estimate (no pass/fail on the ratio; the steps' losses must be finite).
   `--smoke`: `configs/tiny.py`, 4 x 128 tokens, on the CPU, where `memory_stats()` is None (recorded,
   not a failure); it also checks that `plan_training(config, "local")` gives the same estimate.

Each section runs in a fresh subprocess (`--_section`): a crash, OOM or hang stays in its section,
its peak memory is its own, and it is stopped at twice its budget or earlier where the 8 minutes
would otherwise not leave the later sections 60% of theirs. GPU memory is not preallocated
(`XLA_PYTHON_CLIENT_PREALLOCATE=false` unless set), so torch and JAX share the device in section 2.
A section fails soft: an exception is recorded with its traceback and the run goes on. Each section
writes its figures as they come, so a section stopped at its timeout keeps what it measured.

Exit status 1 when any section errored, timed out or failed a check (parity beyond tolerance,
correctness guard, non-finite loss); 0 otherwise. JSON (schema `prm-jax/gpu-validate/1`):

    {"schema", "mode": "gpu"|"smoke", "ok": bool, "started", "total_seconds",
     "budget_seconds", "argv", "python", "git_commit",
     "sections": {NAME: {"name", "status": "passed"|"failed"|"error"|"skipped", "seconds",
                         "budget_seconds", "timeout_seconds", "environment": {jax/device info},
                         "figures": {...}, "checks": [{"name", "value", "tolerance", "passed"}],
                         "error": str|null, "traceback": str|null, "stderr_tail": str|null}}}
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import functools
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SCHEMA = "prm-jax/gpu-validate/1"
SECTIONS = ("kernel_parity", "train_step_vs_torch", "plan_vs_peak")
TITLES = {
    "kernel_parity": "1. attention kernels vs XLA (forward + q/k/v gradients)",
    "train_step_vs_torch": "2. 1.5B train step: JAX vs transformers + torch",
    "plan_vs_peak": "3. memory plan estimate vs measured peak",
}
#: Seconds per section on one H100/H200, and the whole run's limit.
BUDGET_S = {"kernel_parity": 90, "train_step_vs_torch": 210, "plan_vs_peak": 150}
TOTAL_BUDGET_S = 480
#: --smoke on 2 CPU cores (generous: CI machines are slow and shared).
SMOKE_BUDGET_S = {"kernel_parity": 120, "train_step_vs_torch": 120, "plan_vs_peak": 120}
SMOKE_TOTAL_S = 420
#: Normalised max error max|kernel - xla| / max|xla| a kernel may show, per dtype.
KERNEL_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
#: The JAX allocator limit from which a GPU counts as large (H200: 104 GiB at JAX's default 75%).
LARGE_GPU_BYTES = 90 << 30
GiB = 1 << 30


class SkipSection(Exception):
    """The section cannot run here; recorded as skipped with this reason."""


def say(*lines: str) -> None:
    for line in lines:
        print(line, flush=True)


def _json_safe(value: Any) -> Any:
    """Non-finite floats as None, numpy scalars as Python numbers: strict JSON."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _write_json(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_json_safe(record), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _gib(n: float | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / (1 << 20):.2f} MiB"


def _mfu(x: float | None) -> str:
    return "n/a (no known peak FLOP/s)" if x is None else f"{100 * x:.1f}%"


def _environment() -> dict[str, Any]:
    import jax

    device = jax.local_devices()[0]
    env = {
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "compute_capability": getattr(device, "compute_capability", None),
    }
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    env["bytes_limit"] = (stats or {}).get("bytes_limit")
    return env


def _usable_bytes() -> int | None:
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def _median_seconds(fn: Callable[[], Any], reps: int) -> float:
    import jax

    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------------------- 1. kernel parity


def packed_segment_ids(rows: int, length: int, seed: int, left_pad: int) -> np.ndarray:
    """segment_ids [rows, T]: row 1 left-padded by `left_pad`, then segments of random lengths in
    [T/16, T/3] (the last one whatever fits), then trailing padding of T/16 tokens in every row."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((rows, length), np.int32)
    end = length - max(1, length // 16)
    for b in range(rows):
        t = left_pad if b == 1 else 0
        segment = 0
        while t < end:
            n = min(int(rng.integers(max(1, length // 16), max(2, length // 3) + 1)), end - t)
            segment += 1
            ids[b, t : t + n] = segment
            t += n
    return ids


def _kernel_plan(smoke: bool) -> dict[str, Any]:
    if smoke:
        return {
            "rows": 2,
            "length": 200,  # not a multiple of 128: the Pallas kernels pad and slice back
            "shapes": {"small GQA (N=4, K=2, D=64)": (4, 2, 64)},
            "dtypes": ("float32", "bfloat16"),
            "kernels": ("splash", "pallas_gpu"),
            "interpret": True,
            "reps": 2,
        }
    return {
        "rows": 2,
        "length": 4096,
        "shapes": {"Qwen2.5-1.5B (N=12, K=2, D=128)": (12, 2, 128), "Qwen2.5-7B (N=28, K=4, D=128)": (28, 4, 128)},
        "dtypes": ("bfloat16",),
        "kernels": ("cudnn", "cudnn_bias", "pallas_gpu"),
        "interpret": False,
        "reps": 5,
    }


def _array_errors(actual: np.ndarray, expected: np.ndarray, real: np.ndarray) -> dict[str, Any]:
    a = np.asarray(actual, np.float32)[real]
    e = np.asarray(expected, np.float32)[real]
    nonfinite = int((~np.isfinite(a)).sum())
    scale = float(np.abs(e).max()) if e.size else 0.0
    if nonfinite:
        return {"max_abs": None, "mean_abs": None, "ref_max_abs": scale, "rel": None, "nonfinite": nonfinite}
    diff = np.abs(a - e)
    max_abs = float(diff.max()) if diff.size else 0.0
    return {
        "max_abs": max_abs,
        "mean_abs": float(diff.mean()) if diff.size else 0.0,
        "ref_max_abs": scale,
        "rel": max_abs / max(scale, 1e-30),
        "nonfinite": 0,
    }


def _compare(result: dict[str, np.ndarray], reference: dict[str, np.ndarray], real: np.ndarray) -> dict[str, Any]:
    per_array = {name: _array_errors(result[name], reference[name], real) for name in ("out", "dq", "dk", "dv")}
    rels = [e["rel"] for e in per_array.values()]
    worst = None if any(r is None for r in rels) else max(rels)
    return {"arrays": per_array, "worst_rel": worst}


def _attention_flops(segment_ids: np.ndarray, heads: int, dim: int) -> float:
    """Useful fwd+bwd FLOPs: causal attention within each segment (4 N D per query-key pair
    forward, 2.5x that backward); padding and cross-segment pairs count nothing."""
    pairs = 0
    for row in segment_ids:
        _, counts = np.unique(row[row > 0], return_counts=True)
        pairs += int((counts * (counts + 1) // 2).sum())
    return 3.5 * 4 * heads * dim * pairs


def section_kernel_parity(record: dict[str, Any], smoke: bool, save: Callable[[], None]) -> None:
    import jax
    import jax.numpy as jnp

    from prm_jax.models.attention import (
        DEFAULT_MAX_SEGMENTS_PER_ROW,
        max_segments_in_batch,
        packed_attention,
        resolve_attention_impl,
    )

    plan = _kernel_plan(smoke)
    figures = record["figures"]
    figures.update(
        {
            "rows": plan["rows"],
            "seq_len": plan["length"],
            "kernels": list(plan["kernels"]),
            "interpret": plan["interpret"],
            "timing": f"jitted fwd+bwd, median of {plan['reps']} runs after the compile run",
            "error_metric": "max|kernel - ref| / max|ref| on real tokens, per array (out, dq, dk, dv)",
            "tolerance": {d: KERNEL_TOLERANCE[d] for d in plan["dtypes"]},
            "auto_resolves_to": resolve_attention_impl("auto"),
            "cases": [],
        }
    )
    rows, length = plan["rows"], plan["length"]
    segment_ids_np = packed_segment_ids(rows, length, seed=0, left_pad=max(1, length // 100))
    segments = max_segments_in_batch(segment_ids_np)
    assert segments <= DEFAULT_MAX_SEGMENTS_PER_ROW, segments
    segment_ids = jnp.asarray(segment_ids_np)
    real_tokens = segment_ids_np > 0
    figures["segments_per_row"] = [int(len(np.unique(r[r > 0]))) for r in segment_ids_np]
    figures["padding_fraction"] = round(1.0 - float(real_tokens.mean()), 4)

    def build(impl: str):
        real = (segment_ids > 0)[:, :, None, None]

        def loss(q, k, v, w):
            out = packed_attention(q, k, v, segment_ids, impl=impl, interpret=plan["interpret"])
            return jnp.sum(jnp.where(real, out.astype(jnp.float32) * w, 0.0)), out

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

    def run(fn, q, k, v, w) -> dict[str, np.ndarray]:
        (_, out), (dq, dk, dv) = fn(q, k, v, w)
        return {"out": np.asarray(out, np.float32), "dq": np.asarray(dq, np.float32),
                "dk": np.asarray(dk, np.float32), "dv": np.asarray(dv, np.float32)}  # fmt: skip

    say(
        f"  {rows} rows x {length} tokens, segments per row {figures['segments_per_row']}, "
        f"padding {100 * figures['padding_fraction']:.1f}%, row 1 left-padded; {figures['timing']}",
        f"  error = {figures['error_metric']}; pass: finite and worst <= {figures['tolerance']}",
    )
    for shape_name, (heads, kv_heads, dim) in plan["shapes"].items():
        for dtype_name in plan["dtypes"]:
            dtype = jnp.dtype(dtype_name)
            keys = jax.random.split(jax.random.key(0), 4)
            q = jax.random.normal(keys[0], (rows, length, heads, dim), dtype)
            k = jax.random.normal(keys[1], (rows, length, kv_heads, dim), dtype)
            v = jax.random.normal(keys[2], (rows, length, kv_heads, dim), dtype)
            w = jax.random.normal(keys[3], (rows, length, heads, dim), jnp.float32)
            flops = _attention_flops(segment_ids_np, heads, dim)
            case: dict[str, Any] = {"shape": shape_name, "heads": heads, "kv_heads": kv_heads, "head_dim": dim,
                                    "dtype": dtype_name, "useful_flops": flops, "kernels": {}}  # fmt: skip
            figures["cases"].append(case)
            tolerance = KERNEL_TOLERANCE[dtype_name]

            # fp32 reference (what bf16 itself costs), then the xla path in the case's dtype.
            fp32_reference = None
            if dtype_name != "float32":
                with jax.default_matmul_precision("highest"):
                    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
                    fp32_reference = run(build("xla"), *f32, w)
            xla_fn = build("xla")
            reference = run(xla_fn, q, k, v, w)
            xla_s = _median_seconds(functools.partial(xla_fn, q, k, v, w), plan["reps"])
            case["kernels"]["xla"] = {"fwd_bwd_ms": 1e3 * xla_s, "tflops_per_s": flops / xla_s / 1e12}
            if fp32_reference is not None:
                case["kernels"]["xla"]["vs_fp32"] = _compare(reference, fp32_reference, real_tokens)
            for impl in plan["kernels"]:
                entry: dict[str, Any] = {}
                case["kernels"][impl] = entry
                try:
                    fn = build(impl)
                    start = time.perf_counter()
                    result = run(fn, q, k, v, w)
                    entry["compile_and_first_run_s"] = time.perf_counter() - start
                    seconds = _median_seconds(functools.partial(fn, q, k, v, w), plan["reps"])
                    entry.update({"fwd_bwd_ms": 1e3 * seconds, "tflops_per_s": flops / seconds / 1e12,
                                  "speedup_vs_xla": xla_s / seconds})  # fmt: skip
                    entry["vs_xla"] = _compare(result, reference, real_tokens)
                    if fp32_reference is not None:
                        entry["vs_fp32"] = _compare(result, fp32_reference, real_tokens)
                    worst = entry["vs_xla"]["worst_rel"]
                    entry["passed"] = worst is not None and worst <= tolerance
                    del result
                except Exception as error:  # noqa: BLE001 - one kernel failing must not stop the others
                    entry.update({"passed": False, "error": f"{type(error).__name__}: {error}",
                                  "traceback": traceback.format_exc()})  # fmt: skip
                record["checks"].append(
                    {
                        "name": f"{impl} vs xla, {shape_name}, {dtype_name}",
                        "value": entry.get("vs_xla", {}).get("worst_rel"),
                        "tolerance": tolerance,
                        "passed": bool(entry["passed"]),
                    }
                )
                save()
            say(_format_case(case, plan["kernels"]))
            del reference, fp32_reference


def _format_case(case: dict[str, Any], kernels: tuple[str, ...]) -> str:
    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    lines = [
        f"  {case['shape']}, {case['dtype']}",
        f"    {'kernel':<11}{'fwd+bwd ms':>11}{'TFLOP/s':>9}{'speedup':>9}"
        f"{'rel out':>10}{'rel dq':>10}{'rel dk':>10}{'rel dv':>10}{'vs fp32':>10}  verdict",
    ]
    for impl in ("xla", *kernels):
        entry = case["kernels"].get(impl, {})
        if "error" in entry:
            lines.append(f"    {impl:<11}ERROR {entry['error'].splitlines()[0][:150]}")
            continue
        arrays = entry.get("vs_xla", {}).get("arrays", {})
        rels = [num(arrays.get(a, {}).get("rel"), ".2e") if arrays else "-" for a in ("out", "dq", "dk", "dv")]
        vs_fp32 = entry.get("vs_fp32", {}).get("worst_rel")
        verdict = "reference" if impl == "xla" else ("pass" if entry.get("passed") else "FAIL")
        lines.append(
            f"    {impl:<11}{num(entry.get('fwd_bwd_ms'), '.2f'):>11}{num(entry.get('tflops_per_s'), '.1f'):>9}"
            f"{num(entry.get('speedup_vs_xla', 1.0 if impl == 'xla' else None), '.2f'):>9}"
            + "".join(f"{r:>10}" for r in rels)
            + f"{num(vs_fp32, '.2e'):>10}  {verdict}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- 2. train step vs torch


def section_train_step_vs_torch(record: dict[str, Any], smoke: bool, save: Callable[[], None]) -> None:
    from bench.compare import SIZES, format_table, run
    from prm_jax.models.attention import resolve_attention_impl

    figures = record["figures"]
    if smoke:
        size, rows, seq_len, steps = "tiny", 2, 64, 2
    else:
        import torch

        if not torch.cuda.is_available():  # its 1.5B step would run on the CPU for hours
            raise RuntimeError(f"torch {torch.__version__} sees no CUDA device: install a CUDA build of torch")
        size, seq_len, steps = "1.5b", 4096, 5
        usable = _usable_bytes()
        rows = 4 if usable is not None and usable >= LARGE_GPU_BYTES else 2
    figures.update(
        {
            "size": size,
            "size_note": "bench.compare.SIZES has '1.5b' (Qwen2.5-1.5B shape)" if "1.5b" in SIZES else "no 1.5b size",
            "rows": rows,
            "seq_len": seq_len,
            "steps": steps,
            "attention_impl": "auto",
            "auto_resolves_to": resolve_attention_impl("auto"),
        }
    )
    save()
    say(f"  bench.compare.run('train', {size!r}, rows={rows}, seq_len={seq_len}, steps={steps}, attention_impl='auto')")
    result = run("train", size, rows=rows, seq_len=seq_len, steps=steps, attention_impl="auto")
    figures["result"] = result
    record["checks"].append(
        {
            "name": "correctness guard (fp32 loss, JAX vs torch)",
            "value": result["guard"]["relative_difference"],
            "tolerance": 1e-3,
            "passed": bool(result["guard"]["relative_difference"] <= 1e-3),  # bench.compare also raises beyond it
        }
    )
    finite = all(math.isfinite(result[k]) and result[k] > 0 for k in ("jax_step_s", "torch_step_s"))
    record["checks"].append({"name": "step times finite", "value": finite, "tolerance": None, "passed": finite})
    say(
        "  " + format_table(result).replace("\n", "\n  "),
        f"  JAX:   {result['jax_tokens_per_s']:,.0f} tokens/s, MFU {_mfu(result['jax_mfu'])}",
        f"  torch: {result['torch_tokens_per_s']:,.0f} tokens/s, MFU {_mfu(result['torch_mfu'])}",
    )


# ---------------------------------------------------------------------------- 3. plan vs peak


def _load_config(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def plan_batch_rows(smoke: bool, usable_bytes: int | None) -> list[int]:
    """Global batch rows to plan, in order: the next one when the plan refuses a batch."""
    if smoke:
        return [4, 2]
    return [4, 2, 1] if usable_bytes is not None and usable_bytes >= LARGE_GPU_BYTES else [2, 1]


def section_plan_vs_peak(record: dict[str, Any], smoke: bool, save: Callable[[], None]) -> None:
    import jax

    try:
        from prm_jax.training import plan as plan_module

        for name in ("plan_training", "preflight", "compile_step", "memory_figures", "PreflightError"):
            getattr(plan_module, name)
        from bench.synthetic import synthetic_batch
        from prm_jax.training.trainer import Trainer, _to_global
    except (ImportError, AttributeError) as error:
        raise SkipSection(f"skipped: plan API missing ({type(error).__name__}: {error})") from error

    figures = record["figures"]
    device = jax.local_devices()[0]
    if smoke:
        config_file, seq_len, steps = REPO / "configs" / "tiny.py", 128, 2
    else:
        config_file, seq_len, steps = REPO / "configs" / "qwen2_5_math_1_5b.py", 4096, 3
    candidates = plan_batch_rows(smoke, _usable_bytes())
    figures.update({"config": str(config_file.relative_to(REPO)), "seq_len": seq_len, "mesh": "data=1, fsdp=1, tensor=1",
                    "grad_accum_steps": 1, "device": device.device_kind, "refused": []})  # fmt: skip

    def configured(rows: int):
        config = _load_config(config_file)
        config.data.seq_len = seq_len
        config.train.global_batch_rows = rows
        config.train.grad_accum_steps = 1
        config.train.microbatch_rows_per_shard = 0  # the preset's per-shard microbatch would re-split the rows
        config.mesh.update(data=1, fsdp=1, tensor=1)
        return config

    trainer = estimate = None
    for rows in candidates:
        config = configured(rows)
        trainer = Trainer(config, None, devices=[device])
        say(f"  plan: {figures['config']}, {rows} rows x {seq_len} tokens on {device.device_kind} (compiling)")
        try:
            estimate = trainer.preflight()
            figures["global_batch_rows"] = rows
            break
        except plan_module.PreflightError as error:
            figures["refused"].append({"global_batch_rows": rows, "message": str(error)})
            say(f"  the plan refuses {rows} rows: {str(error)[:300]}")
            save()
            trainer = None
    if trainer is None:
        raise RuntimeError(f"the plan refuses every batch tried ({candidates} rows)")
    figures["estimate"] = {k: estimate[k] for k in ("per_device_bytes", "memory", "usable_bytes", "usable_rule",
                                                    "fits", "headroom", "compile_seconds", "flops_per_step")}  # fmt: skip
    figures["estimate_source"] = "Trainer.preflight() = plan.compile_step of the Trainer's step (as plan_training)"
    per_device = estimate["per_device_bytes"]
    memory = estimate["memory"] or {}
    parts = ", ".join(f"{k.removesuffix('_bytes')} {_gib(memory[k])}" for k in ("argument_bytes", "output_bytes",
                                                                              "temp_bytes", "alias_bytes") if k in memory)  # fmt: skip
    say(
        f"  estimate {_gib(per_device)} per device ({parts}; argument + output + temp - alias), "
        f"usable {_gib(estimate['usable_bytes'])}, compiled in {estimate['compile_seconds']:.1f} s"
    )
    save()

    if smoke and jax.device_count() == 1:
        # The "local" plan and the pre-flight are the same compile: same figure. (plan_training
        # takes all devices: with several, its mesh is not this one-device run's.)
        planned = plan_module.plan_training(configured(figures["global_batch_rows"]), "local")
        figures["plan_training_per_device_bytes"] = planned["per_device_bytes"]
        same = planned["per_device_bytes"] == per_device
        record["checks"].append({"name": "plan_training(local) == preflight estimate",
                                 "value": planned["per_device_bytes"], "tolerance": per_device, "passed": same})  # fmt: skip

    rows = figures["global_batch_rows"]
    params = trainer._fresh_params()
    with jax.set_mesh(trainer.mesh):
        opt_state = jax.jit(trainer.optimizer.init, out_shardings=trainer.opt_shardings)(params)
    batches = [
        _to_global(synthetic_batch(rows, seq_len, trainer.model_config.vocab_size, 4, 64, seed), trainer.batch_sharding)
        for seed in range(2)
    ]
    jax.block_until_ready((params, opt_state, batches))
    stats = device.memory_stats()
    figures["bytes_in_use_before_steps"] = (stats or {}).get("bytes_in_use")
    losses, times = [], []
    with jax.set_mesh(trainer.mesh):
        for step in range(steps + 1):  # step 0 warms up (the executable is already compiled)
            start = time.perf_counter()
            params, opt_state, metrics = trainer.train_step(params, opt_state, batches[step % 2], np.int32(step))
            losses.append(float(metrics["loss"]))
            times.append(time.perf_counter() - start)
    stats = device.memory_stats()
    measured = (stats or {}).get("peak_bytes_in_use")
    step_s = statistics.median(times[1:])
    tokens_per_s = rows * seq_len / step_s
    peak_flops = trainer.peak_flops
    figures.update(
        {
            "steps": steps,
            "losses": losses,
            "step_s": step_s,
            "tokens_per_s": tokens_per_s,
            "mfu": None if not peak_flops else tokens_per_s * trainer.flops_per_token / peak_flops,
            "memory_stats_available": stats is not None,
            "measured_peak_bytes": measured,
            "measured_source": "jax.local_devices()[0].memory_stats()['peak_bytes_in_use'] after the steps",
            "estimate_bytes": per_device,
            "ratio_measured_over_estimate": None if measured is None or not per_device else measured / per_device,
        }
    )
    if stats is None:
        figures["note"] = f"memory_stats() is None on {device.platform}: no measured peak"
    finite = all(math.isfinite(x) for x in losses)
    record["checks"].append({"name": "train step losses finite", "value": losses[-1], "tolerance": None,
                             "passed": finite})  # fmt: skip
    ratio = figures["ratio_measured_over_estimate"]
    say(
        f"  {steps} steps (+1 warm-up) of {rows} x {seq_len} packed tokens: loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
        f"{step_s:.3f} s/step, {tokens_per_s:,.0f} tokens/s, MFU {_mfu(figures['mfu'])}",
        f"  estimate {_gib(per_device)}  measured peak {_gib(measured)}  ratio "
        + ("n/a (" + figures["note"] + ")" if ratio is None else f"{ratio:.3f}"),
    )
    trainer.close()


SECTION_FUNCTIONS = {
    "kernel_parity": section_kernel_parity,
    "train_step_vs_torch": section_train_step_vs_torch,
    "plan_vs_peak": section_plan_vs_peak,
}


# ---------------------------------------------------------------------------- one section (child)


def run_section(name: str, smoke: bool, out_path: Path) -> int:
    """Run one section in this process, writing its record to `out_path` as it goes."""
    record: dict[str, Any] = {"name": name, "status": "running", "figures": {}, "checks": [],
                              "error": None, "traceback": None}  # fmt: skip
    start = time.perf_counter()

    def save() -> None:
        record["seconds"] = time.perf_counter() - start
        _write_json(out_path, record)

    try:
        record["environment"] = _environment()
        save()
        if not smoke and record["environment"]["backend"] != "gpu":
            raise RuntimeError(
                f"JAX sees no GPU (backend {record['environment']['backend']!r}): this mode validates a GPU; "
                "--smoke runs the same code on the CPU"
            )
        SECTION_FUNCTIONS[name](record, smoke, save)
        failed = [c["name"] for c in record["checks"] if not c["passed"]]
        record["status"] = "failed" if failed else "passed"
        if failed:
            record["error"] = "checks failed: " + "; ".join(failed)
    except SkipSection as skip:
        record["status"], record["error"] = "skipped", str(skip)
        say(f"  {skip}")
    except BaseException as error:  # noqa: BLE001 - recorded; the run goes on with the next section
        record["status"], record["error"] = "error", f"{type(error).__name__}: {error}"
        record["traceback"] = traceback.format_exc()
        say(f"  ERROR {record['error'][:2000]}")
    save()
    return 0


# ---------------------------------------------------------------------------- the run (parent)


def _git_commit() -> str | None:
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None


def _spawn_section(name: str, smoke: bool, out_path: Path, timeout: float) -> tuple[int | None, str]:
    """Run a section in a fresh interpreter; stderr goes through live and its tail is kept."""
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if smoke:
        env["JAX_PLATFORMS"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    command = [sys.executable, "-m", "bench.gpu_validate", "--_section", name, "--_section_out", str(out_path)]
    if smoke:
        command.append("--smoke")
    tail: collections.deque[str] = collections.deque(maxlen=60)
    proc = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True, errors="replace")

    def pump() -> None:
        for line in proc.stderr:
            tail.append(line)
            sys.stderr.write(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = None
    reader.join(timeout=10)
    return rc, "".join(tail)


def _section_summary(record: dict[str, Any]) -> str:
    figures = record.get("figures", {})
    name = record["name"]
    if name == "kernel_parity":
        parts = []
        for case in figures.get("cases", []):
            for impl, entry in case["kernels"].items():
                if impl == "xla":
                    continue
                worst = entry.get("vs_xla", {}).get("worst_rel")
                speed = entry.get("speedup_vs_xla")
                dtype = {"float32": "fp32", "bfloat16": "bf16"}.get(case["dtype"], case["dtype"])
                parts.append(
                    f"{impl} {case['shape'].split(' ')[0]} {dtype}: "
                    + ("error" if "error" in entry else f"err {worst:.1e}" if worst is not None else "non-finite")
                    + (f", {speed:.2f}x" if speed else "")
                )
        return "; ".join(parts)
    if name == "train_step_vs_torch" and "result" in figures:
        r = figures["result"]
        return (
            f"{r['size']} {r['global_batch_rows']}x{r['seq_len']}: JAX {r['jax_tokens_per_s']:,.0f} tok/s "
            f"MFU {_mfu(r['jax_mfu'])}, torch {r['torch_tokens_per_s']:,.0f} tok/s MFU {_mfu(r['torch_mfu'])}, "
            f"torch/JAX step {r['ratio']}"
        )
    if name == "plan_vs_peak" and "estimate_bytes" in figures:
        ratio = figures.get("ratio_measured_over_estimate")
        return (
            f"estimate {_gib(figures['estimate_bytes'])}, measured {_gib(figures.get('measured_peak_bytes'))}, "
            f"ratio {'n/a' if ratio is None else f'{ratio:.3f}'}"
        )
    return ""


def run_all(out: Path, smoke: bool, only: list[str]) -> int:
    budgets = SMOKE_BUDGET_S if smoke else BUDGET_S
    total_budget = SMOKE_TOTAL_S if smoke else TOTAL_BUDGET_S
    started = time.perf_counter()
    deadline = started + total_budget
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "mode": "smoke" if smoke else "gpu",
        "ok": None,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "total_seconds": None,
        "budget_seconds": total_budget,
        "argv": sys.argv,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "sections": {},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    say(f"GPU validation ({report['mode']}): sections {', '.join(only)}; budget {total_budget} s; JSON -> {out}")
    with tempfile.TemporaryDirectory(prefix="gpu_validate_") as tmp:
        for i, name in enumerate(only):
            later = sum(budgets[n] for n in only[i + 1 :])
            # What is left of the run's limit, less a reserve for the sections still to come.
            timeout = min(deadline - time.perf_counter() - 0.6 * later, 2 * budgets[name])
            say("", f"== {TITLES[name]}  (budget {budgets[name]} s, stopped after {max(timeout, 0):.0f} s)")
            section_out = Path(tmp) / f"{name}.json"
            start = time.perf_counter()
            if timeout < 5:
                rc, stderr_tail = None, ""
                record = {"name": name, "status": "error", "figures": {}, "checks": [],
                          "error": "not run: no time left in the run's budget", "traceback": None}  # fmt: skip
            else:
                rc, stderr_tail = _spawn_section(name, smoke, section_out, timeout)
                try:
                    record = json.loads(section_out.read_text())
                except (OSError, ValueError):
                    record = {"name": name, "status": "running", "figures": {}, "checks": [], "error": None,
                              "traceback": None}  # fmt: skip
                if rc is None:
                    record["status"] = "error"
                    record["error"] = f"timed out after {timeout:.0f} s (figures so far kept)"
                elif record["status"] == "running" or rc != 0:
                    record["status"] = "error"
                    record["error"] = record.get("error") or f"the section's process exited with status {rc}"
            record["seconds"] = time.perf_counter() - start
            record["budget_seconds"] = budgets[name]
            record["timeout_seconds"] = max(timeout, 0)
            record["stderr_tail"] = stderr_tail if record["status"] == "error" else None
            report["sections"][name] = record
            status = record["status"].upper() if record["status"] != "passed" else "passed"
            say(
                f"-- {name}: {status} in {record['seconds']:.1f} s"
                + (f" ({record['error']})" if record["error"] else "")
            )
            _write_json(out, report)
    report["total_seconds"] = time.perf_counter() - started
    report["ok"] = all(s["status"] in ("passed", "skipped") for s in report["sections"].values())
    _write_json(out, report)
    say("", f"== summary ({report['mode']}, {report['total_seconds']:.0f} s of {total_budget} s)")
    for name, record in report["sections"].items():
        say(f"  {name:<20} {record['status']:<8} {record['seconds']:6.1f} s  {_section_summary(record)}")
    say(f"  {'OK' if report['ok'] else 'FAILED'}; figures in {out}")
    return 0 if report["ok"] else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_validate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_validation.json", help="JSON report path")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (CI)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--_section", dest="section", choices=SECTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--_section_out", dest="section_out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.section:
        with contextlib.suppress(Exception):
            import logging

            logging.basicConfig(level=logging.WARNING)
        return run_section(args.section, args.smoke, Path(args.section_out))
    return run_all(Path(args.out), args.smoke, args.only)


if __name__ == "__main__":
    sys.exit(main())
