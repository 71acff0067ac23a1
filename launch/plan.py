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
import sys
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from launch import errors
from launch.logs import configure_logging
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
    record = plan.plan_training(_CONFIG.value, _TARGET.value, mfu=_MFU.value)
    record["config_file"] = config_flags.get_config_filename(flags.FLAGS["config"])
    print(plan.format_plan(record))
    if _OUT.value:
        out = Path(_OUT.value)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"plan written to {out}")
    sys.stdout.flush()


def run() -> None:
    """Entry point (console script `prm-jax-plan`): user errors exit 2 with one message."""
    errors.run(main, extra_user_errors=(plan.PlanError,))


if __name__ == "__main__":
    run()
