r"""Plan a training run before it starts: compile its real train step for a target cluster, deviceless.

  python -m launch.plan --config=configs/qwen2_5_math_7b.py --target=h100x8 --out=plan.json
  python -m launch.plan --config=configs/tiny.py --target=local          # this machine's devices

Prints per-device memory (XLA's own figures) against what the devices can allocate, the compile
time, and the step time and tokens/s at --mfu; --out writes them as JSON. No weights are allocated
and no checkpoint or data is read: a preset's `model.arch` is its model's real architecture. Every
--config.* override of launch.train applies (mesh, batch, remat, ...).

GPU and TPU targets need XLA's compilers for them, the `plan` extra: `pip install -e ".[plan]"`
(jax[cuda12] and jax[tpu]; no GPU or TPU is needed), best in an environment of its own.
Targets: local, h100x8, h100x16, h100x64, h200x8, h200x64, v5p-8, v5p-64, v5p-256
(`prm_jax.training.plan.TARGETS`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from launch import errors
from launch.logs import configure_logging
from prm_jax.files import atomic_write
from prm_jax.training import plan

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).")
_TARGET = flags.DEFINE_enum("target", plan.LOCAL, plan.target_names(), "Cluster to plan for.")
_OUT = flags.DEFINE_string("out", None, "Write the plan as JSON here.")
_MFU = flags.DEFINE_float("mfu", plan.DEFAULT_MFU, "Model FLOPs utilisation the step time is stated at.")
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise errors.UserError(f"unexpected arguments: {argv[1:]}")
    configure_logging()
    if not 0 < _MFU.value <= 1:
        raise errors.UserError(f"--mfu={_MFU.value}: must be in (0, 1]")
    out = _writable_file(_OUT.value) if _OUT.value else None  # before the compile, which takes minutes
    record = plan.plan_training(_CONFIG.value, _TARGET.value, mfu=_MFU.value)
    record["config_file"] = config_flags.get_config_filename(flags.FLAGS["config"])
    print(plan.format_plan(record))
    if out is not None:
        atomic_write(out, json.dumps(record, indent=2) + "\n")
        print(f"plan written to {out}")
    sys.stdout.flush()


def _writable_file(value: str) -> Path:
    """--out as a file path that can be written, refused in one line otherwise (nothing is created)."""
    out = Path(value)
    if out.is_dir():
        raise errors.UserError(f"--out={value} is a directory: name the JSON file to write (e.g. {out / 'plan.json'})")
    parent = out.parent
    while not parent.exists():  # the folders that writing will create
        parent = parent.parent
    if not parent.is_dir():
        raise errors.UserError(f"--out={value}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise errors.UserError(f"--out={value}: {parent} is not writable")
    if out.exists() and not os.access(out, os.W_OK):
        raise errors.UserError(f"--out={value} exists and is not writable")
    return out


def run() -> None:
    """Entry point (console script `prm-jax-plan`): user errors exit 2 with one message."""
    errors.run(main, extra_user_errors=(plan.PlanError,))


if __name__ == "__main__":
    run()
