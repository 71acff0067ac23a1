"""Tiny PRM trained from scratch on CPU in about a minute, on a generated learnable set."""

from prm_jax.training.config import default_config


def get_config():
    c = default_config()
    c.data.synthetic = "arithmetic"
    c.data.seq_len = 256
    c.model.dtype = "float32"
    c.model.remat_policy = "none"
    c.train.num_steps = 300
    c.train.global_batch_rows = 8
    c.train.log_every = 10
    c.train.eval_every = 100
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 20
    c.optimizer.b2 = 0.99
    c.optimizer.weight_decay = 0.0
    c.checkpoint.save_every = 100
    c.checkpoint.max_to_keep = 2
    return c
