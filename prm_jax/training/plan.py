"""A memory plan of a training config before a job starts: compile the real train step, read XLA's figures.

Two uses of one procedure (`compile_step`: the `Trainer`'s own jitted step, lowered with
`jax.ShapeDtypeStruct` parameters, optimizer state and batch carrying their shardings, so no weight
is ever allocated and no checkpoint is needed):

- `plan_training` / `launch.plan`: deviceless, for a target cluster from `TARGETS` (H100/H200 nodes,
  TPU v5p slices) on any machine, a laptop or CI included. XLA's GPU and TPU compilers run without
  their devices (`jax.experimental.topologies`); they ship in the `plan` extra
  (`pip install -e ".[plan]"`, jax[cuda12] and jax[tpu], in an environment of its own). The
  `local` target compiles for this machine's own devices and needs nothing extra.
- `preflight` (`train.preflight_plan`, on by default): the same compile on the run's own mesh
  before any weights are loaded; a step that cannot fit stops the run with the figures, and the
  run otherwise trains with that executable (no second compile).

Figures (per device, from `Compiled.memory_analysis()` of one device's SPMD program):

    per_device_bytes = arguments + outputs + temporaries - aliased

Arguments are the parameter, optimizer-state and batch shards; the parameters and optimizer state
are donated, so the outputs that reuse their buffers (`aliased`) count once. Temporaries are XLA's
scratch (activations, gradients, collectives' buffers). Generated code is reported beside it
(about a megabyte on TPU, 0 on GPU) and not added.

`usable_bytes` is what JAX may allocate on one device:
- GPU: `XLA_PYTHON_CLIENT_MEM_FRACTION` (default 0.75; launch.train sets none) x HBM, the BFC
  allocator's limit whether it preallocates or not; all of HBM under
  `XLA_PYTHON_CLIENT_ALLOCATOR=platform`. On a real device (pre-flight): the allocator's own
  `bytes_limit - bytes_in_use` (`Device.memory_stats()`).
- TPU: HBM less the runtime's reserve, as the TPU compiler states it (95.74 GiB on v5p); the TPU
  compiler refuses a program over it, which the plan reports as not fitting with its figures.
- CPU: none (host memory); the figures are reported without a verdict.

FLOPs: `flops_per_step` is the analytic model count of `training.flops` (6 x matmul parameters +
causal attention, per token, times the tokens of a step; remat's recompute is not counted, as in
MFU), the same count the trainer's logged MFU uses. The compiler's own count
(`cost_analysis()["flops"]`, per device) is reported beside it where the backend gives one (TPU,
CPU; not the deviceless GPU compiler), but it counts the gradient-accumulation loop's body once,
so it reads about 1/grad_accum_steps of a step. `step_seconds` = flops_per_step / (devices x peak bf16 x mfu).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import logging
import os
import re
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from prm_jax.data.packing import PACKED_FIELD_SPECS
from prm_jax.models.attention import resolve_attention_impl
from prm_jax.models.transformer import attention_impl_for
from prm_jax.training.trainer import STEP_INPUT_FIELDS, Trainer, TrainingError

_log = logging.getLogger(__name__)

GiB = 1 << 30
PLAN_EXTRA = 'pip install -e ".[plan]"'
#: The MFU step times are stated at unless asked otherwise.
DEFAULT_MFU = 0.4
#: JAX's default share of GPU memory for its allocator (XLA_PYTHON_CLIENT_MEM_FRACTION unset).
DEFAULT_GPU_MEM_FRACTION = 0.75
#: Below this headroom the pre-flight warns: fragmentation and the eval step need some room.
LOW_HEADROOM = 0.05


class PlanError(ValueError):
    """A plan cannot be made (unknown target, missing compiler plugin, invalid config)."""


class PreflightError(TrainingError):
    """The run's train step does not fit its devices; the message carries the figures."""


# ---------------------------------------------------------------------------- targets


def _gpu_target_config(description: str, memory_bytes: int, bandwidth: float) -> str:
    """A `stream_executor::GpuTargetConfigProto` (text format) of a Hopper GPU: what the CUDA
    compiler reads instead of querying a device (SM count, clocks, shared memory, memory size)."""
    return f"""
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(bandwidth)}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {memory_bytes}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 9 }}
device_description_str: "{description}"
"""


@dataclasses.dataclass(frozen=True)
class Target:
    """A cluster to plan for. `hbm_bytes` is what CUDA / the TPU runtime report per device;
    `topology` are `jax.experimental.topologies.get_topology_desc` arguments."""

    name: str
    platform: str  # cuda | tpu | local
    device_kind: str
    num_devices: int
    hbm_bytes: int | None
    peak_flops: float | None  # dense bf16 FLOP/s per device
    topology: dict[str, str] = dataclasses.field(default_factory=dict)
    #: TPU: the compiler's own limit (HBM less the runtime's reserve). GPU: from the allocator settings.
    tpu_usable_bytes: int | None = None


# H100 SXM 80 GB: the device memory CUDA reports (79.1 GiB). H200: nvidia-smi's 143,771 MiB less the
# same share the driver keeps on an H100 (81,559 MiB there): 139.4 GiB.
_H100_MEMORY = 84_929_347_584
_H200_MEMORY = _H100_MEMORY * 143_771 // 81_559
_H100 = _gpu_target_config("NVIDIA H100 80GB HBM3", _H100_MEMORY, 3.35e12)
_H200 = _gpu_target_config("NVIDIA H200", _H200_MEMORY, 4.8e12)
# v5p: 95 GiB HBM per chip; the compiler allows 95.74 GiB ("available HBM (95.74G)" in its OOM error).
_V5P_USABLE = int(95.74 * GiB)


def _h100(n: int, hosts: int) -> Target:
    return Target(
        f"h100x{n}",
        "cuda",
        "NVIDIA H100 80GB HBM3",
        n,
        _H100_MEMORY,
        989e12,
        {"target_config": _H100, "topology": f"1x{hosts}x8"},
    )


def _v5p(cores: int, shape: str) -> Target:
    chips = cores // 2  # a v5p-N slice has N TensorCores, two per chip (one JAX device: megacore)
    return Target(
        f"v5p-{cores}", "tpu", "TPU v5p", chips, 96 * GiB, 459e12, {"topology_name": f"v5p:{shape}"}, _V5P_USABLE
    )


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        _h100(8, 1),
        _h100(16, 2),
        _h100(64, 8),
        Target("h200x8", "cuda", "NVIDIA H200", 8, _H200_MEMORY, 989e12, {"target_config": _H200, "topology": "1x1x8"}),
        Target(
            "h200x64", "cuda", "NVIDIA H200", 64, _H200_MEMORY, 989e12, {"target_config": _H200, "topology": "1x8x8"}
        ),
        _v5p(8, "2x2x1"),
        _v5p(64, "4x4x2"),
        _v5p(256, "4x4x8"),
    )
}
LOCAL = "local"


def target_names() -> list[str]:
    return [LOCAL, *TARGETS]


#: What the GPU targets report to cuDNN's attention checks (their GpuTargetConfig: sm_90, cuDNN 9.8).
_TARGET_GPU_CAPABILITY = (9, 0)
_TARGET_CUDNN_VERSION = 90800


@contextlib.contextmanager
def _as_target_gpu(target: Target) -> Iterator[None]:
    """jax checks the cuDNN attention kernel's requirements (compute capability, cuDNN version)
    against the live GPU; a deviceless compile has none, so for a CUDA target they answer for the
    target's GPU instead (private jax functions, jax 0.10.2)."""
    if target.platform != "cuda":
        yield
        return
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_checks

    def at_least(capability: str) -> bool:
        return _TARGET_GPU_CAPABILITY >= tuple(int(x) for x in capability.split("."))

    def equal(capability: str) -> bool:
        return _TARGET_GPU_CAPABILITY == tuple(int(x) for x in capability.split("."))

    patched = {
        "check_compute_capability": at_least,
        "is_cuda_compute_capability_equal": equal,
        "check_cudnn_version": lambda: _TARGET_CUDNN_VERSION,
    }
    saved = {name: getattr(cudnn_checks, name) for name in patched}
    try:
        for name, fn in patched.items():
            setattr(cudnn_checks, name, fn)
        yield
    finally:
        for name, fn in saved.items():
            setattr(cudnn_checks, name, fn)


def plugin_available(platform: str) -> bool:
    """Whether XLA's compiler for `platform` is installed (the `plan` extra)."""
    module = {"cuda": "jax_plugins.xla_cuda12", "tpu": "libtpu"}[platform]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def compile_only_devices(target: Target) -> list[jax.Device]:
    """The target's devices as compile-only device objects: nothing runs, nothing is allocated."""
    if not plugin_available(target.platform):
        what = "jax[cuda12] (the CUDA compiler plugin)" if target.platform == "cuda" else "jax[tpu] (libtpu)"
        raise PlanError(
            f"target {target.name} compiles with {what}, which is not installed: {PLAN_EXTRA} (best in an "
            "environment of its own: it brings the CUDA and TPU compilers), or plan on this machine's own "
            "devices with --target=local"
        )
    # The CUDA plugin checks the installed CUDA against a GPU at load; there is none to check.
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no TPU VM metadata server to ask
    # Compile-only: never take libtpu's one-process lock (a plan beside a running job, or another plan).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if target.platform == "tpu":  # what libtpu otherwise asks the TPU VM for (and warns without)
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.name)
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    from jax._src import xla_bridge
    from jax.experimental import topologies

    if not xla_bridge.backends_are_initialized():
        # The local backend stays the CPU: a GPU/TPU client would look for devices.
        jax.config.update("jax_platforms", "cpu")
    devices = topologies.get_topology_desc(platform=target.platform, **target.topology).devices
    if len(devices) != target.num_devices:
        raise PlanError(f"target {target.name}: its topology has {len(devices)} devices, not {target.num_devices}")
    return list(devices)


def gpu_usable_fraction() -> tuple[float, str]:
    """The share of HBM JAX's GPU allocator may use under this environment, and why."""
    if os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR") == "platform":
        return 1.0, "XLA_PYTHON_CLIENT_ALLOCATOR=platform: all of HBM"
    value = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    if value:
        return float(value), f"XLA_PYTHON_CLIENT_MEM_FRACTION={value} of HBM"
    return DEFAULT_GPU_MEM_FRACTION, "75% of HBM (JAX's default; launch.train sets no XLA_PYTHON_CLIENT_MEM_FRACTION)"


def target_usable_bytes(target: Target) -> tuple[int | None, str]:
    if target.platform == "tpu":
        return target.tpu_usable_bytes, "HBM less the TPU runtime's reserve (the TPU compiler's limit)"
    fraction, rule = gpu_usable_fraction()
    return int(target.hbm_bytes * fraction), rule


def device_usable_bytes(devices: list[jax.Device]) -> tuple[int | None, str]:
    """What the allocator of the most loaded of `devices` may still hand out (None: no limit known,
    e.g. CPU: host memory)."""
    limits = []
    for device in devices:
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if not stats or "bytes_limit" not in stats:
            return None, f"{device.platform}: no device memory limit (host memory)"
        limits.append(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
    return min(limits), "the allocator's bytes_limit - bytes_in_use (Device.memory_stats)"


# ---------------------------------------------------------------------------- compile


def step_input_specs(trainer: Trainer) -> tuple[Any, Any, dict[str, jax.ShapeDtypeStruct], jax.ShapeDtypeStruct]:
    """(params, opt_state, batch, step) as ShapeDtypeStructs with the trainer's shardings."""
    opt_state = jax.tree.map(
        lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
        trainer.abstract_opt_state,
        trainer.opt_shardings,
    )
    shape = (trainer.global_rows, int(trainer.config.data.seq_len))
    batch = {
        name: jax.ShapeDtypeStruct(shape, PACKED_FIELD_SPECS[name][0], sharding=trainer.batch_sharding)
        for name in STEP_INPUT_FIELDS
    }
    step = jax.ShapeDtypeStruct((), np.int32, sharding=NamedSharding(trainer.mesh, PartitionSpec()))
    return trainer.abstract_params, opt_state, batch, step


@dataclasses.dataclass
class CompiledStep:
    compiled: Any  # jax.stages.Compiled, or None when the compiler refused the program (TPU OOM)
    compile_seconds: float
    memory: dict[str, int] | None
    compiler_flops_per_device: float | None
    error: str | None = None


def memory_figures(compiled: Any) -> dict[str, int] | None:
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    out = {
        "argument_bytes": int(stats.argument_size_in_bytes),
        "output_bytes": int(stats.output_size_in_bytes),
        "temp_bytes": int(stats.temp_size_in_bytes),
        "alias_bytes": int(stats.alias_size_in_bytes),
        "generated_code_bytes": int(stats.generated_code_size_in_bytes),
    }
    out["per_device_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    return out


_OOM = re.compile(r"required for [^(]*\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)")
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def compile_step(trainer: Trainer) -> CompiledStep:
    """Lower and compile the trainer's jitted train step with abstract inputs on its mesh."""
    start = time.perf_counter()
    try:
        with jax.set_mesh(trainer.mesh):
            compiled = trainer.train_step.lower(*step_input_specs(trainer)).compile()
    except jax.errors.JaxRuntimeError as error:
        message = str(error)
        if "RESOURCE_EXHAUSTED" not in message:
            raise
        seconds = time.perf_counter() - start
        memory = None
        if match := _OOM.search(message):
            needed = float(match.group(1)) * _UNITS[match.group(2)]
            # The compiler states its temporaries only: a lower bound of the per-device total.
            memory = {
                "temp_bytes": int(needed),
                "per_device_bytes": int(needed),
                "compiler_limit_bytes": int(float(match.group(3)) * _UNITS[match.group(4)]),
            }
        return CompiledStep(None, seconds, memory, None, error=message.strip().splitlines()[0])
    seconds = time.perf_counter() - start
    flops = None
    try:
        cost = compiled.cost_analysis()
        if cost and "flops" in cost:
            flops = float(cost["flops"])
    except Exception:  # noqa: BLE001 - some backends cannot analyse; the analytic count stands
        flops = None
    return CompiledStep(compiled, seconds, memory_figures(compiled), flops)


# ---------------------------------------------------------------------------- the plan


def _model_summary(trainer: Trainer) -> dict[str, Any]:
    m = trainer.model_config
    return {
        "arch_name": trainer.config.model.get("arch_name", "") or None,
        "init_from": trainer.config.model.init_from or None,
        "num_hidden_layers": m.num_hidden_layers,
        "hidden_size": m.hidden_size,
        "vocab_size": m.vocab_size,
        "parameters": m.num_parameters(),
        "dtype": m.dtype,
        "param_dtype": m.param_dtype,
        "remat_policy": m.remat_policy,
        "attention_impl": attention_impl_for(m),  # the kernel the compiled step runs
    }


def _figures(
    trainer: Trainer, step: CompiledStep, usable: int | None, usable_rule: str, peak_flops: float | None, mfu: float
) -> dict[str, Any]:
    cfg = trainer.config
    tokens = trainer.global_rows * int(cfg.data.seq_len)
    per_device = step.memory["per_device_bytes"] if step.memory else None
    if step.memory and "compiler_limit_bytes" in step.memory:
        usable = step.memory["compiler_limit_bytes"]
    fits = None
    if step.compiled is None:
        fits = False
    elif per_device is not None and usable is not None:
        fits = per_device <= usable
    flops_per_step = trainer.flops_per_token * tokens
    devices = trainer.mesh.size
    step_seconds = flops_per_step / (devices * peak_flops * mfu) if peak_flops else None
    return {
        "model": _model_summary(trainer),
        "mesh": dict(trainer.mesh.shape),
        "objective": trainer.objective,
        "global_batch_rows": trainer.global_rows,
        "grad_accum_steps": trainer.grad_accum_steps,
        "seq_len": int(cfg.data.seq_len),
        "tokens_per_step": tokens,
        "memory": step.memory,
        "per_device_bytes": per_device,
        "per_device_formula": "argument + output + temp - alias (XLA memory_analysis, one device's program)",
        "usable_bytes": usable,
        "usable_rule": usable_rule,
        "fits": fits,
        "headroom": (1.0 - per_device / usable) if per_device is not None and usable else None,
        "compile_seconds": round(step.compile_seconds, 2),
        "compile_error": step.error,
        "flops_per_step": flops_per_step,
        "flops_source": "analytic: prm_jax.training.flops (6 x matmul params + causal attention) x tokens per step",
        "compiler_flops_per_device": step.compiler_flops_per_device,
        "peak_flops_per_device": peak_flops,
        "mfu": mfu,
        "step_seconds": step_seconds,
        "tokens_per_second": tokens / step_seconds if step_seconds else None,
    }


def _check_plannable(config: ml_collections.ConfigDict, device_count: int) -> None:
    """The config's problems that matter to a plan: all but the data paths (no data is read)."""
    from prm_jax.training.config import validate

    skipped = ("--config.data.train_file=", "--config.data.tokenizer_dir=", "--config.data.eval_file=")
    problems = [p for p in validate(config, device_count=device_count) if not p.startswith(skipped)]
    if problems:
        raise PlanError("cannot plan this config:\n  " + "\n  ".join(problems))


def plan_training(config: ml_collections.ConfigDict, target: str, *, mfu: float = DEFAULT_MFU) -> dict[str, Any]:
    """Compile `config`'s train step for `target` (a `TARGETS` name or "local") and return the figures.

    Never allocates the model (ShapeDtypeStructs only) and needs no checkpoint: without
    `model.init_from` the step is built from `model.arch` (a preset's real architecture).
    """
    if target == LOCAL:
        devices = jax.devices()
        device = devices[0]
        spec = Target(LOCAL, device.platform, device.device_kind, len(devices), None, None)
        from prm_jax.training import flops

        peak = flops.peak_flops_per_device(device, override=float(config.train.peak_flops_per_device))
    elif target in TARGETS:
        spec = TARGETS[target]
        devices = compile_only_devices(spec)
        peak = float(config.train.peak_flops_per_device) or spec.peak_flops
        # The model picks its kernel from the platform it runs on; compiling for another one, the
        # target's platform decides (`auto`: packed cuDNN on H100/H200, splash on TPU).
        config = copy.deepcopy(config)
        with config.unlocked():
            config.model.attention_impl = resolve_attention_impl(config.model.attention_impl, spec.platform)
    else:
        raise PlanError(f"unknown target {target!r}; choose one of {target_names()}")
    _check_plannable(config, len(devices))
    trainer = Trainer(config, None, devices=devices)
    with _as_target_gpu(spec):
        step = compile_step(trainer)
    if target == LOCAL:
        usable, rule = device_usable_bytes(devices)
        hbm = None
    else:
        usable, rule = target_usable_bytes(spec)
        hbm = spec.hbm_bytes
    record = {
        "target": spec.name,
        "platform": spec.platform,
        "device_kind": spec.device_kind,
        "num_devices": spec.num_devices,
        "hbm_bytes": hbm,
        **_figures(trainer, step, usable, rule, peak, mfu),
        "jax_version": jax.__version__,
    }
    return record


# ---------------------------------------------------------------------------- pre-flight


def _gib(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / (1 << 20):.2f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _what(trainer: Trainer) -> str:
    m = trainer.model_config
    name = trainer.config.model.get("arch_name", "") or "model.arch"
    return f"{name} ({m.num_hidden_layers} layers, hidden {m.hidden_size}, {_count(m.num_parameters())} parameters)"


def smaller_microbatches(config: ml_collections.ConfigDict) -> str:
    """The advice that makes microbatches smaller under this config's accumulation setting."""
    per_shard = int(config.train.get("microbatch_rows_per_shard", 0) or 0)
    if per_shard > 1:
        return f"lower train.microbatch_rows_per_shard (now {per_shard}; smaller microbatches)"
    if per_shard == 1:
        return "microbatches are already 1 row per shard"
    return "raise train.grad_accum_steps (smaller microbatches)"


def preflight(trainer: Trainer) -> dict[str, Any]:
    """`Trainer.preflight`: compile on the run's own mesh, refuse a step that cannot fit, and
    make the compiled executable the run's train step."""
    devices = list(trainer.mesh.devices.flat)
    step = compile_step(trainer)
    usable, rule = device_usable_bytes([d for d in devices if d.process_index == jax.process_index()])
    if jax.process_count() > 1:
        # One verdict for every process: a host that stopped alone would leave the others in a collective.
        from jax.experimental import multihost_utils

        gathered = multihost_utils.process_allgather(np.asarray(-1 if usable is None else usable, np.int64))
        limits = [int(limit) for limit in np.ravel(gathered) if limit >= 0]
        usable = min(limits) if limits else None
        rule = f"{rule}; the smallest over {jax.process_count()} processes"
    figures = _figures(trainer, step, usable, rule, trainer.peak_flops, DEFAULT_MFU)
    memory = step.memory or {}
    breakdown = ", ".join(
        f"{k.removesuffix('_bytes')} {_gib(memory[k])}"
        for k in ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes")
        if k in memory
    )
    summary = (
        f"train step of {_what(trainer)} on {devices[0].device_kind} x{len(devices)}, mesh {dict(trainer.mesh.shape)}, "
        f"{trainer.global_rows} rows x {int(trainer.config.data.seq_len)} tokens in "
        f"{trainer.grad_accum_steps} microbatches: {_gib(figures['per_device_bytes'])} per device "
        f"({breakdown or step.error}) vs {_gib(figures['usable_bytes'])} usable ({rule}); "
        f"compiled in {step.compile_seconds:.1f} s"
    )
    if figures["fits"] is False:
        raise PreflightError(
            f"pre-flight: the {summary}. It does not fit: {smaller_microbatches(trainer.config)}, "
            "use --config.model.remat_policy=full, shard over more devices (mesh), or skip this check with "
            "--config.train.preflight_plan=false"
        )
    _log.info("pre-flight: %s%s", summary, "" if figures["fits"] else " (no device limit: no verdict)")
    if figures["headroom"] is not None and figures["headroom"] < LOW_HEADROOM:
        _log.warning(
            "pre-flight: only %.1f%% headroom; fragmentation or the eval step may not fit", 100 * figures["headroom"]
        )
    trainer.train_step = step.compiled  # the run trains with this executable: no second compile
    return figures


# ---------------------------------------------------------------------------- report


def format_plan(record: dict[str, Any]) -> str:
    """A readable table of a plan."""
    model = record["model"]
    memory = record.get("memory") or {}

    def rate(x: float | None, unit: str, scale: float = 1.0, digits: int = 2) -> str:
        return "n/a" if x is None else f"{x / scale:.{digits}f} {unit}"

    verdict = {True: "yes", False: "NO", None: "no verdict (no device limit)"}[record["fits"]]
    rows = [
        ("target", f"{record['target']}: {record['num_devices']} x {record['device_kind']} ({record['platform']})"),
        (
            "model",
            f"{model['arch_name'] or 'model.arch'}: {model['num_hidden_layers']} layers, hidden {model['hidden_size']}, "
            f"{_count(model['parameters'])} params, {model['dtype']}/{model['param_dtype']}, remat {model['remat_policy']}",
        ),
        ("mesh", ", ".join(f"{k}={v}" for k, v in record["mesh"].items())),
        (
            "batch",
            f"{record['global_batch_rows']} rows x {record['seq_len']} tokens = {record['tokens_per_step']:,} tokens, "
            f"{record['grad_accum_steps']} microbatches",
        ),
        *(
            (k.removesuffix("_bytes"), _gib(memory[k]))
            for k in ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes")
            if k in memory
        ),
        ("per device", f"{_gib(record['per_device_bytes'])}  (argument + output + temp - alias)"),
        ("usable", f"{_gib(record['usable_bytes'])}  ({record['usable_rule']})"),
        ("fits", verdict + ("" if record["headroom"] is None else f", headroom {100 * record['headroom']:.1f}%")),
        (
            "compile",
            f"{record['compile_seconds']:.1f} s"
            + (f"  ({record['compile_error']})" if record["compile_error"] else ""),
        ),
        ("FLOPs/step", f"{record['flops_per_step']:.3e} (analytic)"),
        (
            f"at {100 * record['mfu']:.0f}% MFU",
            f"{rate(record['step_seconds'], 's/step')}, {rate(record['tokens_per_second'], 'tokens/s', digits=0)}",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


__all__ = [
    "DEFAULT_MFU",
    "LOCAL",
    "PLAN_EXTRA",
    "TARGETS",
    "PlanError",
    "PreflightError",
    "Target",
    "compile_only_devices",
    "compile_step",
    "format_plan",
    "memory_figures",
    "plan_training",
    "preflight",
    "step_input_specs",
    "target_names",
]
