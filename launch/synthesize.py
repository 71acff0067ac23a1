r"""Synthesize step-labelled PRM training data: sample, grade, MC estimation, LLM judge, consensus.

  python -m launch.synthesize --config=configs/synth_qwen2_5_math_7b.py --workdir=W \
      [--stage=all|sample|grade|mc|judge|consensus|merge] [--num_shards=N --shard_index=I] \
      [--runner=local|ray [--ray_address=ADDR] [--ray_workers=N]] \
      [--config.problems.path=problems.jsonl --config.mc.k=8 ...]

Rerunning the same command resumes (finished records are skipped). Scale-out, two ways:
--runner=ray (`pip install -e ".[ray]"`): this process drives the stages and a Ray cluster's
workers run the generation engines, balanced, with failed batches retried elsewhere
(data_pipeline.ray_runner; worker and timing figures in W/ray_summary.json). Without Ray,
--num_shards=N: run one command per node with --shard_index=0..N-1 on a shared workdir; the last
shard to finish merges (or run --stage=merge). Output: W/consensus/prm_train.jsonl and W/summary.json.
Exit status: 0 done, 2 a condition to fix (bad input under on_error=stop, a missing stage, a
workdir started with other settings, an invalid config, a held shard lock, a full disk), printed
as one line (--verbose_errors adds the traceback). The whole config is validated before anything
is loaded or written.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from data_pipeline.config import default_config
from data_pipeline.context import SynthesisError
from data_pipeline.shards import ShardLockedError
from launch import errors
from launch.logs import configure_logging
from prm_jax.generation.openai_backend import OpenAIServerError
from prm_jax.jsonl import DataError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Synthesis config file (configs/synth_*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (shared by all shards).")
_STAGE = flags.DEFINE_enum(
    "stage",
    "all",
    ["all", "sample", "grade", "mc", "judge", "consensus", "merge"],
    "Stage to run for this shard ('all': every stage, then the merge when all shards are done).",
)
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 1, "Number of disjoint problem shards (one per node/process).")
_SHARD_INDEX = flags.DEFINE_integer("shard_index", 0, "This process's shard, 0..num_shards-1.")
_RUNNER = flags.DEFINE_enum(
    "runner",
    "local",
    ["local", "ray"],
    "'local': engines in this process. 'ray': engines on Ray workers (the config's ray section), this "
    "process drives the stages and writes the workdir.",
)
_RAY_ADDRESS = flags.DEFINE_string(
    "ray_address", None, "--runner=ray: the cluster ('auto', host:port); sets --config.ray.address."
)
_RAY_WORKERS = flags.DEFINE_integer(
    "ray_workers", None, "--runner=ray: generation workers per model (0: as many as fit); sets --config.ray.workers."
)
flags.mark_flags_as_required(["config", "workdir"])

#: Library errors reported as one line (ConfigError is a ValueError; see launch.errors).
USER_ERRORS = (SynthesisError, ShardLockedError, DataError, OpenAIServerError)


#: What a rerun after a full disk does (`launch.errors`): the append-only shards resume by id.
RERUN_NOTE = "it resumes: finished records are kept"


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from data_pipeline.pipeline import run
    from data_pipeline.shards import Shard

    index, count = _SHARD_INDEX.value, _NUM_SHARDS.value
    if count < 1 or not 0 <= index < count:
        raise errors.UserError(
            f"--shard_index={index} --num_shards={count}: need num_shards >= 1 and 0 <= shard_index < num_shards"
        )
    shard = Shard(index, count)
    try:
        config = _CONFIG.value
        config.keys()  # ml_collections defers a config file that failed to load to first use
    except OSError as error:
        raise errors.UserError(f"--config: {' '.join(str(error).split())}") from None
    configure_logging()
    ray_flags = {"ray_address": _RAY_ADDRESS.value, "ray_workers": _RAY_WORKERS.value}
    if _RUNNER.value == "local":
        if any(value is not None for value in ray_flags.values()):
            raise errors.UserError(
                f"{', '.join('--' + k for k, v in ray_flags.items() if v is not None)} need --runner=ray"
            )
        run(config, _WORKDIR.value, stage=_STAGE.value, shard=shard)
        return
    from data_pipeline import ray_runner

    if "ray" not in config:
        config.ray = default_config().ray
    if _RAY_ADDRESS.value is not None:
        config.ray.address = _RAY_ADDRESS.value
    if _RAY_WORKERS.value is not None:
        config.ray.workers = _RAY_WORKERS.value
    with ray_runner.session(ray_runner.RaySettings.from_config(config)) as build:
        run(config, _WORKDIR.value, stage=_STAGE.value, shard=shard, build=build)


if __name__ == "__main__":
    errors.run(main, extra_user_errors=USER_ERRORS, rerun_note=RERUN_NOTE)
