"""JAX sampler: parity with transformers generate, prefix sharing, stops, buckets, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_models import jax_arrays_from_torch, jax_model, random_causal_lm
from tiny_assets import TINY_VOCAB_SIZE, build_tiny_tokenizer
from transformers import AutoTokenizer

from prm_jax.generation.jax_sampler import JaxSampler, SamplerConfig, _decode_chunk
from prm_jax.generation.types import SamplingParams, render_prompt
from prm_jax.models.config import ModelConfig
from prm_jax.models.factory import params_of
from prm_jax.sharding import make_mesh

PROMPTS = [[5, 17, 33, 2], [9, 1, 3, 4, 5, 6, 7, 8, 100, 200, 300], [42], [7, 7, 7, 7, 7, 7]]
CONTEXT = 96


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hf = random_causal_lm(vocab_size=TINY_VOCAB_SIZE, seed=3, max_position_embeddings=CONTEXT)
    config = ModelConfig.from_hf_dict(hf.config.to_dict(), with_prm_head=False)
    model = jax_model(config, jax_arrays_from_torch(hf, config))
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))
    return hf, model, tokenizer


def sampler(setup, **config) -> JaxSampler:
    _, model, tokenizer = setup
    return JaxSampler(model, tokenizer, config=SamplerConfig(chunk_size=8, **config))


def test_greedy_equals_transformers_generate_on_padded_batch(setup) -> None:
    hf = setup[0]
    out = sampler(setup).generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    width = max(map(len, PROMPTS))
    ids = np.zeros((len(PROMPTS), width), np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(PROMPTS):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    with torch.no_grad():
        expected = hf.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            do_sample=False,
            max_new_tokens=24,
            pad_token_id=0,
            eos_token_id=None,
        )[:, width:]
    for i, request in enumerate(out):
        assert request.prompt_token_ids == tuple(PROMPTS[i])
        (completion,) = request.completions
        assert list(completion.token_ids) == expected[i].tolist(), i
        assert completion.finish_reason == "length"


SAMPLED = SamplingParams(n=4, temperature=1.0, top_p=0.9, top_k=50, max_tokens=20, seed=10, ignore_eos=True)


def test_prefix_sharing_is_exact_and_prefills_once(setup) -> None:
    shared = sampler(setup)
    together = shared.generate([PROMPTS[1]], SAMPLED)[0].completions
    assert shared.stats.prefill_rows == 1  # one prefill for the prompt's 4 samples
    separate = sampler(setup, share_prefix=False)
    singles = [SamplingParams(**{**SAMPLED.__dict__, "n": 1, "seed": 10 + j}) for j in range(4)]
    apart = [r.completions[0] for r in separate.generate([PROMPTS[1]] * 4, singles)]
    assert separate.stats.prefill_rows == 4
    assert [c.token_ids for c in together] == [c.token_ids for c in apart]
    assert len({c.token_ids for c in together}) > 1  # the samples really differ


def test_seeded_determinism_and_batching_independence(setup) -> None:
    s = sampler(setup)
    alone = s.generate([PROMPTS[0]], SAMPLED)[0]
    batched = s.generate([PROMPTS[2], PROMPTS[0], PROMPTS[3]], SAMPLED)[1]
    assert alone == batched
    other = s.generate([PROMPTS[0]], SamplingParams(**{**SAMPLED.__dict__, "seed": 99}))[0]
    assert other.completions != alone.completions


def test_top_k_one_is_greedy(setup) -> None:
    s = sampler(setup)
    greedy = s.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    top1 = s.generate(PROMPTS, SamplingParams(temperature=1.3, top_k=1, max_tokens=12, seed=5, ignore_eos=True))
    assert [r.completions[0].token_ids for r in greedy] == [r.completions[0].token_ids for r in top1]


def test_stop_token_ids_and_strings_cut_at_the_right_place(setup) -> None:
    s = sampler(setup)
    tokenizer = setup[2]
    base = s.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].completions[0]
    ids = list(base.token_ids)
    stop_id = ids[6]
    first = ids.index(stop_id)
    by_id = s.generate(
        [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=30, stop_token_ids=(stop_id,), ignore_eos=True)
    )
    c = by_id[0].completions[0]
    assert list(c.token_ids) == ids[: first + 1] and c.finish_reason == "stop" and c.stop_reason == stop_id

    full_text = tokenizer.decode(ids, skip_special_tokens=True)
    prefix_text = tokenizer.decode(ids[:10], skip_special_tokens=True)
    stop = full_text[len(prefix_text) : len(prefix_text) + 3]
    assert stop.strip(), "pick a visible stop string"
    c = s.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=30, stop=(stop,), ignore_eos=True))[
        0
    ].completions[0]
    cut = full_text.find(stop)
    assert c.text == full_text[:cut] and c.finish_reason == "stop" and c.stop_reason == stop
    assert stop in tokenizer.decode(list(c.token_ids)) and stop not in tokenizer.decode(list(c.token_ids[:-1]))

    short = s.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0].completions[0]
    assert list(short.token_ids) == ids[:5] and short.finish_reason == "length"


def test_eos_stops_unless_ignored(setup) -> None:
    _, model, tokenizer = setup
    s = sampler(setup)
    base = s.generate([PROMPTS[3]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].completions[0]
    # Pretend the 4th greedy token is the tokenizer's EOS.
    fake = JaxSampler(model, tokenizer, config=SamplerConfig(chunk_size=8))
    fake.eos_ids = (base.token_ids[3],)
    c = fake.generate([PROMPTS[3]], SamplingParams(temperature=0, max_tokens=20))[0].completions[0]
    assert list(c.token_ids) == list(base.token_ids[: base.token_ids.index(base.token_ids[3]) + 1])
    assert c.finish_reason == "stop" and c.stop_reason is None
    ignored = fake.generate([PROMPTS[3]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].completions[
        0
    ]
    assert ignored.token_ids == base.token_ids and ignored.finish_reason == "length"


def test_new_batch_sizes_reuse_compiled_programs(setup) -> None:
    s = sampler(setup)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    s.generate(PROMPTS[:3], params)  # 3 rows -> bucket 4
    before = _decode_chunk._cache_size()
    s.generate(PROMPTS[:4], params)  # 4 rows -> bucket 4, same lengths bucket
    s.generate([PROMPTS[2], PROMPTS[0], PROMPTS[1]], params)
    assert _decode_chunk._cache_size() == before


def test_prompt_too_long_errors_or_truncates(setup) -> None:
    too_long = list(range(1, CONTEXT + 5))
    with pytest.raises(ValueError, match=r"prompt 0 has 100 tokens; the model's context is 96"):
        sampler(setup).generate([too_long], SamplingParams(max_tokens=4))
    out = sampler(setup, overflow="truncate_left").generate(
        [too_long], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    )
    assert out[0].prompt_token_ids == tuple(too_long[-(CONTEXT - 1) :])
    # Generation never runs past the context: only one slot is left.
    assert len(out[0].completions[0].token_ids) == 1 and out[0].completions[0].finish_reason == "length"


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("n", 0, "n must be"),
        ("max_tokens", 0, "max_tokens must be"),
        ("max_tokens", -3, "max_tokens must be"),
        ("top_p", 0.0, "top_p"),
        ("temperature", -1.0, "temperature"),
    ],
)
def test_invalid_sampling_params_are_rejected(field, value, message) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_chat_messages_and_plain_fallback(setup, tmp_path) -> None:
    tokenizer = setup[2]
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    ids = render_prompt(tokenizer, messages, system_prompt="Be brief.")
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and text.endswith("<|im_start|>assistant\n")
    plain = AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path / "plain", chat_template=False))
    assert plain.decode(render_prompt(plain, messages)) == "What is 2 + 2?\n\n"
    out = sampler(setup).generate([messages], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert out[0].prompt_token_ids == tuple(render_prompt(tokenizer, messages))


def test_sharded_sampling_matches_single_device(setup) -> None:
    _, model, tokenizer = setup
    mesh = make_mesh({"data": 2, "fsdp": 2})
    sharded_model = jax_model(model.config, params_of(model), mesh=mesh)
    sharded = JaxSampler(sharded_model, tokenizer, mesh=mesh, config=SamplerConfig(chunk_size=8))
    params = SamplingParams(n=2, temperature=0.8, max_tokens=10, seed=3, ignore_eos=True)
    assert sharded.generate(PROMPTS, params) == sampler(setup).generate(PROMPTS, params)


def test_stop_string_in_the_chunk_where_the_row_runs_out_of_tokens(setup) -> None:
    """The stop string is honoured even when max_tokens ends the row in the same decode chunk."""
    s = sampler(setup)
    tokenizer = setup[2]
    ids = list(
        s.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
        .completions[0]
        .token_ids
    )
    full_text = tokenizer.decode(ids, skip_special_tokens=True)
    prefix = tokenizer.decode(ids[:3], skip_special_tokens=True)
    stop = full_text[len(prefix) : len(prefix) + 2]
    assert stop.strip()
    # chunk_size is 8: max_tokens=7 ends the row inside the first chunk, after the stop string.
    c = s.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=7, stop=(stop,), ignore_eos=True))[
        0
    ].completions[0]
    assert c.finish_reason == "stop" and c.text == full_text[: full_text.find(stop)]
