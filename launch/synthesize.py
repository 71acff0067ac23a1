r"""Synthesize step-labelled PRM training data: sample, grade, MC estimation, LLM judge, consensus.

  python -m launch.synthesize --config=configs/synth_qwen2_5_math_7b.py --workdir=W \
      [--stage=all|sample|grade|mc|judge|consensus|merge] [--num_shards=N --shard_index=I] \
      [--config.problems.path=problems.jsonl --config.mc.k=8 ...]

Rerunning the same command resumes (finished records are skipped). With --num_shards=N, run one
command per node with --shard_index=0..N-1 on a shared workdir; the last shard to finish merges
(or run --stage=merge). Output: W/consensus/prm_train.jsonl and W/summary.json.
Exit status: 0 done, 1 a condition to fix (bad input under on_error=stop, a missing stage, a
workdir started with other settings, an invalid config), printed as one line.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from launch.logs import configure_logging

_CONFIG = config_flags.DEFINE_config_file("config", None, "Synthesis config file (configs/synth_*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (shared by all shards).")
_STAGE = flags.DEFINE_enum("stage", "all", ["all", "sample", "grade", "mc", "judge", "consensus", "merge"],
                           "Stage to run for this shard ('all': every stage, then the merge when all shards are done).")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 1, "Number of disjoint problem shards (one per node/process).")
_SHARD_INDEX = flags.DEFINE_integer("shard_index", 0, "This process's shard, 0..num_shards-1.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    configure_logging()
    from data_pipeline.config import ConfigError
    from data_pipeline.context import SynthesisError
    from data_pipeline.pipeline import run
    from data_pipeline.shards import Shard
    from prm_jax.data.records import DataError

    try:
        shard = Shard(_SHARD_INDEX.value, _NUM_SHARDS.value)
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    try:
        run(_CONFIG.value, _WORKDIR.value, stage=_STAGE.value, shard=shard)
    except (SynthesisError, DataError, ConfigError, FileNotFoundError) as error:
        logging.error("%s", error)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    app.run(main)
