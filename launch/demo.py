r"""The embedded demo: the whole PRM pipeline on a CPU in minutes, in a procedural math world.

  python -m launch.demo --workdir=/tmp/demo          # or the console script: prm-jax-demo --workdir=...
  python -m launch.demo --workdir=/tmp/demo --config.sft.steps=400 --config.judge.error_rate=0.2
  python -m launch.demo --workdir=/tmp/demo --config.backend=vllm   # generation and scoring on vLLM

Policy SFT -> synthesis (sample, grade, MC rollouts, judge, consensus) with the JAX sampler (or,
with `--config.backend=vllm`, a vLLM engine serving the policy exported to Hugging Face format) ->
PRM training from the policy's backbone -> Orbax -> Hugging Face conversion -> evaluation on
held-out problems (ProcessBench-format records labelled by the exact checker; Best-of-N against
majority vote; scored by vLLM under `backend=vllm`). The LLM judge's role is played by the
world's exact step checker, with an optional error rate. Output: a results table on the terminal,
W/results.json, W/results.png, W/bon.png and every intermediate artifact under W. Rerunning the same
command resumes.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from launch import errors
from launch.demo_pipeline import default_config, run_demo
from launch.logs import configure_logging
from prm_jax.run_lock import RunLockedError, workdir_lock

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (every artifact goes here).")
flags.mark_flags_as_required(["workdir"])


config_flags.DEFINE_config_dict("config", default_config(), "Demo settings (launch.demo_pipeline.default_config).")


#: What a rerun after a full disk does (`launch.errors`; `run_demo` resumes every stage).
RERUN_NOTE = "it resumes: finished records and checkpoints are kept"


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    configure_logging()
    # One demo per workdir at a time (a second is refused, naming the first); a file is refused too.
    with workdir_lock(_WORKDIR.value, "launch.demo"):
        run_demo(flags.FLAGS.config, _WORKDIR.value, say=lambda line: print(line, flush=True))
    sys.exit(0)


def run() -> None:
    """Console-script entry point (prm-jax-demo): user errors exit 2 with one message."""
    from data_pipeline.context import SynthesisError
    from prm_jax.training.trainer import TrainingError

    errors.run(main, extra_user_errors=(SynthesisError, TrainingError, RunLockedError), rerun_note=RERUN_NOTE)


if __name__ == "__main__":
    run()
