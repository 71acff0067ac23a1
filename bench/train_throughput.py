r"""Training throughput of a config: tokens/s, step time and MFU, on synthetic packed batches.

  python -m bench.train_throughput --config=configs/tiny.py [--steps=20] [--config.data.seq_len=2048 ...]

Uses the real Trainer (same jitted, sharded, donated train step as launch.train) on random token
rows packed with several segments and a supervised position every `--label_every` tokens, so the
figure reflects compute, not the input pipeline. MFU needs the device's peak FLOP/s: known GPUs
and TPUs are looked up, otherwise pass --config.train.peak_flops_per_device (e.g. a CPU's).
"""

from __future__ import annotations

import json
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from bench.synthetic import synthetic_batch
from launch.logs import configure_logging
from prm_jax.training import flops
from prm_jax.training.trainer import Trainer, _to_global

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config (configs/*.py).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after 2 warm-up steps).")
_SEGMENTS = flags.DEFINE_integer("segments_per_row", 4, "Packed examples per row.")
_LABEL_EVERY = flags.DEFINE_integer("label_every", 64, "A supervised position every N tokens.")
_OUT = flags.DEFINE_string("out", None, "Also write the figures as JSON here.")
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
    del argv
    configure_logging()
    config = _CONFIG.value
    if _SEGMENTS.value > int(config.model.max_segments_per_row):
        # The packed cuDNN kernel has a static limit: more segments would time NaN steps.
        raise app.UsageError(
            f"--segments_per_row={_SEGMENTS.value} exceeds model.max_segments_per_row={config.model.max_segments_per_row}"
        )
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(config, workdir)
        model_config = trainer.model_config
        rows, seq_len = trainer.global_rows, int(config.data.seq_len)
        params = trainer._fresh_params()
        with jax.set_mesh(trainer.mesh):
            opt_state = jax.jit(trainer.optimizer.init, out_shardings=trainer.opt_shardings)(params)
        batch = _to_global(
            synthetic_batch(rows, seq_len, model_config.vocab_size, _SEGMENTS.value, _LABEL_EVERY.value, 0),
            trainer.batch_sharding,
        )
        with jax.set_mesh(trainer.mesh):
            start = time.perf_counter()
            params, opt_state, metrics = trainer.train_step(params, opt_state, batch, np.int32(0))
            jax.block_until_ready(metrics)
            compile_s = time.perf_counter() - start
            params, opt_state, metrics = trainer.train_step(params, opt_state, batch, np.int32(0))
            jax.block_until_ready(metrics)
            start = time.perf_counter()
            for _ in range(_STEPS.value):
                params, opt_state, metrics = trainer.train_step(params, opt_state, batch, np.int32(0))
            jax.block_until_ready(metrics)
            elapsed = time.perf_counter() - start
        trainer.close()
    step_s = elapsed / _STEPS.value
    tokens_per_s = rows * seq_len / step_s
    peak = flops.peak_flops_per_device(override=float(config.train.peak_flops_per_device))
    flops_per_token = flops.training_flops_per_token(model_config, seq_len, config.objective)
    result = {
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "parameters": model_config.num_parameters(),
        "objective": config.objective,
        "dtype": model_config.dtype,
        "remat_policy": model_config.remat_policy,
        "global_batch_rows": rows,
        "seq_len": seq_len,
        "grad_accum_steps": trainer.grad_accum_steps,
        "first_step_s (compile)": round(compile_s, 2),
        "step_s": round(step_s, 4),
        "tokens_per_s": round(tokens_per_s, 1),
        "model_tflops_per_s": round(tokens_per_s * flops_per_token / 1e12, 4),
        "mfu": None if peak is None else round(tokens_per_s * flops_per_token / (peak * jax.device_count()), 4),
    }
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
