r"""Peak host memory of synthesis's JAX backend loading a Hugging Face model.

  python -m bench.loader_memory [--layers=33 --hidden=1024 ...] [--workdir=/tmp] [--out=result.json]

`data_pipeline.backends.build_backend` (what `launch.synthesize` calls for a `backend="jax"` policy
or judge) loads a Hugging Face directory onto the devices. On a CPU, device memory is host memory,
so a loader that streams one tensor at a time peaks near "the model once + the largest tensor";
one that first reads the whole checkpoint into host arrays and then copies them to devices peaks
near twice the model.

Method: two random Qwen2 causal-LM checkpoints are written one generated tensor at a time
(`bench.conversion_memory.build_source_checkpoint`): the measured one (default ~1.5 GB fp32 in
33 layers of ~45 MB, largest tensor ~11 MB: "small tensors", so the peak shows the loader's
copies, not one huge tensor) and a 1-layer tiny one. Each is loaded by `build_backend` in a fresh
child interpreter (fp32 compute and storage, one CPU device), which reports its exact peak RSS
(`VmHWM`). The figure is (peak of the big load - peak of the tiny load) / the big checkpoint's size:
imports, the jax backend and the tokenizer cost the same in both and cancel.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

REPO_ROOT: Final[Path] = Path(__file__).resolve().parents[1]
MIB: Final[int] = 2**20
_CHILD_MODE: Final[str] = "__child__"
_RESULT_MARKER: Final[str] = "@@loader_memory_result@@ "


def _child_main(model_dir: str) -> None:
    """Loads `model_dir` through the synthesis backend factory and prints the peak RSS."""
    import jax.numpy as jnp

    from bench.conversion_memory import read_proc_status
    from data_pipeline.backends import build_backend
    from data_pipeline.config import default_config

    jnp.zeros(()).block_until_ready()
    section = default_config().policy
    section.model_path = model_dir
    section.dtype = "float32"
    section.param_dtype = "float32"
    start = time.perf_counter()
    backend = build_backend(section)
    seconds = time.perf_counter() - start
    status = read_proc_status()
    print(_RESULT_MARKER + json.dumps({"peak_rss": status["VmHWM"], "rss": status["VmRSS"], "load_s": seconds}))
    del backend


def _run_child(model_dir: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.loader_memory", _CHILD_MODE, str(model_dir)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_RESULT_MARKER)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"loading {model_dir} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(_RESULT_MARKER) :])


def _write_model(
    directory: Path, tokenizer_dir: Path, *, layers: int, hidden: int, intermediate: int, args: argparse.Namespace
) -> tuple[int, int]:
    """A random checkpoint plus the tiny tokenizer; returns its size and its largest tensor in bytes."""
    from bench.conversion_memory import build_source_checkpoint
    from prm_jax.models.config import ModelConfig

    config = ModelConfig(
        vocab_size=args.vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=hidden // args.heads,
    )
    specs = build_source_checkpoint(directory, config, max_shard_bytes=int(args.shard_mb * 1e6), seed=0)
    for item in tokenizer_dir.iterdir():
        shutil.copy(item, directory / item.name)
    return sum(s.nbytes for s in specs), max(s.nbytes for s in specs)


def main(argv: Sequence[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=33)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv_heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--shard_mb", type=float, default=500.0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    from prm_jax.tiny_tokenizer import build_tiny_tokenizer

    work = Path(tempfile.mkdtemp(prefix="prm-loader-memory-", dir=args.workdir))
    try:
        tokenizer_dir = build_tiny_tokenizer(work / "tokenizer")
        big_bytes, largest = _write_model(
            work / "big",
            tokenizer_dir,
            layers=args.layers,
            hidden=args.hidden,
            intermediate=args.intermediate,
            args=args,
        )
        tiny_bytes, _ = _write_model(work / "tiny", tokenizer_dir, layers=1, hidden=64, intermediate=128, args=args)
        tiny = _run_child(work / "tiny")
        big = _run_child(work / "big")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    increment = big["peak_rss"] - tiny["peak_rss"]
    result = {
        "model_bytes": big_bytes,
        "largest_tensor_bytes": largest,
        "tiny_model_bytes": tiny_bytes,
        "tiny_peak_rss": tiny["peak_rss"],
        "big_peak_rss": big["peak_rss"],
        "increment": increment,
        "increment_over_model": increment / big_bytes,
        "big_load_s": big["load_s"],
    }
    print(f"repo: {REPO_ROOT}")
    print(f"model: {big_bytes / MIB:,.0f} MiB fp32 in {args.layers} layers (largest tensor {largest / MIB:.1f} MiB)")
    print(f"peak RSS, tiny model load: {tiny['peak_rss'] / MIB:,.0f} MiB")
    print(f"peak RSS, big model load:  {big['peak_rss'] / MIB:,.0f} MiB  (load {big['load_s']:.1f} s)")
    print(f"increment: {increment / MIB:,.0f} MiB = {increment / big_bytes:.2f}x the model's size")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == _CHILD_MODE:
        _child_main(sys.argv[2])
    else:
        main(sys.argv[1:])
