r"""The embedded demo's default sizes (CPU, about five minutes on 2 cores).

  python -m launch.demo --workdir=/tmp/demo                      # these defaults
  python -m launch.demo --workdir=/tmp/demo --config.sft.steps=400   # any field overridable
  python -m launch.demo --workdir=/tmp/demo --config.backend=vllm    # vLLM engines (vllm.kv_cache_gib)

World: single-digit operands, running totals in [0, max_value], 2-3 operations per problem; the
policy learns from solutions with mistakes of the kinds in sft.mistakes at sft.error_rate. The
judge's role is played by the exact step checker (wrong at judge.error_rate). The defaults live
in launch.demo_pipeline.default_config so the installed console script needs no file.
"""

from launch.demo_pipeline import default_config


def get_config():
    return default_config()
