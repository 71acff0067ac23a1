"""Resumption through the CLI is exact: a killed or preempted run, rerun, equals a straight run.

Run A trains N steps straight (`python -m launch.train`). Run B is the same command in another
workdir, SIGKILLed after a checkpoint (step >= N/2) is committed and after it has logged a step
past that checkpoint, then rerun to completion; run C gets SIGTERM (preemption) instead. Both must
end with the same parameters as A bit for bit, and one metrics line per step whose batch
fingerprints and losses are A's: the same examples seen in the same order, nothing lost, nothing
counted twice. Also: a run killed before its first checkpoint restarts cleanly (no stale metrics
lines), and rerunning a finished run changes nothing.

To kill reliably between two checkpoints the killed runs go through tests/train_worker.py, which is
`launch.train` plus a host-side sleep before each step (no effect on the math); the reruns are the
plain command.
"""

from __future__ import annotations

import re
import signal
import time

import numpy as np
import pytest
from training_runs import (
    RUN_TIMEOUT_S,
    committed_steps,
    final_params,
    read_metrics,
    resumed_at,
    run_to_completion,
    running,
    start,
    train_flags,
    wait_for_checkpoint,
)

N = 8
SAVE_EVERY = 4  # checkpoints at 4 and 8: after 4, steps 5-7 are logged but not yet checkpointed
STEP_DELAYS_S = (0.5, 1.5)  # a second, slower attempt only if the first one loses the race

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    log = run_to_completion(train_flags(workdir, N, SAVE_EVERY), workdir.parent / "straight.log")
    assert resumed_at(log) is None
    assert committed_steps(workdir)[-1] == N
    return workdir, read_metrics(workdir), final_params(workdir, N)


def _assert_same_as_straight(workdir, straight, *, stopped_at: int) -> None:
    a_dir, a_metrics, a_params = straight
    metrics = read_metrics(workdir)
    # One line per step 1..N: the lines of steps after the checkpoint were dropped and redone.
    assert [r["step"] for r in metrics["train"]] == list(range(1, N + 1)), metrics["train"]
    assert [r["step"] for r in metrics["data"]] == [0]
    assert [r["step"] for r in metrics["eval"]] == [N]
    for got, want in zip(metrics["train"], a_metrics["train"], strict=True):
        # Same examples in the same order (before and after the resume point) and the same math.
        assert got["batch_fingerprint"] == want["batch_fingerprint"], (got["step"], stopped_at)
        for key in ("loss", "grad_norm", "lr"):
            assert got[key] == want[key], (got["step"], key, got[key], want[key])
    assert metrics["eval"][0]["eval_loss"] == a_metrics["eval"][0]["eval_loss"]

    params = final_params(workdir, N)
    assert params.keys() == a_params.keys()
    for path, value in params.items():
        assert value.dtype == a_params[path].dtype
        assert np.array_equal(value, a_params[path]), f"{path}: max |diff| {np.max(np.abs(value - a_params[path]))}"


def _sigkill_when(tmp_path, name: str, ready) -> tuple[object, list[str]]:
    """Starts the slowed-down run and SIGKILLs it once `ready(workdir)` holds, before step N.

    Returns (workdir, flags). Should the run reach step N first (a very slow or overloaded
    machine), it tries once more at a slower pace.
    """
    for attempt, delay in enumerate(STEP_DELAYS_S):
        workdir = tmp_path / f"{name}{attempt}"
        flags = train_flags(workdir, N, SAVE_EVERY)
        run = start(flags, tmp_path / f"{name}{attempt}-killed.log", cpu_devices=1, step_delay_s=delay)
        with running(run):
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while run.proc.poll() is None and not ready(workdir):
                assert time.monotonic() < deadline, run.log()
                time.sleep(0.02)
            run.kill(signal.SIGKILL)
            rc = run.proc.wait(timeout=30)
        if N not in committed_steps(workdir):
            assert rc == -signal.SIGKILL, run.log()
            return workdir, flags
    pytest.fail(f"the run reached step {N} before the kill, even at {STEP_DELAYS_S[-1]} s/step")


def test_resume_after_sigkill_is_exact(straight, tmp_path) -> None:
    def ready(workdir) -> bool:
        # A checkpoint >= N/2, and a metrics line past the latest checkpoint: work the rerun must
        # redo (and the metrics writer must drop), not count twice.
        steps = committed_steps(workdir)
        return bool(steps) and steps[-1] >= N // 2 and any(r["step"] > steps[-1] for r in _train_lines_so_far(workdir))

    workdir, flags = _sigkill_when(tmp_path, "run", ready)
    steps = committed_steps(workdir)
    latest = steps[-1]
    assert N // 2 <= latest < N, steps
    logged = [r["step"] for r in _train_lines_so_far(workdir)]
    assert max(logged) > latest, logged  # the dead run logged steps its checkpoint does not have

    # What a kill during the (async) save of the next checkpoint leaves behind: a half-written
    # Orbax tmp directory. The rerun must not resume from it, and must replace it.
    partial = workdir / "checkpoints" / f"{latest + SAVE_EVERY}.orbax-checkpoint-tmp"
    (partial / "params").mkdir(parents=True, exist_ok=True)
    (partial / "params" / "half-written").write_bytes(b"\0" * 100)

    log = run_to_completion(flags, tmp_path / "rerun.log")
    assert resumed_at(log) == latest, log[-3000:]
    assert "final_step=8, stopped_early=False" in log
    assert not partial.exists()
    assert committed_steps(workdir) == [latest, N]
    _assert_same_as_straight(workdir, straight, stopped_at=latest)

    # Rerunning a finished run is a no-op: nothing trained, logged or saved again.
    metrics_before = (workdir / "metrics.jsonl").read_bytes()
    log = run_to_completion(flags, tmp_path / "rerun-finished.log")
    assert resumed_at(log) == N and "final_step=8, stopped_early=False" in log
    assert (workdir / "metrics.jsonl").read_bytes() == metrics_before
    assert committed_steps(workdir) == [latest, N]


def test_restart_before_first_checkpoint_is_clean(straight, tmp_path) -> None:
    """Killed before any checkpoint: the rerun starts over and forgets the dead run's lines."""
    workdir, flags = _sigkill_when(
        tmp_path, "run", lambda w: not committed_steps(w) and len(_train_lines_so_far(w)) >= 1
    )
    assert committed_steps(workdir) == []
    log = run_to_completion(flags, tmp_path / "rerun.log")
    assert resumed_at(log) is None
    _assert_same_as_straight(workdir, straight, stopped_at=0)  # incl. a single step-0 data line


def test_sigterm_saves_and_resumes_exactly(straight, tmp_path) -> None:
    workdir = tmp_path / "run"
    flags = train_flags(workdir, N, SAVE_EVERY)
    run = start(flags, tmp_path / "preempted.log", cpu_devices=1, step_delay_s=STEP_DELAYS_S[0])
    with running(run):
        wait_for_checkpoint(run, workdir, SAVE_EVERY)
        run.proc.send_signal(signal.SIGTERM)  # the trainer process only, as a scheduler would
        rc = run.wait()
    log = run.log(tail=10**7)
    assert rc == 0, log[-3000:]
    match = re.search(r"training done: final_step=(\d+), stopped_early=(\w+)", log)
    assert match, log[-3000:]
    stopped_at, stopped_early = int(match.group(1)), match.group(2)
    assert stopped_early == "True"
    assert SAVE_EVERY < stopped_at < N  # stopped between the regular checkpoints...
    assert committed_steps(workdir)[-1] == stopped_at  # ...and saved where it stopped
    # Every step it ran was checked and logged before the final save.
    assert [r["step"] for r in read_metrics(workdir)["train"]] == list(range(1, stopped_at + 1))

    log = run_to_completion(flags, tmp_path / "rerun.log")
    assert resumed_at(log) == stopped_at, log[-3000:]
    assert "final_step=8, stopped_early=False" in log
    _assert_same_as_straight(workdir, straight, stopped_at=stopped_at)


def _train_lines_so_far(workdir) -> list[dict]:
    """Train lines of a metrics file that a live (or killed) run may be writing."""
    import json

    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written (or cut by the kill)
        if "loss" in record:
            out.append(record)
    return out
