"""PRM from Qwen2.5-Math-72B-Instruct (the Qwen2.5-Math-PRM-72B recipe): 64+ GPUs or a v5p-256.

fsdp over all devices x tensor 8 (within an NVLink node / a TPU slice's ICI ring); full remat.
Convert and launch as in qwen2_5_math_7b.py with this config.
"""

from prm_jax.training.config import default_config


def get_config():
    c = default_config()
    c.data.seq_len = 4096  # max_position_embeddings of Qwen2.5-Math-72B-Instruct
    c.train.global_batch_rows = 512  # 512 x 4096 packed tokens (~2M) per step
    c.train.grad_accum_steps = 8
    c.train.num_steps = 1000
    c.train.eval_every = 200
    c.optimizer.learning_rate = 2e-6
    c.optimizer.warmup_steps = 50
    c.model.remat_policy = "full"
    c.mesh.update(data=1, fsdp=-1, tensor=8)
    c.checkpoint.save_every = 100
    return c
