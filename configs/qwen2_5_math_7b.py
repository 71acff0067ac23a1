"""PRM from Qwen2.5-Math-7B-Instruct (the Qwen2.5-Math-PRM-7B recipe): 8-64 GPUs or a v5p-64.

  python -m launch.convert --direction=hf_to_orbax --hf_dir=Qwen2.5-Math-7B-Instruct --orbax_dir=BASE
  python -m launch.train --config=configs/qwen2_5_math_7b.py --workdir=W \
      --config.model.init_from=BASE --config.data.train_file=prm_train.jsonl \
      --config.data.eval_file=prm_eval.jsonl --config.data.tokenizer_dir=Qwen2.5-Math-7B-Instruct
"""

from prm_jax.training.config import default_config


def get_config():
    c = default_config()
    # Qwen2.5-Math-7B-Instruct has max_position_embeddings 4096: a packed row (and so a single
    # example) may not be longer, or positions past the trained context would be trained on.
    c.data.seq_len = 4096
    c.train.global_batch_rows = 256  # 256 x 4096 packed tokens (~1M) per step
    c.train.grad_accum_steps = 8  # 32 rows per microbatch: 4 per device on 8 GPUs
    c.train.num_steps = 2000
    c.train.eval_every = 250
    c.optimizer.learning_rate = 5e-6
    c.optimizer.warmup_steps = 100
    c.model.remat_policy = "dots_no_batch"
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.checkpoint.save_every = 250
    return c
