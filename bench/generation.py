r"""Generation throughput: the JAX sampler against transformers `generate` on the same weights.

  python -m bench.generation [--hidden=64 --layers=2 ...] [--batch=8 --prompt_len=128 --new_tokens=64]

Prints, for one random Qwen2-shaped model (defaults: configs/tiny.py's architecture):
* prefill tokens/s (a batch of prompts through the model once),
* decode tokens/s (greedy generation of --new_tokens per row, prefill time subtracted),
* k rollouts of one prefix (--rollouts, temperature 1) with and without prefix sharing.
Every figure is the best of --repeats timed runs after a warm-up (compilation excluded).
"""

from __future__ import annotations

import json

import numpy as np
from absl import app, flags

from bench.timing import best_time
from prm_jax.tiny_tokenizer import TINY_VOCAB_SIZE

_HIDDEN = flags.DEFINE_integer("hidden", 64, "hidden size")
_LAYERS = flags.DEFINE_integer("layers", 2, "layers")
_HEADS = flags.DEFINE_integer("heads", 4, "attention heads")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 2, "KV heads")
_INTERMEDIATE = flags.DEFINE_integer("intermediate", 128, "MLP size")
_VOCAB = flags.DEFINE_integer("vocab", TINY_VOCAB_SIZE, "vocabulary")
_BATCH = flags.DEFINE_integer("batch", 8, "prompts per batch")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 128, "prompt tokens")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "generated tokens per row")
_ROLLOUTS = flags.DEFINE_integer("rollouts", 8, "samples of one prefix")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed runs (best is reported)")
_OUT = flags.DEFINE_string("out", None, "write the figures as JSON")


def main(argv: list[str]) -> None:
    del argv
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from prm_jax.conversion.hf_mapping import params_from_hf
    from prm_jax.generation.jax_sampler import JaxSampler, SamplerConfig, _prefill
    from prm_jax.generation.types import SamplingParams
    from prm_jax.models.config import ModelConfig
    from prm_jax.models.factory import abstract_model

    torch.manual_seed(0)
    hf_config = Qwen2Config(
        vocab_size=_VOCAB.value,
        hidden_size=_HIDDEN.value,
        intermediate_size=_INTERMEDIATE.value,
        num_hidden_layers=_LAYERS.value,
        num_attention_heads=_HEADS.value,
        num_key_value_heads=_KV_HEADS.value,
        max_position_embeddings=_PROMPT_LEN.value + _NEW_TOKENS.value + 64,
    )
    hf = Qwen2ForCausalLM(hf_config).eval()
    config = ModelConfig.from_hf_dict(hf_config.to_dict(), with_prm_head=False)
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    params = jax.tree.map(jnp.asarray, params_from_hf(config, state.__getitem__))
    model = nnx.merge(nnx.graphdef(abstract_model(config)), params)

    class Tok:  # ids in, ids out: the benchmark measures the model, not the tokenizer
        eos_token_id = None

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    sampler = JaxSampler(
        model, Tok(), config=SamplerConfig(max_batch_rows=max(_BATCH.value, _ROLLOUTS.value), chunk_size=16)
    )
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, _VOCAB.value, _PROMPT_LEN.value).tolist() for _ in range(_BATCH.value)]
    batch, length, new = _BATCH.value, _PROMPT_LEN.value, _NEW_TOKENS.value
    torch_ids = torch.tensor(prompts)

    # Prefill.
    tokens = jnp.asarray(np.array(prompts, np.int32))
    segments = jnp.ones_like(tokens)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)

    def jax_prefill():
        jax.block_until_ready(_prefill(sampler.graphdef, sampler.state, tokens, positions, segments, slots=length + 64))

    def torch_prefill():
        with torch.no_grad():
            hf(input_ids=torch_ids, use_cache=True)

    jax_prefill_s, torch_prefill_s = best_time(jax_prefill, _REPEATS.value), best_time(torch_prefill, _REPEATS.value)

    # Greedy generation.
    greedy = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)

    def jax_generate():
        sampler.generate(prompts, greedy)

    def torch_generate():
        with torch.no_grad():
            hf.generate(
                input_ids=torch_ids,
                attention_mask=torch.ones_like(torch_ids),
                do_sample=False,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=0,
            )

    jax_gen_s, torch_gen_s = best_time(jax_generate, _REPEATS.value), best_time(torch_generate, _REPEATS.value)

    # k rollouts of one prefix.
    rollout = SamplingParams(n=_ROLLOUTS.value, temperature=1.0, max_tokens=new, seed=0, ignore_eos=True)
    unshared = JaxSampler(
        model, Tok(), config=SamplerConfig(max_batch_rows=_ROLLOUTS.value, chunk_size=16, share_prefix=False)
    )

    def shared_run():
        sampler.generate([prompts[0]], rollout)

    def unshared_run():
        unshared.generate([prompts[0]], rollout)

    shared_s, unshared_s = best_time(shared_run, _REPEATS.value), best_time(unshared_run, _REPEATS.value)

    def per_s(count, seconds):
        return round(count / seconds, 1)

    result = {
        "device": jax.devices()[0].device_kind,
        "model": {
            "parameters": config.num_parameters(),
            "hidden": config.hidden_size,
            "layers": config.num_hidden_layers,
        },
        "batch": batch,
        "prompt_len": length,
        "new_tokens": new,
        "prefill_tokens_per_s": {
            "jax": per_s(batch * length, jax_prefill_s),
            "torch": per_s(batch * length, torch_prefill_s),
        },
        "decode_tokens_per_s": {
            "jax": per_s(batch * new, max(jax_gen_s - jax_prefill_s, 1e-9)),
            "torch": per_s(batch * new, max(torch_gen_s - torch_prefill_s, 1e-9)),
        },
        "generate_s": {"jax": round(jax_gen_s, 4), "torch": round(torch_gen_s, 4)},
        f"rollouts_k{_ROLLOUTS.value}_s": {
            "shared_prefix": round(shared_s, 4),
            "separate_prefills": round(unshared_s, 4),
        },
        f"rollouts_k{_ROLLOUTS.value}_prefill_tokens": {
            "shared_prefix": length,
            "separate_prefills": length * _ROLLOUTS.value,
        },
    }
    result["generate_speedup_jax_over_torch"] = round(torch_gen_s / jax_gen_s, 2)
    print(json.dumps(result, indent=2))
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
