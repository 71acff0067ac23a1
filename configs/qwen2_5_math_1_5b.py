"""PRM from Qwen2.5-Math-1.5B-Instruct (1.5B): one 8-GPU node or a v5p-16 slice.

Deviceless plan (`launch.plan`): 24.8 GiB per device on 8 x H100 (58% headroom), 4 rows per device
per microbatch (4 microbatches on 8 GPUs).

  python -m launch.convert --direction=hf_to_orbax --hf_dir=Qwen2.5-Math-1.5B-Instruct --orbax_dir=BASE
  python -m launch.train --config=configs/qwen2_5_math_1_5b.py --workdir=W \
      --config.model.init_from=BASE --config.data.train_file=prm_train.jsonl \
      --config.data.eval_file=prm_eval.jsonl --config.data.tokenizer_dir=Qwen2.5-Math-1.5B-Instruct
  python -m launch.plan --config=configs/qwen2_5_math_1_5b.py --target=h100x8   # memory and step time first, no GPU needed
"""

from prm_jax.training.config import default_config
from prm_jax.training.presets import QWEN2_5_MATH_1_5B


def get_config():
    c = default_config()
    # The base model's real architecture: `launch.plan` compiles it without a checkpoint, and an
    # init_from checkpoint of other shapes is refused (`prm_jax.training.presets`).
    c.model.arch_name = "Qwen2.5-Math-1.5B-Instruct"
    c.model.arch.update(QWEN2_5_MATH_1_5B)
    c.data.seq_len = 4096
    c.train.global_batch_rows = 128  # 128 x 4096 packed tokens (~0.5M) per step
    c.train.microbatch_rows_per_shard = 4  # grad_accum_steps = 128 / (4 x devices)
    c.train.num_steps = 2000
    c.train.eval_every = 250
    c.optimizer.learning_rate = 1e-5
    c.optimizer.warmup_steps = 100
    c.model.remat_policy = "dots_no_batch"
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.checkpoint.save_every = 250
    return c
