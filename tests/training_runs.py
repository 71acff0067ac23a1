"""Helpers for tests that run `launch.train` in subprocesses (resume, preemption, multi-host).

Every subprocess is started in its own session, so a failing or timed-out test kills the whole
process group it started (never anything else) and CI never hangs on a stray trainer.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny.py"
WORKER = Path(__file__).resolve().with_name("train_worker.py")
RUN_TIMEOUT_S = 300  # one run takes 10-40 s on 2 CPU cores; this only bounds a hang

# Small and fast: 4 packed rows of 128 tokens, every step logged, eval only at the last step.
SMALL = (
    "--config.train.log_every=1",
    "--config.train.eval_every=1000",
    "--config.data.seq_len=128",
    "--config.train.global_batch_rows=4",
)


def train_flags(workdir: Path, num_steps: int, save_every: int, *extra: str) -> list[str]:
    return [
        f"--config={CONFIG}",
        f"--workdir={workdir}",
        f"--config.train.num_steps={num_steps}",
        f"--config.checkpoint.save_every={save_every}",
        *SMALL,
        *extra,
    ]


@dataclass
class Run:
    proc: subprocess.Popen
    log_path: Path

    def log(self, tail: int = 4000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-tail:]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the process group this run started (the trainer and anything it spawned)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait(timeout=30)
            raise AssertionError(f"training run timed out after {timeout}s; log tail:\n{self.log()}") from None


def start(
    flags: list[str], log_path: Path, *, cpu_devices: int, step_delay_s: float = 0.0, fail_save_step: int | None = None
) -> Run:
    """`python -m launch.train FLAGS` (or tests/train_worker.py when a step delay or a failing
    checkpoint save is asked for)."""
    env = dict(os.environ)
    env.update(
        {
            "JAX_PLATFORMS": "cpu",
            "JAX_NUM_CPU_DEVICES": str(cpu_devices),
            "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
            "PYTHONUNBUFFERED": "1",
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
    )
    env.pop("XLA_FLAGS", None)  # no stray --xla_force_host_platform_device_count
    if fail_save_step is not None:
        env["PRM_TEST_FAIL_SAVE_STEP"] = str(fail_save_step)
    if step_delay_s > 0:
        env["PRM_TEST_STEP_DELAY_S"] = str(step_delay_s)
    if step_delay_s > 0 or fail_save_step is not None:
        cmd = [sys.executable, str(WORKER), *flags]
    else:
        cmd = [sys.executable, "-m", "launch.train", *flags]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return Run(proc, log_path)


@contextlib.contextmanager
def running(*runs: Run) -> Iterator[tuple[Run, ...]]:
    """Kill whatever is still alive on the way out (test failure, timeout, KeyboardInterrupt)."""
    try:
        yield runs
    finally:
        for run in runs:
            run.kill()
        for run in runs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.proc.wait(timeout=30)


def run_to_completion(flags: list[str], log_path: Path, *, cpu_devices: int = 1) -> str:
    run = start(flags, log_path, cpu_devices=cpu_devices)
    with running(run):
        rc = run.wait()
    assert rc == 0, f"training exited with {rc}; log tail:\n{run.log()}"
    return run.log(tail=10**7)


def committed_steps(workdir: Path) -> list[int]:
    """Steps whose checkpoint is committed (Orbax writes `<step>.orbax-checkpoint-tmp*`, then renames)."""
    root = Path(workdir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())


def wait_for_checkpoint(run: Run, workdir: Path, min_step: int, timeout: float = RUN_TIMEOUT_S) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = committed_steps(workdir)
        if steps and steps[-1] >= min_step:
            return steps
        if run.proc.poll() is not None:
            raise AssertionError(
                f"run exited ({run.proc.returncode}) before a checkpoint >= {min_step}; log tail:\n{run.log()}"
            )
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint >= {min_step} within {timeout}s; log tail:\n{run.log()}")


def read_metrics(workdir: Path) -> dict[str, list[dict]]:
    lines = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {
        "train": [r for r in lines if "loss" in r],
        "eval": [r for r in lines if "eval_loss" in r],
        "data": [r for r in lines if any(k.startswith("data/") for k in r)],
        "all": lines,
    }


def resumed_at(log: str) -> int | None:
    match = re.search(r"resumed from \S+ at step (\d+)", log)
    return int(match.group(1)) if match else None


def final_params(workdir: Path, step: int) -> dict[tuple, np.ndarray]:
    """The params of checkpoint `step`, restored in this process on one device (no mesh)."""
    from flax.nnx.traversals import flatten_mapping

    from prm_jax.checkpoint import read_model_config, restore_params

    directory = Path(workdir) / "checkpoints" / str(step)
    params = flatten_mapping(restore_params(directory, read_model_config(directory)))
    for path, value in params.items():
        assert len(value.sharding.device_set) == 1, (path, value.sharding)
    return {path: np.asarray(value) for path, value in params.items()}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
