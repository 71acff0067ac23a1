r"""Peak host memory of the streaming Hugging Face <-> Orbax checkpoint conversion.

  python -m bench.conversion_memory [--layers=6 --hidden=1024 --vocab=32000 ...] \
      [--shard_mb=200] [--workdir=/tmp] [--out=result.json] [--no-compare_naive]

The conversion (`prm_jax.conversion.hf_checkpoint`) promises to hold about one tensor at a time, so
its peak resident memory should be "import baseline + largest tensor + a few buffers", independent
of the model size. This script checks that on a random model large enough for the difference to
show.

Method
------
1. A random Qwen2 causal-LM checkpoint (fp32, sharded safetensors with an index, `config.json`) is
   written with `write_safetensors`, each tensor generated on demand from a seeded numpy RNG, so
   this process never holds the model either.
2. Every measurement runs in a fresh child interpreter (this file re-executed in a hidden child
   mode). The child first imports everything the conversion needs (jax, orbax, safetensors,
   `launch.convert`, `prm_jax.conversion`) and starts the jax CPU backend, then runs one task:

   * `baseline`: nothing; its peak is the fixed cost of the imports and the backend;
   * `convert`: the real CLI, `launch.convert.main` under `absl.app.run`, exactly as
     `python -m launch.convert ...` runs it;
   * `naive_*`: for comparison, the whole-model way: every shard loaded into one dict
     (`safetensors.numpy.load_file`) and saved with the stock Orbax numpy handler, or every
     parameter restored at once and written with `safetensors.numpy.save_file`.

   The child reports its own `VmHWM` from `/proc/self/status`: the kernel's exact high-water mark of
   the resident set of that process (all threads, tensorstore's included), never sampled, so no
   short spike is missed. It is per address space and restarts at `exec`, so unlike
   `getrusage(RUSAGE_CHILDREN).ru_maxrss` (the maximum over *all* reaped children, and inherited
   across fork/exec from the forking parent) it belongs to this one child only.
3. While the child runs, this process samples `/proc/<child>/status` every `--sample_ms` ms for the
   split of the resident set into anonymous memory (`RssAnon`: heap, numpy buffers, tensorstore
   caches: what the conversion really allocates) and file-backed pages (`RssFile + RssShmem`:
   shared libraries and memory-mapped checkpoint files; clean page cache that the kernel can drop
   under pressure, yet counted in RSS and so in `VmHWM`). These two are sampled peaks, so they can
   under-read a spike shorter than the interval; the total is exact.

"Increment" = the child's peak minus the baseline child's peak. For a streaming conversion it
should be a small multiple of the largest tensor; for the naive one it grows with the model.
Linux only (`/proc`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

if TYPE_CHECKING:
    from prm_jax.conversion.safetensors_io import TensorSpec
    from prm_jax.models.config import ModelConfig

REPO_ROOT: Final[Path] = Path(__file__).resolve().parents[1]
MIB: Final[int] = 2**20
_CHILD_MODE: Final[str] = "__child__"
_RESULT_MARKER: Final[str] = "@@conversion_memory_result@@ "
_STATUS_FIELDS: Final[tuple[str, ...]] = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


# ---------------------------------------------------------------------------- /proc helpers


def read_proc_status(pid: int | str = "self") -> dict[str, int]:
    """Memory fields of `/proc/<pid>/status` in bytes; empty when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    fields: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in _STATUS_FIELDS:
            fields[key] = int(rest.split()[0]) * 1024  # the kernel reports kB
    return fields


def _peak_rss_self() -> int:
    """Exact peak RSS of this process in bytes (VmHWM; ru_maxrss where /proc is missing)."""
    status = read_proc_status()
    if "VmHWM" in status:
        return status["VmHWM"]
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _file_backed(status: dict[str, int]) -> int:
    return status.get("RssFile", 0) + status.get("RssShmem", 0)


# ---------------------------------------------------------------------------- child side


def _naive_hf_to_orbax(hf_dir: str, orbax_dir: str) -> None:
    """Whole-model import: every shard in one dict, then one ordinary Orbax save."""
    import safetensors.numpy
    from flax import nnx

    from prm_jax.checkpoint import save_params
    from prm_jax.conversion.hf_mapping import params_from_hf, tensor_mappings
    from prm_jax.models.config import ModelConfig

    config = ModelConfig.from_hf_file(hf_dir)
    state: dict[str, np.ndarray] = {}
    for shard in sorted(Path(hf_dir).glob("*.safetensors")):
        state.update(safetensors.numpy.load_file(shard))
    # pop so that source and converted copies do not both stay alive
    params = nnx.traversals.flatten_mapping(params_from_hf(config.replace(with_prm_head=False), state.pop))
    rng = np.random.default_rng(0)
    for m in tensor_mappings(config):
        if m.head == "score":  # causal-LM source: the PRM head is fresh
            params[m.path] = (rng.standard_normal(m.jax_shape) * 0.02).astype(np.float32)
    save_params(orbax_dir, nnx.traversals.unflatten_mapping(params), config)


def _naive_orbax_to_hf(orbax_dir: str, hf_dir: str) -> None:
    """Whole-model export: restore every parameter, then one `safetensors.numpy.save_file`."""
    import safetensors.numpy
    from flax import nnx

    from prm_jax.checkpoint import read_model_config, restore_params
    from prm_jax.conversion.hf_mapping import tensor_mappings

    config = read_model_config(orbax_dir)
    params = nnx.traversals.flatten_mapping(restore_params(orbax_dir, config, as_numpy=True))
    tensors = {
        m.hf_name: m.to_hf(np.asarray(params[m.path] if m.layer is None else params[m.path][m.layer], np.float32))
        for m in tensor_mappings(config)
        if m.head != "lm_head"
    }
    Path(hf_dir).mkdir(parents=True, exist_ok=True)
    out = Path(hf_dir) / "model.safetensors"
    safetensors.numpy.save_file(tensors, str(out), metadata={"format": "pt"})


def _child_main(argv: Sequence[str]) -> None:
    """Hidden entry point: set up like the conversion CLI, run one task, report the peak RSS."""
    mode, *args = argv
    start = time.perf_counter()
    # The same imports as the conversion, plus the jax CPU backend: a fixed cost, not the model's.
    import jax.numpy as jnp
    import orbax.checkpoint  # noqa: F401
    import safetensors.numpy  # noqa: F401
    from absl import app

    import launch.convert
    import prm_jax.checkpoint  # noqa: F401
    import prm_jax.conversion.hf_checkpoint  # noqa: F401

    jnp.zeros(()).block_until_ready()
    setup = read_proc_status()
    ready = time.perf_counter()
    if mode == "baseline":
        pass
    elif mode == "convert":
        try:
            app.run(launch.convert.main, argv=["launch.convert", *args])
        except SystemExit as exit_:  # app.run always exits; only a non-zero code is a failure
            if exit_.code not in (None, 0):
                raise
    elif mode == "naive_hf_to_orbax":
        _naive_hf_to_orbax(*args)
    elif mode == "naive_orbax_to_hf":
        _naive_orbax_to_hf(*args)
    else:
        raise ValueError(f"unknown child mode {mode!r}")
    done = time.perf_counter()
    report = {
        "peak_rss": _peak_rss_self(),
        "setup_rss": setup.get("VmRSS", 0),
        "setup_s": ready - start,
        "run_s": done - ready,
    }
    print(_RESULT_MARKER + json.dumps(report), flush=True)


# ---------------------------------------------------------------------------- parent side


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One child run; sizes in bytes, times in seconds."""

    name: str
    peak_rss: int  # exact (child's VmHWM)
    peak_anon: int  # sampled
    peak_file: int  # sampled (RssFile + RssShmem)
    setup_rss: int  # RSS after imports + backend start, inside the same child
    run_s: float  # the task itself, after imports
    total_s: float  # child wall time including interpreter start and imports


def run_child(name: str, mode: str, args: Sequence[str], *, sample_s: float, log_dir: Path) -> Measurement:
    """Runs one child task and measures it (see the module docstring)."""
    cmd = [sys.executable, "-m", "bench.conversion_memory", _CHILD_MODE, mode, *args]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("JAX_PLATFORMS", "cpu")  # host-memory benchmark: never grab an accelerator
    stdout_path, stderr_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
    peak_anon = peak_file = 0
    start = time.perf_counter()
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=err)
        while proc.poll() is None:
            status = read_proc_status(proc.pid)
            peak_anon = max(peak_anon, status.get("RssAnon", 0))
            peak_file = max(peak_file, _file_backed(status))
            time.sleep(sample_s)
    total_s = time.perf_counter() - start
    stdout = stdout_path.read_text(errors="replace")
    results = [line for line in stdout.splitlines() if line.startswith(_RESULT_MARKER)]
    if proc.returncode != 0 or not results:
        tail = stderr_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{name}: child exited with {proc.returncode}\n{' '.join(cmd)}\n{tail}")
    report: dict[str, Any] = json.loads(results[-1][len(_RESULT_MARKER) :])
    return Measurement(
        name=name,
        peak_rss=int(report["peak_rss"]),
        peak_anon=peak_anon,
        peak_file=peak_file,
        setup_rss=int(report["setup_rss"]),
        run_s=float(report["run_s"]),
        total_s=total_s,
    )


def build_source_checkpoint(
    directory: Path, config: ModelConfig, *, max_shard_bytes: int, seed: int
) -> list[TensorSpec]:
    """Writes a random Qwen2ForCausalLM checkpoint one generated tensor at a time; returns its specs."""
    from prm_jax.conversion.hf_mapping import tensor_mappings
    from prm_jax.conversion.safetensors_io import TensorSpec, write_safetensors

    mappings = tensor_mappings(config.replace(with_prm_head=False))
    specs = [TensorSpec(m.hf_name, m.hf_shape, np.dtype(np.float32)) for m in mappings]
    position = {spec.name: i for i, spec in enumerate(specs)}
    shapes = {spec.name: spec.shape for spec in specs}

    def get_tensor(name: str) -> np.ndarray:
        if name.endswith("norm.weight"):
            return np.ones(shapes[name], dtype=np.float32)
        rng = np.random.default_rng([seed, position[name]])
        value = rng.standard_normal(shapes[name], dtype=np.float32)
        value *= np.float32(0.02)
        return value

    directory.mkdir(parents=True)
    hf_config = {"architectures": ["Qwen2ForCausalLM"], **config.to_hf_dict(torch_dtype="float32")}
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    write_safetensors(directory, specs, get_tensor, max_shard_bytes=max_shard_bytes)
    return specs


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _check_round_trip(source: Path, exported: Path, names: Sequence[str]) -> None:
    """fp32 export of an fp32 import must reproduce the source tensors bit for bit."""
    from prm_jax.conversion.safetensors_io import SafetensorsCheckpoint

    with SafetensorsCheckpoint(source) as a, SafetensorsCheckpoint(exported) as b:
        for name in names:
            if not np.array_equal(a.get(name), b.get(name)):
                raise AssertionError(f"round trip changed {name}")


# ---------------------------------------------------------------------------- report


def _mib(n: float) -> str:
    return f"{n / MIB:,.0f}"


def format_table(rows: Sequence[Measurement], baseline: Measurement, largest: int) -> str:
    """Fixed-width table; sizes in MiB, increments relative to the baseline child."""
    header = (
        f"{'run':<28}{'peak RSS':>10}{'increment':>11}{'incr/largest':>14}"
        f"{'anon peak':>11}{'anon incr':>11}{'file peak':>11}{'convert s':>11}{'total s':>9}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        is_base = row is baseline
        increment = row.peak_rss - baseline.peak_rss
        anon_increment = row.peak_anon - baseline.peak_anon
        lines.append(
            f"{row.name:<28}{_mib(row.peak_rss):>10}"
            f"{'-' if is_base else _mib(increment):>11}"
            f"{'-' if is_base else f'{increment / largest:.2f}x':>14}"
            f"{_mib(row.peak_anon):>11}{'-' if is_base else _mib(anon_increment):>11}"
            f"{_mib(row.peak_file):>11}"
            f"{'-' if is_base else f'{row.run_s:.1f}':>11}{row.total_s:>9.1f}"
        )
    lines += [
        "MiB. peak RSS: the child's exact VmHWM; increment: minus the baseline child's. anon / file:",
        "sampled peaks of RssAnon (allocations) and RssFile+RssShmem (shared libraries and mmapped",
        "checkpoint files: clean page cache, reclaimable, but counted in RSS). convert s: the",
        "conversion alone; total s: the child including interpreter start and imports.",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = parser.add_argument_group("model shape (Qwen2; defaults give ~530 MB fp32)")
    shape.add_argument("--vocab", type=int, default=32000)
    shape.add_argument("--hidden", type=int, default=1024)
    shape.add_argument("--intermediate", type=int, default=2816)
    shape.add_argument("--layers", type=int, default=6)
    shape.add_argument("--heads", type=int, default=16)
    shape.add_argument("--kv_heads", type=int, default=4)
    shape.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--shard_mb", type=float, default=200.0, help="source shard size limit (MB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workdir", type=Path, default=Path("/tmp"), help="a temporary directory is made (and removed) here"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here as JSON")
    parser.add_argument(
        "--compare_naive",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure whole-model (non-streaming) conversions",
    )
    parser.add_argument("--sample_ms", type=float, default=5.0, help="anon/file RSS sampling interval")
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> dict[str, Any]:
    args = _parse_args(argv)
    from prm_jax.models.config import ModelConfig

    config = ModelConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
    )
    source_params = config.replace(with_prm_head=False).num_parameters()
    prm_params = config.replace(with_lm_head=False).num_parameters()
    sample_s = args.sample_ms / 1000
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="prm-conversion-memory-", dir=args.workdir))
    try:
        hf_src, orbax_dir, hf_out = work / "hf_source", work / "orbax", work / "hf_export"
        logs = work / "logs"
        logs.mkdir()
        t0 = time.perf_counter()
        specs = build_source_checkpoint(hf_src, config, max_shard_bytes=int(args.shard_mb * 1e6), seed=args.seed)
        build_s = time.perf_counter() - t0
        source_bytes = sum(s.nbytes for s in specs)
        largest = max(specs, key=lambda s: s.nbytes)
        shards = len(list(hf_src.glob("*.safetensors")))
        print(
            f"source: Qwen2ForCausalLM, {source_params:,} parameters, {_mib(source_bytes)} MiB fp32 in "
            f"{shards} shard(s) (written in {build_s:.1f}s)\n"
            f"largest tensor: {largest.name} {largest.shape}, {_mib(largest.nbytes)} MiB",
            flush=True,
        )

        def measure(name: str, mode: str, *child_args: str | Path) -> Measurement:
            print(f"  running {name} ...", flush=True)
            return run_child(name, mode, [str(a) for a in child_args], sample_s=sample_s, log_dir=logs)

        rows = [measure("baseline (imports+backend)", "baseline")]
        rows.append(
            measure(
                "hf_to_orbax streaming",
                "convert",
                "--direction=hf_to_orbax",
                f"--hf_dir={hf_src}",
                f"--orbax_dir={orbax_dir}",
            )
        )
        rows.append(
            measure(
                "orbax_to_hf streaming fp32",
                "convert",
                "--direction=orbax_to_hf",
                f"--orbax_dir={orbax_dir}",
                f"--hf_dir={hf_out}",
                "--dtype=float32",
            )
        )
        orbax_bytes, export_bytes = _tree_bytes(orbax_dir), _tree_bytes(hf_out)
        # The PRM export has no lm_head; check the largest tensor it does have, a layer's, the norm.
        check = [
            max((s for s in specs if s.name != "lm_head.weight"), key=lambda s: s.nbytes).name,
            "model.layers.1.mlp.up_proj.weight",
            "model.norm.weight",
        ]
        _check_round_trip(hf_src, hf_out, check)
        if args.compare_naive:
            naive_orbax, naive_hf = work / "naive_orbax", work / "naive_hf"
            rows.append(measure("hf_to_orbax naive", "naive_hf_to_orbax", hf_src, naive_orbax))
            shutil.rmtree(naive_orbax, ignore_errors=True)
            rows.append(measure("orbax_to_hf naive fp32", "naive_orbax_to_hf", orbax_dir, naive_hf))
            _check_round_trip(hf_src, naive_hf, check)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    baseline = rows[0]
    print(
        f"\nOrbax checkpoint {_mib(orbax_bytes)} MiB on disk; exported PRM ({prm_params:,} parameters, "
        f"no lm_head) {_mib(export_bytes)} MiB; round trip of {len(check)} tensors bit-exact\n"
    )
    print(format_table(rows, baseline, largest.nbytes))
    result = {
        "model": {
            "vocab_size": args.vocab,
            "hidden_size": args.hidden,
            "intermediate_size": args.intermediate,
            "num_hidden_layers": args.layers,
            "num_attention_heads": args.heads,
            "num_key_value_heads": args.kv_heads,
            "head_dim": args.head_dim,
        },
        "source_parameters": source_params,
        "source_bytes": source_bytes,
        "source_shards": shards,
        "largest_tensor": {"name": largest.name, "shape": list(largest.shape), "bytes": largest.nbytes},
        "orbax_bytes": orbax_bytes,
        "export_bytes": export_bytes,
        "runs": [
            {
                **dataclasses.asdict(r),
                "increment": r.peak_rss - baseline.peak_rss,
                "anon_increment": r.peak_anon - baseline.peak_anon,
            }
            for r in rows
        ],
    }
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == _CHILD_MODE:
        _child_main(sys.argv[2:])
    else:
        main(sys.argv[1:])
