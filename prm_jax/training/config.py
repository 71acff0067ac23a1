"""The training config schema with defaults; `configs/*.py` start from `default_config()`.

Every field is overridable on the command line: `--config.optimizer.learning_rate=5e-6`.
"""

from __future__ import annotations

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.objective = "prm"  # prm: step head + cross-entropy at separators; lm: causal-LM (SFT)
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.init_from = ""  # Orbax model checkpoint (launch.convert output or a training step dir)
    c.model.dtype = "bfloat16"  # compute dtype
    c.model.param_dtype = "float32"  # master weights and optimizer state
    c.model.remat_policy = "dots_no_batch"  # none | full | dots | dots_no_batch
    c.model.attention_impl = "auto"  # auto (= XLA in jax 0.10) | xla | cudnn
    # Architecture for a model trained from scratch (ignored with init_from).
    c.model.arch = ml_collections.ConfigDict(
        dict(
            vocab_size=404, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
            rms_norm_eps=1e-6, max_position_embeddings=4096, attention_bias=True,
            tie_word_embeddings=False,
        )
    )

    c.data = ml_collections.ConfigDict()
    c.data.train_file = ""  # JSONL {id, problem, steps, labels} (prm) or {id, prompt, completion} (lm)
    c.data.eval_file = ""  # held-out file of the same format ("" = no eval)
    c.data.tokenizer_dir = ""
    c.data.seq_len = 4096  # packed row length
    c.data.packing = True
    c.data.soft_labels = False
    c.data.drop_after_first_error = True
    c.data.negative_threshold = 0.0  # negative = label <= this; 0.0: the first label 0 (the paper's rule)
    c.data.overlong = "truncate"  # truncate (at a step boundary) | drop
    c.data.separator = "<extra_0>"
    c.data.shuffle = True
    c.data.synthetic = ""  # "arithmetic": generate a small learnable labelled set into WORKDIR/data

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 1000
    c.train.global_batch_rows = 128  # packed sequences per optimizer step, over all processes
    c.train.grad_accum_steps = 1
    c.train.log_every = 10
    c.train.progress = True  # a progress bar on the terminal (process 0)
    c.train.eval_every = 200
    # PRM loss at the separators: cross_entropy against [1 - p, p] (hard labels, the paper's final
    # recipe) or mse between p(correct) and the label (how the paper trained its soft-label ablation).
    c.train.loss = "cross_entropy"
    c.train.peak_flops_per_device = 0.0  # 0 = look up by device kind (unknown on CPU: no MFU)

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 5e-6
    c.optimizer.end_learning_rate_ratio = 0.1
    c.optimizer.warmup_steps = 50
    c.optimizer.schedule = "cosine"
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip_norm = 1.0

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.save_every = 200
    c.checkpoint.max_to_keep = 3
    c.checkpoint.async_save = True

    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))  # -1 = remaining devices
    return c
