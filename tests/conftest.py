"""Test setup: several CPU devices for mesh tests, fp32 matmuls for parity."""

import jax

# Must run before any JAX backend is initialised: 4 CPU devices let tests build real meshes.
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_default_matmul_precision", "highest")
