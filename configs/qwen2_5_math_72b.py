"""PRM from Qwen2.5-Math-72B-Instruct (the Qwen2.5-Math-PRM-72B recipe): 64+ H100s or a v5p-64.

fsdp over all devices x tensor 8 (within an NVLink node / a TPU slice's ICI ring), the residual
stream sequence-sharded over tensor. Deviceless plans (`launch.plan`, docs/performance.md): 36.4 GiB
per device on 64 x H100 (39% headroom under JAX's 59.3 GiB), 76.8 GiB on a v5p-64 (20% under
95.7 GiB); 2 rows per fsdp shard per microbatch (32 microbatches on 64 GPUs).
Convert and launch as in qwen2_5_math_7b.py with this config. Plan it first (no GPU needed):

  python -m launch.plan --config=configs/qwen2_5_math_72b.py --target=h100x64
"""

from prm_jax.training.config import default_config
from prm_jax.training.presets import QWEN2_5_MATH_72B


def get_config():
    c = default_config()
    # The base model's real architecture: `launch.plan` compiles it without a checkpoint, and an
    # init_from checkpoint of other shapes is refused (`prm_jax.training.presets`).
    c.model.arch_name = "Qwen2.5-Math-72B-Instruct"
    c.model.arch.update(QWEN2_5_MATH_72B)
    c.data.seq_len = 4096  # max_position_embeddings of Qwen2.5-Math-72B-Instruct
    c.train.global_batch_rows = 512  # 512 x 4096 packed tokens (~2M) per step
    c.train.microbatch_rows_per_shard = 2  # grad_accum_steps = 512 / (2 x fsdp shards)
    c.train.num_steps = 1000
    c.train.eval_every = 200
    c.optimizer.learning_rate = 2e-6
    c.optimizer.warmup_steps = 50
    c.model.remat_policy = "dots_no_batch"  # fits (above); "full" saves ~12 GiB more at ~1/3 more compute
    c.mesh.update(data=1, fsdp=-1, tensor=8)
    c.checkpoint.save_every = 100
    return c
