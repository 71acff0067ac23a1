"""Multi-host training on CPU: 2 processes x 2 devices (gloo collectives) equal 1 process x 4 devices.

All runs are `python -m launch.train` with the same flags and the same 2x2 (data, fsdp) mesh; the
two-process runs add `--coordinator_address=127.0.0.1:PORT --num_processes=2 --process_id=i`
(`jax.distributed.initialize`; CPU collectives over gloo). Every process builds the same global
batch stream and feeds the rows its devices own, so the batches (fingerprints) are those of the
single-process run, and the losses equal up to the order of cross-device reductions. A
two-process checkpoint restores in one process on one device. A preempted two-process run (SIGTERM
to one process only) stops everywhere at the same step, saves, and resumes to the same result.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import numpy as np
import pytest
from training_runs import (
    committed_steps,
    final_params,
    free_port,
    read_metrics,
    resumed_at,
    running,
    start,
    train_flags,
    wait_for_checkpoint,
)

N = 4
SAVE_EVERY = 2
MESH = ("--config.mesh.data=2", "--config.mesh.fsdp=2")  # data across the processes, fsdp within
LOSS_RTOL = 1e-5  # observed: equal, or ~1e-7 relative (float32 reduction order, in-process vs gloo)
PARAM_TOL = dict(rtol=1e-5, atol=1e-6)  # observed max |diff| ~2e-8 after 4 steps

pytestmark = pytest.mark.slow


class _Reference:
    """The single-process 4-device run, started once and awaited by the first test that needs it."""

    def __init__(self, tmp_path_factory):
        self.workdir = tmp_path_factory.mktemp("single")
        self.run = start(
            train_flags(self.workdir, N, SAVE_EVERY, *MESH), self.workdir.parent / "single.log", cpu_devices=4
        )
        self._result = None

    def result(self):
        if self._result is None:
            rc = self.run.wait()
            assert rc == 0, f"single-process run exited with {rc}:\n{self.run.log()}"
            self._result = read_metrics(self.workdir), final_params(self.workdir, N)
        return self._result


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ref = _Reference(tmp_path_factory)  # runs while the first two-process run starts
    with running(ref.run):
        yield ref


def _start_two_processes(workdir, log_dir, name, step_delay_s=0.0, port=None):
    port = port or free_port()
    flags = train_flags(workdir, N, SAVE_EVERY, *MESH, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2")
    return [
        start([*flags, f"--process_id={i}"], log_dir / f"{name}{i}.log", cpu_devices=2, step_delay_s=step_delay_s)
        for i in range(2)
    ]


def _wait_all(runs) -> None:
    # A failed peer leaves the other blocked in a collective: `running` kills it on the way out.
    for run in runs:
        rc = run.wait()
        assert rc == 0, f"{run.log_path.name} exited with {rc}:\n{run.log()}"


def _compare_with_reference(workdir, reference, label: str, runs: int = 1) -> None:
    single_metrics, single_params = reference.result()
    metrics = read_metrics(workdir)
    # Only process 0 writes metrics: a second writer would duplicate every line.
    assert [r["step"] for r in metrics["train"]] == list(range(1, N + 1)), metrics["train"]
    assert [r["step"] for r in metrics["data"]] == [0]
    assert [r["step"] for r in metrics["eval"]] == [N]
    assert len(list((workdir / "tensorboard").iterdir())) == runs  # one event file per run: process 0's

    rel = []
    for got, want in zip(metrics["train"], single_metrics["train"], strict=True):
        assert got["batch_fingerprint"] == want["batch_fingerprint"], got["step"]  # the same examples
        assert (got["tokens"], got["supervised"]) == (want["tokens"], want["supervised"])
        assert got["lr"] == want["lr"]
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=LOSS_RTOL, err_msg=f"step {got['step']}")
        np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-4, err_msg=f"step {got['step']}")
        rel.append(abs(got["loss"] - want["loss"]) / abs(want["loss"]))
    np.testing.assert_allclose(metrics["eval"][0]["eval_loss"], single_metrics["eval"][0]["eval_loss"], rtol=LOSS_RTOL)

    # The final checkpoint, restored here in one process on one device, without a mesh.
    params = final_params(workdir, N)
    assert params.keys() == single_params.keys()
    worst = 0.0
    for path, value in params.items():
        np.testing.assert_allclose(value, single_params[path], **PARAM_TOL, err_msg=str(path))
        worst = max(worst, float(np.max(np.abs(value - single_params[path]))))
    print(
        f"\n{label}: relative loss differences vs 1x4 per step {[f'{r:.2g}' for r in rel]}; "
        f"max |param difference| after {N} steps {worst:.2g}"
    )


def _assert_both_processes_wrote_step(workdir: Path, step: int) -> None:
    """Each process wrote its parameter shard and its (identical: one global stream) iterator state."""
    step_dir = workdir / "checkpoints" / str(step)
    assert sorted(p.name for p in (step_dir / "params").glob("ocdbt.process_*")) == [
        "ocdbt.process_0",
        "ocdbt.process_1",
    ]
    iter_states = sorted((step_dir / "data_iter").glob("process_*.json"))
    assert [p.name for p in iter_states] == ["process_0-of-2.json", "process_1-of-2.json"]
    assert json.loads(iter_states[0].read_text()) == json.loads(iter_states[1].read_text())


@pytest.mark.redundant
def test_two_processes_match_one_process(tmp_path, reference) -> None:
    """Redundant with `test_two_process_preemption_resumes`, which ends the same 2-process run (after
    a preemption) equal to the 1-process reference, with both processes' shards and iterator states."""
    workdir = tmp_path / "multi"
    workers = _start_two_processes(workdir, tmp_path, "multi")
    with running(*workers):
        _wait_all(workers)
    logs = [w.log(tail=10**7) for w in workers]
    assert "training done: final_step=4, stopped_early=False" in logs[0]
    assert "training done" not in logs[1]  # only process 0 reports

    assert committed_steps(workdir)[-1] == N
    _assert_both_processes_wrote_step(workdir, N)

    _compare_with_reference(workdir, reference, "2 processes")


def test_two_process_preemption_resumes(tmp_path, reference) -> None:
    """SIGTERM to process 1 only: both stop at the same step and save; the rerun resumes in 2 processes."""
    workdir = tmp_path / "multi"
    # 1 s/step of host sleep (tests/train_worker.py) keeps the run from reaching step N before
    # the signal: it lands in step 3 (the commit of checkpoint 2 takes well under a second).
    workers = _start_two_processes(workdir, tmp_path, "preempted", step_delay_s=1.0)
    with running(*workers):
        wait_for_checkpoint(workers[0], workdir, SAVE_EVERY)
        workers[1].proc.send_signal(signal.SIGTERM)
        _wait_all(workers)
    log = workers[0].log(tail=10**7)
    match = re.search(r"training done: final_step=(\d+), stopped_early=True", log)
    assert match, log[-3000:]  # process 0 stopped too, though only process 1 was signalled
    stopped_at = int(match.group(1))
    assert SAVE_EVERY < stopped_at < N
    assert committed_steps(workdir)[-1] == stopped_at

    workers = _start_two_processes(workdir, tmp_path, "resumed")
    with running(*workers):
        _wait_all(workers)
    for worker in workers:
        assert resumed_at(worker.log(tail=10**7)) == stopped_at
    assert "training done: final_step=4, stopped_early=False" in workers[0].log(tail=10**7)
    assert "training done" not in workers[1].log(tail=10**7)  # only process 0 reports
    assert committed_steps(workdir)[-1] == N
    _assert_both_processes_wrote_step(workdir, N)
    _compare_with_reference(workdir, reference, f"2 processes, preempted at {stopped_at} and resumed", runs=2)
