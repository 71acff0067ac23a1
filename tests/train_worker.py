"""`python -m launch.train`, with a deterministic per-step delay for kill/preemption tests.

    PRM_TEST_STEP_DELAY_S=0.5 python tests/train_worker.py --config=configs/tiny.py --workdir=W ...

Takes exactly the flags of `launch.train` and runs it (`launch.train.run`). The only difference: the host
sleeps PRM_TEST_STEP_DELAY_S before each training step (wrapped around the batch fingerprint,
which the loop computes once per step before dispatch), so a test can reliably signal the run
between two checkpoints. The sleep touches no array: the math, the batches and the checkpoints are
those of the plain command. Works for multi-process runs too: importing the trainer module
initialises no JAX backend, so `jax.distributed.initialize` in `launch.train.main` still comes first.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `launch`


def _install_step_delay(seconds: float) -> None:
    from prm_jax.training import trainer

    fingerprint = trainer._fingerprint

    def slow_fingerprint(batch):
        time.sleep(seconds)
        return fingerprint(batch)

    trainer._fingerprint = slow_fingerprint


def _install_failing_save(step: int) -> None:
    """The background (async) write of checkpoint `step` fails as on a full disk."""
    import errno

    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    handler = json_checkpoint_handler.JsonCheckpointHandler
    save_fn = handler._save_fn

    async def failing_save_fn(self, x, directory):
        if isinstance(x, dict) and x.get("step") == step:
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return await save_fn(self, x, directory)

    handler._save_fn = failing_save_fn


if __name__ == "__main__":
    delay = float(os.environ.get("PRM_TEST_STEP_DELAY_S", "0"))
    if delay > 0:
        _install_step_delay(delay)
    if os.environ.get("PRM_TEST_FAIL_SAVE_STEP"):
        _install_failing_save(int(os.environ["PRM_TEST_FAIL_SAVE_STEP"]))
    from launch import train

    train.run()
