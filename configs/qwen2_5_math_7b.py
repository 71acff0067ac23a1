"""PRM from Qwen2.5-Math-7B-Instruct (the Qwen2.5-Math-PRM-7B recipe): 8-64 H100/H200 or a v5p-64.

Deviceless plans (`launch.plan`, docs/performance.md): 40.1 GiB per device on 8 x H100 (32% headroom
under JAX's 59.3 GiB), 25.0 GiB on 64 x H100, 31.1 GiB on a v5p-64. Accumulation follows the mesh:
2 rows per device per microbatch (16 microbatches on 8 GPUs, 2 on 64).

  python -m launch.convert --direction=hf_to_orbax --hf_dir=Qwen2.5-Math-7B-Instruct --orbax_dir=BASE
  python -m launch.train --config=configs/qwen2_5_math_7b.py --workdir=W \
      --config.model.init_from=BASE --config.data.train_file=prm_train.jsonl \
      --config.data.eval_file=prm_eval.jsonl --config.data.tokenizer_dir=Qwen2.5-Math-7B-Instruct
  python -m launch.plan --config=configs/qwen2_5_math_7b.py --target=h100x8   # memory and step time first, no GPU needed
"""

from prm_jax.training.config import default_config
from prm_jax.training.presets import QWEN2_5_MATH_7B


def get_config():
    c = default_config()
    # The base model's real architecture: `launch.plan` compiles it without a checkpoint, and an
    # init_from checkpoint of other shapes is refused (`prm_jax.training.presets`).
    c.model.arch_name = "Qwen2.5-Math-7B-Instruct"
    c.model.arch.update(QWEN2_5_MATH_7B)
    # Qwen2.5-Math-7B-Instruct has max_position_embeddings 4096: a packed row (and so a single
    # example) may not be longer, or positions past the trained context would be trained on.
    c.data.seq_len = 4096
    c.train.global_batch_rows = 256  # 256 x 4096 packed tokens (~1M) per step
    c.train.microbatch_rows_per_shard = 2  # grad_accum_steps = 256 / (2 x devices)
    c.train.num_steps = 2000
    c.train.eval_every = 250
    c.optimizer.learning_rate = 5e-6
    c.optimizer.warmup_steps = 100
    c.model.remat_policy = "dots_no_batch"
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.checkpoint.save_every = 250
    return c
