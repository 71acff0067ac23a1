r"""Scoring throughput: the batched JAX scorer against a transformers forward on the same PRM.

  python -m bench.scoring [--hidden=64 --layers=2 ...] [--sequences=256 --max_steps=24] [--dtype=float32]

Builds one random Qwen2-shaped causal LM, exports it as a PRM (hf_to_orbax -> orbax_to_hf, the
tiny tokenizer beside it), and scores the same synthetic ProcessBench-like solutions (problems and
step counts of very different lengths) with

* `BatchedScorer`: the model loaded straight from the HF directory, length-bucketed, jitted,
  sharded over every device on the `--mesh`;
* transformers: `AutoModel.from_pretrained(dir, trust_remote_code=True)`, the same rows sorted
  by length and right-padded per batch of `--hf_batch` (a fair, not naive, baseline).

Prints sequences/s and tokens/s (real tokens; compilation excluded: every figure is the best of
`--repeats` timed runs after a warm-up) and the largest reward difference between the two.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from absl import app, flags

from bench.synthetic import synthetic_solutions
from bench.timing import best_time

_HIDDEN = flags.DEFINE_integer("hidden", 64, "hidden size")
_LAYERS = flags.DEFINE_integer("layers", 2, "layers")
_HEADS = flags.DEFINE_integer("heads", 4, "attention heads")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 2, "KV heads")
_INTERMEDIATE = flags.DEFINE_integer("intermediate", 128, "MLP size")
_SEQUENCES = flags.DEFINE_integer("sequences", 128, "solutions to score")
_MAX_STEPS = flags.DEFINE_integer("max_steps", 24, "most steps per solution (uniform in 1..max)")
_MAX_STEP_WORDS = flags.DEFINE_integer("max_step_words", 30, "most words per step")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute and parameter dtype (both sides)")
_TOKENS_PER_BATCH = flags.DEFINE_integer("tokens_per_batch", 16384, "JAX: padded tokens per batch")
_MAX_ROWS = flags.DEFINE_integer("max_rows", 64, "JAX: most rows per batch")
_HF_BATCH = flags.DEFINE_integer("hf_batch", 16, "transformers: rows per batch")
_MESH = flags.DEFINE_string("mesh", "data=-1", "JAX mesh axes")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed runs (best is reported)")
_SEED = flags.DEFINE_integer("seed", 0, "data and weights seed")
_OUT = flags.DEFINE_string("out", None, "write the figures as JSON")


def main(argv: list[str]) -> None:
    del argv
    import jax
    import torch
    from transformers import AutoModel, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from prm_jax.conversion.hf_checkpoint import hf_to_orbax, orbax_to_hf
    from prm_jax.evaluation.runner import parse_mesh_shape
    from prm_jax.evaluation.scorer import BatchedScorer, BucketConfig
    from prm_jax.sharding import make_mesh
    from prm_jax.tiny_tokenizer import build_tiny_tokenizer
    from prm_jax.tokenization import build_prm_input
    from prm_jax.weights import load_model

    dtype = _DTYPE.value
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer_dir = build_tiny_tokenizer(root / "tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        torch.manual_seed(_SEED.value)
        hf_config = Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=_HIDDEN.value,
            intermediate_size=_INTERMEDIATE.value,
            num_hidden_layers=_LAYERS.value,
            num_attention_heads=_HEADS.value,
            num_key_value_heads=_KV_HEADS.value,
            max_position_embeddings=8192,
        )
        Qwen2ForCausalLM(hf_config).save_pretrained(root / "lm", safe_serialization=True)
        hf_to_orbax(root / "lm", root / "orbax", seed=_SEED.value)
        orbax_to_hf(root / "orbax", root / "prm", dtype="float32", tokenizer_dir=tokenizer_dir)

        solutions = synthetic_solutions(
            _SEQUENCES.value,
            _MAX_STEPS.value,
            np.random.default_rng(_SEED.value),
            step_words=(2, _MAX_STEP_WORDS.value),
        )
        inputs = [build_prm_input(tokenizer, p, s) for p, s in solutions]
        lengths = np.asarray([len(x.input_ids) for x in inputs])
        tokens = int(lengths.sum())

        mesh = make_mesh(parse_mesh_shape(_MESH.value))
        model = load_model(root / "prm", mesh=mesh, dtype=dtype, param_dtype=dtype)
        scorer = BatchedScorer(
            model, mesh=mesh, config=BucketConfig(tokens_per_batch=_TOKENS_PER_BATCH.value, max_rows=_MAX_ROWS.value)
        )
        jax_rewards: list[list[float]] = []

        def run_jax() -> None:
            jax_rewards[:] = scorer.score(inputs)

        jax_seconds = best_time(run_jax, _REPEATS.value)

        torch_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
        hf = AutoModel.from_pretrained(root / "prm", trust_remote_code=True, dtype=torch_dtype).eval()
        order = np.argsort(-lengths, kind="stable")
        hf_rewards: list[list[float]] = [[] for _ in inputs]

        def run_hf() -> None:
            with torch.no_grad():
                for start in range(0, len(order), _HF_BATCH.value):
                    rows = order[start : start + _HF_BATCH.value]
                    width = int(lengths[rows].max())
                    ids = torch.zeros((len(rows), width), dtype=torch.long)
                    mask = torch.zeros((len(rows), width), dtype=torch.long)
                    for r, i in enumerate(rows):
                        ids[r, : lengths[i]] = torch.tensor(inputs[i].input_ids)
                        mask[r, : lengths[i]] = 1
                    probs = hf(input_ids=ids, attention_mask=mask).logits.float().softmax(-1)[..., 1]
                    for r, i in enumerate(rows):
                        hf_rewards[i] = probs[r, inputs[i].separator_positions].tolist()

        hf_seconds = best_time(run_hf, _REPEATS.value)

    diff = max(abs(a - b) for x, y in zip(jax_rewards, hf_rewards) for a, b in zip(x, y))
    figures = {
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "dtype": dtype,
        "sequences": len(inputs),
        "tokens": tokens,
        "length_min_mean_max": [int(lengths.min()), float(lengths.mean()), int(lengths.max())],
        "jax_sequences_per_s": len(inputs) / jax_seconds,
        "jax_tokens_per_s": tokens / jax_seconds,
        "jax_compiled_shapes": len(scorer.stats.shapes),
        "jax_padding_fraction": scorer.stats.as_dict()["padding_fraction"],
        "transformers_sequences_per_s": len(inputs) / hf_seconds,
        "transformers_tokens_per_s": tokens / hf_seconds,
        "speedup": hf_seconds / jax_seconds,
        "max_abs_reward_diff": diff,
    }
    print(
        f"model: hidden={_HIDDEN.value} layers={_LAYERS.value} heads={_HEADS.value}/{_KV_HEADS.value} "
        f"intermediate={_INTERMEDIATE.value} dtype={dtype}; device {figures['device']}"
    )
    print(
        f"data: {len(inputs)} solutions, {tokens} tokens, length min/mean/max "
        f"{lengths.min()}/{lengths.mean():.0f}/{lengths.max()}"
    )
    print(
        f"jax BatchedScorer:     {figures['jax_sequences_per_s']:10.1f} seq/s {figures['jax_tokens_per_s']:12.0f} tok/s "
        f"({figures['jax_compiled_shapes']} compiled shapes, {100 * figures['jax_padding_fraction']:.1f}% padding)"
    )
    print(
        f"transformers forward:  {figures['transformers_sequences_per_s']:10.1f} seq/s "
        f"{figures['transformers_tokens_per_s']:12.0f} tok/s (batch {_HF_BATCH.value}, sorted by length)"
    )
    print(f"speedup {figures['speedup']:.2f}x; max |reward difference| {diff:.2e}")
    if _OUT.value:
        Path(_OUT.value).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    app.run(main)
