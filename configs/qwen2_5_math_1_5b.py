"""PRM from Qwen2.5-Math-1.5B-Instruct (1.5B): one 8-GPU node or a v5p-16 slice.

  python -m launch.convert --direction=hf_to_orbax --hf_dir=Qwen2.5-Math-1.5B-Instruct --orbax_dir=BASE
  python -m launch.train --config=configs/qwen2_5_math_1_5b.py --workdir=W \
      --config.model.init_from=BASE --config.data.train_file=prm_train.jsonl \
      --config.data.eval_file=prm_eval.jsonl --config.data.tokenizer_dir=Qwen2.5-Math-1.5B-Instruct
"""

from prm_jax.training.config import default_config


def get_config():
    c = default_config()
    c.data.seq_len = 4096
    c.train.global_batch_rows = 128  # 128 x 4096 packed tokens (~0.5M) per step
    c.train.grad_accum_steps = 2
    c.train.num_steps = 2000
    c.train.eval_every = 250
    c.optimizer.learning_rate = 1e-5
    c.optimizer.warmup_steps = 100
    c.model.remat_policy = "dots_no_batch"
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.checkpoint.save_every = 250
    return c
