r"""Tiny synthesis run on CPU with the JAX sampler (smoke tests, the embedded demo).

  python -m launch.synthesize --config=configs/synth_tiny.py --workdir=/tmp/synth \
      --config.problems.path=problems.jsonl --config.policy.model_path=TINY_HF_DIR

Small N, k and max_tokens so that a random tiny model gets through every stage in seconds; the
judge defaults to the policy model (one backend serves both).
"""

from data_pipeline.config import default_config


def get_config():
    c = default_config()
    c.policy.backend = "jax"
    c.policy.dtype = "float32"
    c.policy.sampler.max_batch_rows = 32
    c.policy.sampler.chunk_size = 8
    c.policy.sampler.length_bucket = 128  # few distinct shapes: few compilations
    c.judge.dtype = "float32"
    c.judge.sampler.max_batch_rows = 32
    c.judge.sampler.chunk_size = 8
    c.judge.sampler.length_bucket = 128
    c.sample.n = 2
    c.sample.max_tokens = 24
    c.sample.batch_size = 4
    c.mc.k = 2
    c.mc.max_tokens = 12
    c.mc.batch_responses = 4
    c.judge.max_tokens = 12
    c.judge.batch_size = 8
    c.grading.workers = 1
    c.grading.timeout_s = 5.0
    c.io.fsync_every = 1
    return c
