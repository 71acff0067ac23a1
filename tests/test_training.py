"""Training: learning, exact packing and accumulation, NaN stop, bad input, init from a base."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx.traversals import flatten_mapping
from hf_models import random_causal_lm, save_hf
from test_checkpoint import assert_one_layer_per_chunk
from tiny_assets import TINY_VOCAB_SIZE, tiny_config
from transformers import AutoTokenizer

from data_pipeline.synthetic import prepare_synthetic_run
from prm_jax.checkpoint import restore_params
from prm_jax.conversion.hf_checkpoint import hf_to_orbax
from prm_jax.data.pipeline import PipelineConfig, build_eval_batches, load_prm_examples
from prm_jax.data.records import DataError
from prm_jax.data.tokenize import TokenizeConfig
from prm_jax.models.factory import abstract_model, create_model, params_of
from prm_jax.training.run import train_from_config
from prm_jax.training.train_step import _loss_sums, make_train_step
from prm_jax.training.trainer import Trainer, TrainingError, training_model_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny config trained briefly, in process (the CLI path is covered by the resume tests)."""
    workdir = tmp_path_factory.mktemp("tiny")
    config = prepare_synthetic_run(
        tiny_config(**{"train.num_steps": 120, "train.eval_every": 60, "checkpoint.save_every": 60}), workdir
    )
    result = train_from_config(config, workdir)
    return workdir, config, result


def test_tiny_config_learns(tiny_run) -> None:
    workdir, _, result = tiny_run
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if "eval_f1" in line]
    assert [line["step"] for line in evals] == [60, 120]
    # Chance here (always predicting "no error") scores F1 = 0; observed 1.0 by step 60-100.
    assert result.last_eval["eval_f1"] >= 0.8, result.last_eval
    train_lines = [line for line in lines if "loss" in line]
    assert train_lines[-1]["loss"] < 0.5 * train_lines[0]["loss"]
    for key in ("lr", "grad_norm", "tokens_per_s", "param_norm", "batch_fingerprint"):
        assert key in train_lines[-1]
    assert (workdir / "tensorboard").is_dir() and any((workdir / "tensorboard").iterdir())
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [60, 120]


def _examples(config):
    tokenizer = AutoTokenizer.from_pretrained(config.data.tokenizer_dir)
    examples, _ = load_prm_examples(config.data.eval_file, tokenizer, TokenizeConfig(max_length=128))
    return examples[:24]


def _batch_loss(graphdef, params, batches) -> float:
    loss = weight = 0.0
    for batch in batches:
        sums = _loss_sums(graphdef, "prm", params, {k: jnp.asarray(v) for k, v in batch.items()})[0]
        loss += float(sums["loss_sum"])
        weight += float(sums["weight"])
    return loss / weight


def test_packed_loss_equals_unpacked(tiny_run) -> None:
    _, config, _ = tiny_run
    examples = _examples(config)
    model_config = training_model_config(config)
    graphdef = nnx.graphdef(abstract_model(model_config))
    params = params_of(create_model(model_config, seed=3))
    packed = build_eval_batches(examples, PipelineConfig(seq_len=512, rows_per_batch=4, shuffle=False, num_epochs=1))
    unpacked = build_eval_batches(
        examples, PipelineConfig(seq_len=128, rows_per_batch=8, shuffle=False, num_epochs=1, packing=False)
    )
    assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in packed) == len(examples)
    assert max(int(b["segment_ids"].max()) for b in packed) > 1  # really packed
    a, b = _batch_loss(graphdef, params, packed), _batch_loss(graphdef, params, unpacked)
    assert abs(a - b) <= 1e-5, (a, b)


def test_gradient_accumulation_equals_full_batch(tiny_run) -> None:
    _, config, _ = tiny_run
    model_config = training_model_config(config)
    graphdef = nnx.graphdef(abstract_model(model_config))
    batch = build_eval_batches(
        _examples(config), PipelineConfig(seq_len=256, rows_per_batch=4, shuffle=False, num_epochs=1)
    )[0]
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    # SGD: the update is linear in the gradient, so this compares gradients. (Adam's first step is
    # ~lr * sign(g) and would amplify float summation-order noise in near-zero gradients.)
    import optax

    optimizer = optax.sgd(1.0)
    results = []
    for accum in (1, 2, 4):
        params = params_of(create_model(model_config, seed=4))
        step = jax.jit(make_train_step(graphdef, optimizer, objective="prm", grad_accum_steps=accum))
        new_params, _, metrics = step(params, optimizer.init(params), batch)
        results.append((flatten_mapping(new_params), float(metrics["loss"]), float(metrics["grad_norm"])))
    base_params, base_loss, base_norm = results[0]
    for params, loss, norm in results[1:]:
        assert loss == pytest.approx(base_loss, rel=1e-6) and norm == pytest.approx(base_norm, rel=1e-5)
        for path, value in params.items():
            np.testing.assert_allclose(np.asarray(value), np.asarray(base_params[path]), rtol=1e-5, atol=1e-7)


def _two_step_run(base) -> dict:
    """Overrides for a 2-step run, one checkpoint at step 2, on the tiny run's data."""
    return {
        "train.num_steps": 2,
        "checkpoint.save_every": 2,
        "train.eval_every": 1000,
        "data.train_file": base.data.train_file,
        "data.eval_file": "",
        "data.tokenizer_dir": base.data.tokenizer_dir,
        "data.synthetic": "",
    }


def test_resuming_a_run_written_in_parameter_layout_1_is_refused_with_the_way_forward(tiny_run, tmp_path) -> None:
    """Its optimizer state holds the old parameter names: the run refuses to resume (nothing written)
    and names the init_from that starts a new run from it."""
    overrides = _two_step_run(tiny_run[1])
    train_from_config(tiny_config(**overrides), tmp_path)
    assert_one_layer_per_chunk(tmp_path / "checkpoints" / "2")  # what the streaming export reads
    metadata_file = tmp_path / "checkpoints" / "2" / "model_config" / "metadata"
    metadata = json.loads(metadata_file.read_text())
    metadata_file.write_text(json.dumps({**metadata, "layout_version": 1}))
    with pytest.raises(TrainingError, match=r"parameter layout 1 .*--config\.model\.init_from=.*checkpoints/2"):
        train_from_config(
            tiny_config(**{**overrides, "train.num_steps": 4, "train.allow_config_change": True}), tmp_path
        )
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]


def test_non_finite_update_stops_and_keeps_last_good_checkpoint(tiny_run, tmp_path) -> None:
    overrides = {**_two_step_run(tiny_run[1]), "optimizer.warmup_steps": 0, "optimizer.schedule": "constant"}
    train_from_config(tiny_config(**overrides), tmp_path)
    good = flatten_mapping(restore_params(tmp_path / "checkpoints" / "2", as_numpy=True))
    # Same run, resumed with an absurd learning rate: the update overflows to inf at step 3.
    with pytest.raises(TrainingError, match=r"non-finite training state at step 3 .*last good checkpoint is step 2"):
        train_from_config(
            tiny_config(
                **{
                    **overrides,
                    "train.num_steps": 4,
                    "optimizer.learning_rate": 1e39,
                    "train.allow_config_change": True,
                }
            ),
            tmp_path,
        )
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2]
    after = flatten_mapping(restore_params(tmp_path / "checkpoints" / "2", as_numpy=True))
    for path, value in good.items():
        assert np.isfinite(after[path]).all()
        np.testing.assert_array_equal(after[path], value)


def test_malformed_training_file_names_file_and_line(tiny_run, tmp_path) -> None:
    _, base, _ = tiny_run
    bad = tmp_path / "train.jsonl"
    good_line = Path(base.data.train_file).read_text().splitlines()[0]
    bad.write_text(
        good_line + "\n" + json.dumps({"id": "b", "problem": "p", "steps": ["a", "b"], "labels": [1]}) + "\n"
    )
    config = tiny_config(
        **{"data.train_file": str(bad), "data.tokenizer_dir": base.data.tokenizer_dir, "data.synthetic": ""}
    )
    with pytest.raises(DataError, match=r"train.jsonl:2: field 'labels'"):
        train_from_config(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_init_from_converted_base_imports_backbone_and_fresh_head(tiny_run, tmp_path) -> None:
    _, base, _ = tiny_run
    hf_dir = save_hf(random_causal_lm(vocab_size=TINY_VOCAB_SIZE, seed=9), tmp_path / "hf")
    hf_to_orbax(hf_dir, tmp_path / "base", seed=0)
    config = tiny_config(**{"model.init_from": str(tmp_path / "base"), "seed": 123})
    model_config = training_model_config(config)
    assert model_config.hidden_size == 32 and not model_config.with_lm_head and model_config.with_prm_head
    trainer = Trainer(config, tmp_path / "run")
    try:
        params = {tuple(map(str, k)): v for k, v in flatten_mapping(trainer._fresh_params()).items()}
    finally:
        trainer.close()
    source = flatten_mapping(restore_params(tmp_path / "base", as_numpy=True))
    source = {tuple(map(str, k)): v for k, v in source.items()}
    assert ("lm_head", "kernel") not in params  # the PRM objective does not carry the LM head
    for path, value in params.items():
        np.testing.assert_array_equal(np.asarray(value), source[path], err_msg=".".join(path))


def test_causal_lm_objective_trains_on_the_same_loop(tiny_run, tmp_path) -> None:
    """objective=lm (the demo policy's SFT): loss falls, the checkpoint carries the LM head; the
    trainer's steps take the chunked LM loss."""
    _, base, _ = tiny_run
    sft = tmp_path / "sft.jsonl"
    with sft.open("w") as f:
        for line in Path(base.data.train_file).read_text().splitlines()[:400]:
            record = json.loads(line)
            f.write(
                json.dumps(
                    {"id": record["id"], "prompt": record["problem"], "completion": "\n\n".join(record["steps"])}
                )
                + "\n"
            )
    config = tiny_config(
        **{
            "objective": "lm",
            "data.train_file": str(sft),
            "data.eval_file": str(sft),
            "data.synthetic": "",
            "data.tokenizer_dir": base.data.tokenizer_dir,
            "train.num_steps": 40,
            "train.eval_every": 40,
            "checkpoint.save_every": 40,
            "optimizer.learning_rate": 3e-3,
            "train.lm_loss_chunk_tokens": 96,  # 256-token rows: 3 chunks, the last one padded
        }
    )
    result = train_from_config(config, tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if "loss" in line]
    assert losses[-1] < 0.6 * losses[0], losses
    assert "eval_f1" not in result.last_eval and result.last_eval["eval_loss"] < losses[0]
    params = flatten_mapping(restore_params(tmp_path / "run" / "checkpoints" / "40", as_numpy=True))
    assert ("lm_head", "kernel") in params and not any(p[0] == "score" for p in params)


def test_mse_loss_regresses_p_correct_on_soft_labels() -> None:
    """loss=mse is the paper's soft-label training: (softmax(logits)[1] - p)^2 at separators."""
    from prm_jax.training.losses import prm_loss_sums

    logits = jnp.array([[[0.0, 0.0], [0.0, np.log(3.0)], [5.0, -5.0]]])  # p(correct) = 0.5, 0.75, ~0
    labels = jnp.array([[0.25, 0.5, 0.0]])
    mask = jnp.array([[1.0, 1.0, 0.0]])  # the third position is not a separator
    mse = prm_loss_sums(logits, labels, mask, "mse")
    assert float(mse["loss_sum"]) == pytest.approx((0.5 - 0.25) ** 2 + (0.75 - 0.5) ** 2, rel=1e-6)
    ce = prm_loss_sums(logits, labels, mask)  # the default stays cross-entropy
    expected_ce = -(0.25 * np.log(0.5) + 0.75 * np.log(0.5)) - (0.5 * np.log(0.75) + 0.5 * np.log(0.25))
    assert float(ce["loss_sum"]) == pytest.approx(expected_ce, rel=1e-6)
    with pytest.raises(ValueError, match="loss="):
        prm_loss_sums(logits, labels, mask, "hinge")


def test_train_step_uses_the_configured_prm_loss() -> None:
    from prm_jax.training.config import default_config
    from prm_jax.training.optimizer import OptimizerConfig, build_optimizer

    assert default_config().train.loss == "cross_entropy"
    config = training_model_config(tiny_config())
    model = create_model(config, seed=0)
    graphdef = nnx.graphdef(model)
    params = params_of(model)
    settings = {**default_config().optimizer.to_dict(), "learning_rate": 0.0, "warmup_steps": 0}
    optimizer = build_optimizer(OptimizerConfig(**settings, total_steps=1))
    rows, length = 2, 16
    batch = {
        "input_ids": jnp.arange(rows * length, dtype=jnp.int32).reshape(rows, length) % 50,
        "segment_ids": jnp.ones((rows, length), jnp.int32),
        "positions": jnp.tile(jnp.arange(length, dtype=jnp.int32), (rows, 1)),
        "labels": jnp.zeros((rows, length), jnp.float32).at[:, 5].set(0.25).at[:, 11].set(1.0),
        "loss_mask": jnp.zeros((rows, length), jnp.float32).at[:, 5].set(1.0).at[:, 11].set(1.0),
    }
    losses = {}
    for loss in ("cross_entropy", "mse"):
        step = make_train_step(graphdef, optimizer, objective="prm", loss=loss)
        _, _, metrics = step(params, optimizer.init(params), batch)
        losses[loss] = float(metrics["loss"])
    prm = _loss_sums(graphdef, "prm", params, batch)[2]
    p = jax.nn.softmax(prm.step_logits(prm(batch["input_ids"], batch["segment_ids"], batch["positions"])), -1)[..., 1]
    expected = float(jnp.sum(jnp.square(p - batch["labels"]) * batch["loss_mask"]) / jnp.sum(batch["loss_mask"]))
    assert losses["mse"] == pytest.approx(expected, rel=1e-4)
    assert losses["mse"] != pytest.approx(losses["cross_entropy"], rel=1e-2)
    with pytest.raises(ValueError, match="loss="):
        make_train_step(graphdef, optimizer, objective="lm", loss="mse")


def test_trainer_trains_with_the_configured_prm_loss(tiny_run, tmp_path) -> None:
    """`--config.train.loss=mse` reaches the Trainer's jitted step: the first logged loss of a fresh
    2-way head is ~(0.5 - y)^2 <= 0.25 under MSE and ~ln 2 under cross-entropy."""
    _, base, _ = tiny_run
    first = {}
    for loss in ("cross_entropy", "mse"):
        config = tiny_config(
            **{
                "data.train_file": base.data.train_file,
                "data.eval_file": "",
                "data.synthetic": "",
                "data.tokenizer_dir": base.data.tokenizer_dir,
                "train.num_steps": 1,
                "train.log_every": 1,
                "checkpoint.save_every": 1,
                "train.loss": loss,
                "train.progress": False,
            }
        )
        train_from_config(config, tmp_path / loss)
        lines = [json.loads(line) for line in (tmp_path / loss / "metrics.jsonl").read_text().splitlines()]
        first[loss] = next(line["loss"] for line in lines if "loss" in line)
    assert first["mse"] < 0.3 < 0.5 < first["cross_entropy"], first


def test_seq_len_beyond_the_models_context_is_refused(tmp_path) -> None:
    from tiny_assets import build_tiny_tokenizer

    config = tiny_config(
        **{
            "data.seq_len": 256,
            "model.arch.max_position_embeddings": 128,
            "data.synthetic": "",
            "data.train_file": str(tmp_path / "unused.jsonl"),
            "data.tokenizer_dir": str(build_tiny_tokenizer(tmp_path / "tok")),
        }
    )
    with pytest.raises(ValueError, match="seq_len=256 exceeds the model's max_position_embeddings=128"):
        train_from_config(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("preset", ["qwen2_5_math_7b.py", "qwen2_5_math_72b.py", "qwen2_5_math_1_5b.py"])
def test_presets_fit_the_qwen2_5_math_context(preset) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(preset[:-3], CONFIGS / preset)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # Qwen2.5-Math-{1.5B,7B,72B}-Instruct: max_position_embeddings 4096 (their config.json).
    assert module.get_config().data.seq_len <= 4096


# ---------------------------------------------------------------------------- chunked LM loss

QWEN_VOCAB = 151_936  # the real vocabulary size: what makes the [B, T, V] logits big


def _lm_config(tied: bool):
    from prm_jax.models.config import ModelConfig

    return ModelConfig(
        vocab_size=QWEN_VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        tie_word_embeddings=tied,
        with_prm_head=False,
    )


def _lm_batch(rows: int, length: int, seed: int = 0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    segments = np.ones((rows, length), np.int32)
    segments[0, length // 2 :] = 2  # packed
    segments[-1, length - 5 :] = 0  # padding
    positions = np.concatenate([np.arange(length // 2), np.arange(length - length // 2)])
    return {
        "input_ids": jnp.asarray(rng.integers(0, QWEN_VOCAB, (rows, length)), jnp.int32),
        "segment_ids": jnp.asarray(segments),
        "positions": jnp.asarray(np.tile(positions, (rows, 1)), jnp.int32),
        "targets": jnp.asarray(rng.integers(0, QWEN_VOCAB, (rows, length)), jnp.int32),
        "loss_mask": jnp.asarray((rng.random((rows, length)) < 0.7) * (segments > 0), jnp.float32),
    }


@pytest.mark.parametrize("tied", [False, True], ids=["lm_head", "tied"])
def test_chunked_lm_loss_equals_unchunked(tied: bool) -> None:
    """The chunked LM loss (37 positions in chunks of 8: the last one padded) gives the unchunked
    sums and gradients, with the real 151,936-row vocabulary, through the tied embedding or lm_head."""
    config = _lm_config(tied)
    model = create_model(config, seed=1)
    graphdef, params = nnx.graphdef(model), params_of(model)
    batch = _lm_batch(2, 37)
    # Half the targets are the model's own argmax, so `correct` counts something.
    predicted = jnp.argmax(model.lm_logits(model(batch["input_ids"], batch["segment_ids"], batch["positions"])), -1)
    take = np.random.default_rng(1).random(batch["targets"].shape) < 0.5
    batch["targets"] = jnp.where(take, predicted, batch["targets"])

    def loss(p, chunk):
        sums = _loss_sums(graphdef, "lm", p, batch, lm_loss_chunk_tokens=chunk)[0]
        return sums["loss_sum"] / sums["weight"], sums

    value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (whole, sums), grads = value_and_grad(params, 0)
    (chunked, chunk_sums), chunk_grads = value_and_grad(params, 8)
    assert float(sums["correct"]) > 10 and float(sums["weight"]) > 30
    assert float(chunk_sums["weight"]) == float(sums["weight"])
    assert float(chunk_sums["correct"]) == float(sums["correct"])
    assert abs(float(chunked) - float(whole)) <= 1e-5 * abs(float(whole))
    assert abs(float(chunk_sums["loss_sum"]) - float(sums["loss_sum"])) <= 1e-5 * abs(float(sums["loss_sum"]))
    flat, chunk_flat = flatten_mapping(grads), flatten_mapping(chunk_grads)
    assert flat.keys() == chunk_flat.keys()
    for path, value in flat.items():
        np.testing.assert_allclose(
            np.asarray(chunk_flat[path]), np.asarray(value), rtol=0, atol=1e-5, err_msg=str(path)
        )


def test_chunked_lm_loss_compiles_to_a_fraction_of_the_memory() -> None:
    """XLA's temporary memory of the whole LM train step: chunking 256 positions by 32 keeps one
    chunk's logits (and their gradient) alive instead of the whole batch's."""
    import optax

    config = _lm_config(tied=False)
    model = create_model(config, seed=1)
    graphdef, params = nnx.graphdef(model), params_of(model)
    optimizer = optax.sgd(1e-3)
    batch = _lm_batch(2, 256)
    temp = {}
    for chunk in (0, 32):
        step = jax.jit(make_train_step(graphdef, optimizer, objective="lm", lm_loss_chunk_tokens=chunk))
        compiled = step.lower(params, optimizer.init(params), batch).compile()
        temp[chunk] = compiled.memory_analysis().temp_size_in_bytes
    logits_bytes = 2 * 256 * QWEN_VOCAB * 4
    print(
        f"LM train step temp bytes, 2 x 256 tokens, vocab {QWEN_VOCAB}: unchunked {temp[0] / 2**20:.1f} MiB, "
        f"chunks of 32 {temp[32] / 2**20:.1f} MiB (ratio {temp[0] / temp[32]:.1f}; one fp32 logits copy "
        f"{logits_bytes / 2**20:.1f} MiB)"
    )
    assert temp[0] >= 2 * logits_bytes  # the unchunked step holds whole-batch logits (and their gradient)
    assert temp[32] * 4 <= temp[0]
    assert temp[32] < logits_bytes  # never one whole-batch logits copy
