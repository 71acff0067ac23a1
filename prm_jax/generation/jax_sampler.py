"""KV-cache sampling with the NNX model: the generation backend for CPU, TPU and the embedded demo.

How a `generate` call runs:
* prompts are rendered to ids, checked against the context length, and grouped so that a group's
  sample rows fit `max_batch_rows` (a single prompt with n > max_batch_rows forms its own group);
* each group prefills its *unique* prompts once (left-padded to a length bucket), then the cache
  rows are repeated for the prompt's n samples: a prompt with n > 1 is prefilled once;
* decoding runs `chunk_size` steps per jitted call (a `lax.scan`), and the host checks stop
  strings and finished rows between chunks so a batch stops as soon as every row is done.
Shapes are bucketed (rows to powers of two, lengths to multiples of `length_bucket`), so a new
batch size or prompt length reuses a compiled program instead of compiling again.

Randomness: the token at step t of completion j of a request with seed s is drawn with
`fold_in(key(s + j), t)`: independent of batching, which makes prefix sharing exact.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from prm_jax.generation.types import (
    Completion,
    Prompt,
    RequestOutput,
    SamplerConfig,
    SamplingParams,
    fit_prompt,
    per_prompt_params,
    render_prompt,
)
from prm_jax.models.transformer import KVCache, Transformer, unstack_layers
from prm_jax.sharding import logical_to_partition_spec


@dataclasses.dataclass
class SamplerStats:
    prefill_rows: int = 0  # prompt rows prefilled (padding rows excluded)
    prefill_tokens: int = 0  # real prompt tokens prefilled
    decode_steps: int = 0
    generated_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class _Row:
    prompt: int  # index of the prompt in the call
    sample: int  # completion index j within its request
    params: SamplingParams


def _as_ids(value) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}


def _bucket_rows(rows: int, multiple: int) -> int:
    size = 1 << max(0, math.ceil(math.log2(max(rows, 1))))
    return max(size, multiple) if size % multiple == 0 else math.ceil(size / multiple) * multiple


def _round_up(value: int, multiple: int) -> int:
    return max(multiple, math.ceil(value / multiple) * multiple)


def _sample_tokens(logits, temperature, top_p, top_k, seeds, step, filtering: bool):
    """One token per row; greedy where temperature == 0.

    Filtering keeps a prefix of the tokens sorted by logit: top-k first, then top-p on the
    renormalised top-k distribution (as vLLM and transformers do). The draw itself is always a
    categorical over logits in vocabulary order, so a row's token does not depend on whether other
    rows of its batch asked for filtering.
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seeds, step)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    if filtering:
        sorted_logits = -jnp.sort(-scaled, axis=-1)
        ranks = jnp.arange(scaled.shape[-1])[None, :]
        in_top_k = (top_k[:, None] == 0) | (ranks < top_k[:, None])
        top_k_logits = jnp.where(in_top_k, sorted_logits, -jnp.inf)
        probs = jax.nn.softmax(top_k_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
        keep = in_top_k & (before < top_p[:, None])
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1)  # smallest kept logit
        scaled = jnp.where(scaled >= cutoff[:, None], scaled, -jnp.inf)
    sampled = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    return jnp.where(temperature == 0, greedy, sampled)


@functools.partial(jax.jit, static_argnames=("graphdef", "slots"))
def _prefill(graphdef, state, tokens, positions, segments, slots: int):
    # The cache is created inside the jit: it is born with the (batch-sharded) layout the
    # compiler propagates from the sharded prompt rows, never whole on one device.
    model = nnx.merge(graphdef, state)
    cache = KVCache.empty(model.config, tokens.shape[0], slots)
    hidden, cache = model.model.call_with_cache(tokens, positions, segments, cache, jnp.int32(0))
    return model.lm_logits(hidden[:, -1:])[:, 0], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "filtering"), donate_argnames=("cache",))
def _decode_chunk(graphdef, state, cache, logits, write_index, positions, done, generated, rows, filtering, steps):
    """`steps` decode steps. rows: per-row arrays (temperature, top_p, top_k, seed, max_tokens, stop_ids)."""
    model = nnx.merge(graphdef, state)

    def step(carry, _):
        cache, logits, write_index, positions, done, generated = carry
        token = _sample_tokens(
            logits, rows["temperature"], rows["top_p"], rows["top_k"], rows["seed"], generated, filtering
        )
        token = jnp.where(done, 0, token)
        emitted = ~done
        generated = generated + emitted.astype(jnp.int32)
        stopped = jnp.any(token[:, None] == rows["stop_ids"], axis=-1)
        done = done | (emitted & (stopped | (generated >= rows["max_tokens"])))
        ones = jnp.ones_like(token)[:, None]
        hidden, cache = model.model.call_with_cache(token[:, None], positions[:, None], ones, cache, write_index)
        logits = model.lm_logits(hidden)[:, 0]
        return (cache, logits, write_index + 1, positions + 1, done, generated), (token, emitted)

    carry, (tokens, emitted) = jax.lax.scan(
        step, (cache, logits, write_index, positions, done, generated), None, length=steps
    )
    return carry, tokens.T, emitted.T


class JaxSampler:
    """Generation backend on the NNX model (its LM head must be present)."""

    def __init__(self, model: Transformer, tokenizer, *, mesh: Mesh | None = None, config: SamplerConfig | None = None):
        if not model.config.with_lm_head:
            raise ValueError("JaxSampler needs a model with the causal-LM head (with_lm_head=True)")
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.config = config or SamplerConfig()
        self.context_length = model.config.max_position_embeddings
        # Decoding runs the layers one by one on their own arrays (`transformer.unstack_layers`,
        # copied once here); the caller's model keeps its stacked layers, and once it is dropped
        # the sampler holds one copy of the weights.
        decode_model = nnx.merge(*nnx.split(model))
        decode_model.model.layers = unstack_layers(decode_model.model.layers)
        self.graphdef, self.state = nnx.split(decode_model)
        self.stats = SamplerStats()
        self.eos_ids = tuple(
            sorted(_as_ids(getattr(tokenizer, "eos_token_id", None)) | _as_ids(model.config.eos_token_id))
        )
        self._row_multiple = 1
        if mesh is not None:
            spec = logical_to_partition_spec(("activation_batch",), None, mesh)
            axes = spec[0] if spec else None
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            self._row_multiple = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1

    # ------------------------------------------------------------------ public

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[RequestOutput]:
        prompt_ids = [
            fit_prompt(render_prompt(self.tokenizer, p), i, self.context_length, self.config.overflow)
            for i, p in enumerate(prompts)
        ]
        all_params = per_prompt_params(params, len(prompt_ids))
        rows = [_Row(i, j, p) for i, p in enumerate(all_params) for j in range(p.n)]
        results: dict[tuple[int, int], Completion] = {}
        for group in self._groups(rows):
            results.update(self._generate_group(prompt_ids, group))
        return [
            RequestOutput(tuple(ids), tuple(results[(i, j)] for j in range(all_params[i].n)))
            for i, ids in enumerate(prompt_ids)
        ]

    # ------------------------------------------------------------------ steps

    def _groups(self, rows: list[_Row]) -> list[list[_Row]]:
        groups: list[list[_Row]] = [[]]
        for row in rows:
            if len(groups[-1]) >= self.config.max_batch_rows and groups[-1][-1].prompt != row.prompt:
                groups.append([])
            groups[-1].append(row)
        return [g for g in groups if g]

    def _place(self, x):
        if self.mesh is None or self._row_multiple == 1:
            return jnp.asarray(x)
        spec = logical_to_partition_spec(("activation_batch",) + (None,) * (np.ndim(x) - 1), np.shape(x), self.mesh)
        return jax.device_put(np.asarray(x), NamedSharding(self.mesh, spec))

    def _generate_group(self, prompt_ids: list[list[int]], group: list[_Row]) -> dict[tuple[int, int], Completion]:
        cfg = self.config
        if cfg.share_prefix:
            unique = sorted({row.prompt for row in group})
            source_row = {p: k for k, p in enumerate(unique)}
            prefill_prompts = [prompt_ids[p] for p in unique]
            row_source = [source_row[row.prompt] for row in group]
        else:
            prefill_prompts = [prompt_ids[row.prompt] for row in group]
            row_source = list(range(len(group)))
        prompt_len = _round_up(max(len(ids) for ids in prefill_prompts), cfg.length_bucket)
        max_new = [min(row.params.max_tokens, self.context_length - len(prompt_ids[row.prompt])) for row in group]
        slots = _round_up(prompt_len + max(max_new), cfg.length_bucket)
        prefill_batch = _bucket_rows(len(prefill_prompts), self._row_multiple)
        batch = _bucket_rows(len(group), self._row_multiple)

        tokens = np.full((prefill_batch, prompt_len), cfg.pad_id, np.int32)
        segments = np.zeros((prefill_batch, prompt_len), np.int32)
        for r, ids in enumerate(prefill_prompts):
            tokens[r, prompt_len - len(ids) :] = ids
            segments[r, prompt_len - len(ids) :] = 1
        positions = np.maximum(np.cumsum(segments, axis=1) - 1, 0).astype(np.int32)
        logits, cache = _prefill(
            self.graphdef, self.state, self._place(tokens), self._place(positions), self._place(segments), slots=slots
        )
        self.stats.prefill_rows += len(prefill_prompts)
        self.stats.prefill_tokens += sum(len(ids) for ids in prefill_prompts)

        gather = np.zeros(batch, np.int32)
        gather[: len(group)] = row_source
        gather = jnp.asarray(gather)
        cache = cache.take_rows(gather)
        logits = logits[gather]
        stop_width = 1 + max(len(row.params.stop_token_ids) for row in group) + len(self.eos_ids)
        stop_ids = np.full((batch, stop_width), -1, np.int32)
        row_arrays = {
            "temperature": np.zeros(batch, np.float32),
            "top_p": np.ones(batch, np.float32),
            "top_k": np.zeros(batch, np.int32),
            "seed": np.zeros(batch, np.uint32),
            "max_tokens": np.ones(batch, np.int32),
        }
        for r, row in enumerate(group):
            p = row.params
            row_arrays["temperature"][r] = p.temperature
            row_arrays["top_p"][r] = p.top_p
            row_arrays["top_k"][r] = p.top_k
            row_arrays["seed"][r] = (p.seed + row.sample) % 2**32
            row_arrays["max_tokens"][r] = max_new[r]
            ids = list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_ids))
            stop_ids[r, : len(ids)] = ids
        row_arrays["stop_ids"] = stop_ids
        rows = {k: self._place(v) for k, v in row_arrays.items()}
        filtering = any(row.params.top_p < 1 or row.params.top_k > 0 for row in group)

        positions = np.zeros(batch, np.int32)
        for r, row in enumerate(group):
            positions[r] = len(prompt_ids[row.prompt])
        done = np.zeros(batch, bool)
        done[len(group) :] = True
        initial_done = done
        generated = np.zeros(batch, np.int32)
        state = (
            cache,
            logits,
            jnp.int32(prompt_len),
            self._place(positions),
            self._place(initial_done),
            self._place(generated),
        )
        out_tokens = [[] for _ in group]
        stop_hits: dict[int, str] = {}
        steps = cfg.chunk_size  # fixed: one compiled decode program per shape bucket
        while True:
            carry, chunk_tokens, chunk_emitted = _decode_chunk(
                self.graphdef, self.state, *state, rows, filtering=filtering, steps=steps
            )
            chunk_tokens, chunk_emitted = np.asarray(chunk_tokens), np.asarray(chunk_emitted)
            was_done = done.copy()
            done = np.array(carry[4])
            generated = np.asarray(carry[5])
            self.stats.decode_steps += steps
            for r, row in enumerate(group):
                out_tokens[r].extend(int(t) for t in chunk_tokens[r][chunk_emitted[r]])
                # Rows that finished within this chunk (EOS, max_tokens) may still have emitted a
                # stop string first: check every row that was running at the chunk's start.
                if not was_done[r] and r not in stop_hits and row.params.stop:
                    hit = self._stop_string_hit(out_tokens[r], row.params.stop)
                    if hit is not None:
                        stop_hits[r] = hit
                        done[r] = True
            if done[: len(group)].all():
                break
            state = (carry[0], carry[1], carry[2], carry[3], self._place(done), carry[5])
        self.stats.generated_tokens += sum(len(t) for t in out_tokens)
        return {
            (row.prompt, row.sample): self._completion(out_tokens[r], row.params, stop_hits.get(r))
            for r, row in enumerate(group)
        }

    # ------------------------------------------------------------------ host-side text

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _stop_string_hit(self, ids: list[int], stops: tuple[str, ...]) -> str | None:
        text = self._decode(ids)
        found = [(text.find(s), s) for s in stops if s in text]
        return min(found)[1] if found else None

    def _completion(self, ids: list[int], params: SamplingParams, stop_string: str | None) -> Completion:
        if stop_string is not None:
            # Keep tokens up to the one that completed the stop string; cut the text before it.
            for k in range(1, len(ids) + 1):
                if stop_string in self._decode(ids[:k]):
                    ids = ids[:k]
                    break
            text = self._decode(ids)
            return Completion(text[: text.find(stop_string)], tuple(ids), "stop", stop_string)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_ids))
        if ids and ids[-1] in stop_ids:
            # The token that ended it stays in the ids but not in the text (as vLLM does, and as a
            # stop string is cut from the text).
            reason = ids[-1] if ids[-1] in params.stop_token_ids else None
            return Completion(self._decode(ids[:-1]), tuple(ids), "stop", reason)
        return Completion(self._decode(ids), tuple(ids), "length")
