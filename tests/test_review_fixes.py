"""Regression tests for defects found in review: optimizer-state sharding, batch divisibility,
sampler filtering semantics and batching independence, stop strings in a row's last chunk,
weight-decay masking, partial batch sharding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tiny_assets import tiny_config

from prm_jax.generation.jax_sampler import _sample_tokens
from prm_jax.sharding import logical_to_partition_spec, make_mesh
from prm_jax.training.optimizer import _decay_mask
from prm_jax.training.trainer import Trainer


def test_optimizer_moments_are_sharded_like_their_parameters(tmp_path) -> None:
    config = tiny_config(**{"mesh.fsdp": 2, "mesh.tensor": 2})
    trainer = Trainer(config, tmp_path)
    try:
        embed_sharding = trainer.param_shardings["model"]["embed_tokens"]["embedding"]
        assert not embed_sharding.is_fully_replicated
        adam = [
            s for s in jax.tree.leaves(trainer.opt_shardings, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")
        ]
        assert len(adam) == 1
        params = jax.tree.leaves(trainer.param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
        for moment in (adam[0].mu, adam[0].nu):
            assert jax.tree.leaves(moment, is_leaf=lambda x: isinstance(x, NamedSharding)) == params
        assert adam[0].count.is_fully_replicated
    finally:
        trainer.close()


def test_microbatch_must_divide_over_data_axes(tmp_path) -> None:
    config = tiny_config(**{"train.global_batch_rows": 6, "mesh.fsdp": 4})
    with pytest.raises(ValueError, match=r"a microbatch of 6 rows .* does not divide over data x fsdp = 4"):
        Trainer(config, tmp_path)


def test_batch_axis_keeps_the_dividing_prefix_of_mesh_axes() -> None:
    mesh = make_mesh({"data": 2, "fsdp": 2})
    assert logical_to_partition_spec(("activation_batch",), (2,), mesh) == P("data")
    assert logical_to_partition_spec(("activation_batch",), (4,), mesh) == P(("data", "fsdp"))
    assert logical_to_partition_spec(("activation_batch",), (3,), mesh) == P(None)


def _sample(logits, temperature, top_p, top_k, seeds, filtering):
    n = len(seeds)
    return np.asarray(
        _sample_tokens(
            jnp.asarray(logits, jnp.float32),
            jnp.full(n, temperature, jnp.float32),
            jnp.asarray(top_p, jnp.float32),
            jnp.asarray(top_k, jnp.int32),
            jnp.asarray(seeds, jnp.uint32),
            jnp.zeros(n, jnp.int32),
            filtering,
        )
    )


def test_top_p_applies_to_the_top_k_renormalised_distribution() -> None:
    probs = np.array([0.3, 0.2, 0.15, 0.15, 0.1, 0.1])
    logits = np.log(np.tile(probs, (64, 1)))
    # top-2 renormalised: 0.6, 0.4 -> top_p=0.5 keeps only token 0 (full-vocab mass would keep both).
    tokens = _sample(logits, 1.0, [0.5] * 64, [2] * 64, list(range(64)), True)
    assert set(tokens.tolist()) == {0}
    tokens = _sample(logits, 1.0, [1.0] * 64, [2] * 64, list(range(64)), True)
    assert set(tokens.tolist()) == {0, 1}


def test_unfiltered_rows_sample_the_same_whatever_their_batch_mates_ask() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(20, 50))
    plain = _sample(logits, 1.0, [1.0] * 20, [0] * 20, list(range(20)), False)
    mixed_top_p = [1.0] * 19 + [0.3]  # one row filters: the group compiles the filtering path
    mixed = _sample(logits, 1.0, mixed_top_p, [0] * 20, list(range(20)), True)
    np.testing.assert_array_equal(plain[:19], mixed[:19])


def test_weight_decay_skips_all_biases_and_norms() -> None:
    params = {
        "model": {
            "layers": {
                "0": {
                    "self_attn": {"q_kernel": np.zeros((4, 2, 2)), "q_bias": np.zeros((2, 2))},
                    "input_layernorm": {"weight": np.zeros(4)},
                }
            },
            "norm": {"weight": np.zeros(4)},
        },
        "score": {"hidden_kernel": np.zeros((4, 4)), "hidden_bias": np.zeros(4)},
    }
    mask = _decay_mask(params)
    assert mask["model"]["layers"]["0"]["self_attn"] == {"q_kernel": True, "q_bias": False}
    assert mask["model"]["layers"]["0"]["input_layernorm"]["weight"] is False
    assert mask["model"]["norm"]["weight"] is False
    assert mask["score"] == {"hidden_kernel": True, "hidden_bias": False}


def test_resume_accepts_runtime_changes_but_not_architecture(tmp_path) -> None:
    from data_pipeline.synthetic import prepare_synthetic_run
    from prm_jax.training.run import train_from_config
    from prm_jax.training.run_record import ConfigChangeError
    from prm_jax.training.trainer import TrainingError

    base = {"train.num_steps": 2, "checkpoint.save_every": 2, "train.eval_every": 1000, "data.eval_file": ""}
    config = prepare_synthetic_run(tiny_config(**base), tmp_path)
    config.data.eval_file = ""
    train_from_config(config, tmp_path)
    resumed = config.copy_and_resolve_references()
    resumed.train.num_steps = 3
    resumed.train.allow_config_change = True  # a longer schedule is a recorded change
    resumed.model.remat_policy = "full"  # the usual fix after an OOM
    assert train_from_config(resumed, tmp_path).final_step == 3
    wider = resumed.copy_and_resolve_references()
    wider.train.num_steps = 4
    wider.model.arch.intermediate_size = 256
    with pytest.raises(ConfigChangeError, match="model cannot change on resume"):
        train_from_config(wider, tmp_path)
    # Past the config record (e.g. a checkpoint from before it existed), the Trainer still refuses.
    (tmp_path / "config.json").unlink()
    with pytest.raises(TrainingError, match="written for a different model"):
        train_from_config(wider, tmp_path)
