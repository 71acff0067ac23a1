r"""Train a PRM (or a causal LM) with sharded JAX.

  python -m launch.train --config=configs/tiny.py --workdir=W [--config.train.num_steps=500 ...]

Multi-host: every process runs the same command. On TPU pods and SLURM clusters
`jax.distributed.initialize()` finds its peers itself; elsewhere pass --coordinator_address,
--num_processes and --process_id. Rerunning the same command resumes from W/checkpoints.
"""

from __future__ import annotations

import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from launch import errors
from launch.logs import configure_logging

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, TensorBoard.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (auto-detects TPU/SLURM/MPI)."
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (implies --distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


#: What a rerun after a full disk does (`launch.errors`): training resumes from its checkpoints.
RERUN_NOTE = "it resumes from the last committed checkpoint"


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    configure_logging()
    peers = _peer_processes_from_environment()
    if peers > 1 and not (_DISTRIBUTED.value or _COORDINATOR.value):
        # Without initialisation every host would train alone and write the same workdir.
        raise app.UsageError(
            f"the environment describes {peers} processes (SLURM/TPU pod) but jax.distributed is not "
            "initialised: pass --distributed"
        )
    if _DISTRIBUTED.value or _COORDINATOR.value:
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value
        )
    # Imported after distributed init: these modules touch devices.
    from data_pipeline.synthetic import prepare_synthetic_run
    from prm_jax.run_lock import check_directory
    from prm_jax.training.config import check as check_config
    from prm_jax.training.run import run_directory_lock, train_from_config

    workdir = check_directory(_WORKDIR.value)
    # The whole config, before the synthetic generator or anything else writes into the workdir; the
    # workdir's lock before anything is written (a second run on it is refused, naming the first).
    check_config(_CONFIG.value, device_count=jax.device_count())
    with run_directory_lock(workdir, "launch.train"):
        result = train_from_config(prepare_synthetic_run(_CONFIG.value, workdir), workdir)
    if jax.process_index() == 0:
        summary = {"final_step": result.final_step, "stopped_early": result.stopped_early, **(result.last_eval or {})}
        print(
            "training done: "
            + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
        )
    sys.exit(0)


def _peer_processes_from_environment() -> int:
    slurm = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    tpu_hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    return max(slurm, len(tpu_hosts), 1)


def run() -> None:
    """Entry point: user errors (bad config, data, paths, a failed save) exit 2 with one message."""
    from prm_jax.run_lock import RunLockedError
    from prm_jax.training.trainer import TrainingError

    errors.run(main, extra_user_errors=(TrainingError, RunLockedError), rerun_note=RERUN_NOTE)


if __name__ == "__main__":
    run()
