"""Batched, length-bucketed, sharded step scoring for evaluation sets.

`prm_jax.scoring.score_prm_inputs` scores one batch as given; an evaluation set is thousands of
solutions of very different lengths (a 3-step GSM8K answer next to a 40-step OlympiadBench proof),
so scoring it in file order would pad everything to the longest neighbour and compile a new
program for every new shape. `BatchedScorer` therefore

* sorts the inputs of a call by length (longest first, so an out-of-memory batch shows up at
  once); `score_stream` feeds a long stream through in windows, so host memory does not grow
  with the evaluation set,
* pads each batch to a **length bucket** from a fixed geometric ladder (powers of two and 1.5x
  powers of two from `min_length`: at most a third of a batch is padding, and the number of
  distinct lengths is logarithmic in the longest sequence),
* sizes batches by a token budget (`rows = tokens_per_batch / bucket`, a power of two that
  divides by the data-parallel mesh size), and pads a short final batch only up to the next power
  of two rows, so the set of compiled shapes stays small and is reused across calls,
* runs one jitted forward with explicit shardings (rows over the `data`/`fsdp` mesh axes,
  parameters as restored) that gathers the hidden states at the step separators before the PRM
  head, so only `[rows, steps]` rewards come back to the host, replicated so every process of a
  multi-host run can read them.

Rewards equal an unpadded forward (padding is a separate segment the real tokens never attend to).

`score_stream` is the one path from any `StepScorer` (this one, vLLM's) to the evaluation tasks,
so it is where rewards are checked: a non-finite reward (a diverged checkpoint, fp16 overflow)
stops the run naming the record and step (`NonFiniteRewardError`), instead of becoming a
"no error" prediction (`nan < threshold` is false) or a silently skipped selection.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prm_jax.models.transformer import Transformer, step_rewards
from prm_jax.sharding import LogicalAxisRules, logical_to_partition_spec, make_mesh, state_shardings
from prm_jax.tokenization import PRMInput

__all__ = [
    "BucketConfig",
    "ScoringStats",
    "BatchedScorer",
    "length_bucket",
    "StepScorer",
    "NonFiniteRewardError",
    "checked_rewards",
    "score_stream",
]

K = TypeVar("K")


class StepScorer(Protocol):
    """What evaluation needs from a scorer: `score(inputs) -> one reward list per input`.

    Implemented by `BatchedScorer` (JAX) and `prm_jax.generation.vllm_backend.VLLMStepScorer`.
    """

    def score(self, inputs: Sequence[PRMInput]) -> list[list[float]]:
        """One reward per step for each input, in input order."""
        ...


@dataclasses.dataclass(frozen=True)
class BucketConfig:
    """How sequences are grouped into compiled shapes.

    Attributes:
        min_length: Smallest length bucket (tokens); the ladder is min_length * {1, 1.5, 2, 3, 4, 6, ...}.
        tokens_per_batch: Padded tokens per batch; rows = tokens_per_batch // bucket (a power of two).
        max_rows: Upper bound on rows per batch (short buckets would otherwise get huge batches).
        min_steps: Smallest bucket for the number of steps gathered per row (powers of two above it).
    """

    min_length: int = 64
    tokens_per_batch: int = 16384
    max_rows: int = 64
    min_steps: int = 8

    def __post_init__(self) -> None:
        for name in ("min_length", "tokens_per_batch", "max_rows", "min_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"BucketConfig.{name} must be positive, got {getattr(self, name)}")


@dataclasses.dataclass
class ScoringStats:
    """Throughput bookkeeping, reported in results.json and by the benchmark."""

    sequences: int = 0
    tokens: int = 0  # real tokens
    padded_tokens: int = 0  # tokens computed, padding included
    batches: int = 0
    seconds: float = 0.0  # wall time inside score() (host prep, device time and transfers)
    shapes: set[tuple[int, int, int]] = dataclasses.field(default_factory=set)

    def as_dict(self) -> dict[str, Any]:
        return {
            "sequences": self.sequences,
            "tokens": self.tokens,
            "padded_tokens": self.padded_tokens,
            "padding_fraction": 1 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0,
            "batches": self.batches,
            "compiled_shapes": len(self.shapes),
            "seconds": self.seconds,
            "sequences_per_s": self.sequences / self.seconds if self.seconds else None,
            "tokens_per_s": self.tokens / self.seconds if self.seconds else None,
        }


def length_bucket(length: int, min_length: int) -> int:
    """Smallest value of the ladder min_length * {1, 1.5, 2, 3, 4, 6, 8, ...} that holds `length`."""
    base = min_length
    while True:
        if length <= base:
            return base
        middle = (base * 3 + 1) // 2
        if length <= middle:
            return middle
        base *= 2


def _previous_power_of_two(value: int) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(value, 1)))))


def _next_power_of_two(value: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(value, 1))))


def _round_up(value: int, multiple: int) -> int:
    return max(multiple, math.ceil(value / multiple) * multiple)


class BatchedScorer:
    """Scores PRM inputs with a JAX model on a mesh; see the module docstring for the batching."""

    def __init__(
        self,
        model: Transformer,
        *,
        mesh: Mesh | None = None,
        rules: LogicalAxisRules | None = None,
        config: BucketConfig | None = None,
        pad_id: int = 0,
    ) -> None:
        """`mesh` defaults to one device; parameters not already laid out for it under `rules`
        (e.g. a model restored without a mesh) are moved onto it once, here."""
        if model.score is None:
            raise ValueError("the model has no PRM head (with_prm_head=False); it cannot score steps")
        self.mesh = mesh if mesh is not None else make_mesh({"data": 1}, devices=jax.devices()[:1])
        self.config = config or BucketConfig()
        self.pad_id = pad_id
        self.stats = ScoringStats()
        graphdef, state = nnx.split(model)
        state = jax.device_put(state, state_shardings(state, self.mesh, rules))
        state_sharding = jax.tree.map(lambda x: x.sharding, state)
        self._state = state
        spec = logical_to_partition_spec(("activation_batch", None), None, self.mesh)
        axes = spec[0] if len(spec) else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        self.row_multiple = int(np.prod([self.mesh.shape[a] for a in axes])) if axes else 1
        self._batch_sharding = NamedSharding(self.mesh, PartitionSpec(axes or None, None))
        replicated = NamedSharding(self.mesh, PartitionSpec())

        def forward(state: Any, ids: jax.Array, segments: jax.Array, positions: jax.Array) -> jax.Array:
            model = nnx.merge(graphdef, state)
            hidden = model(ids, segments)
            # The head is per token, so reading it at the separators only is exact and skips
            # an [rows, length, hidden] x [hidden, hidden] matmul.
            picked = jnp.take_along_axis(hidden, positions[..., None], axis=1)
            return step_rewards(model.step_logits(picked))

        self._forward = jax.jit(
            forward,
            in_shardings=(state_sharding, self._batch_sharding, self._batch_sharding, self._batch_sharding),
            out_shardings=replicated,
        )

    # ------------------------------------------------------------------ shapes

    def rows_for(self, bucket: int) -> int:
        """Rows per full batch of a length bucket (a power of two, a multiple of the data size)."""
        rows = _previous_power_of_two(self.config.tokens_per_batch // bucket)
        rows = min(rows, _previous_power_of_two(self.config.max_rows))
        return _round_up(rows, self.row_multiple)

    def _plan(self, lengths: Sequence[int]) -> list[tuple[int, list[int]]]:
        """[(length bucket, indices)] batches, longest first; indices into `lengths`."""
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        batches: list[tuple[int, list[int]]] = []
        current: list[int] = []
        current_bucket = 0
        for i in order:
            bucket = length_bucket(lengths[i], self.config.min_length)
            if current and (bucket != current_bucket or len(current) >= self.rows_for(current_bucket)):
                batches.append((current_bucket, current))
                current = []
            if not current:
                current_bucket = bucket
            current.append(i)
        if current:
            batches.append((current_bucket, current))
        return batches

    def _global(self, value: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(value.shape, self._batch_sharding, lambda index: value[index])

    # ------------------------------------------------------------------ scoring

    def _dispatch(self, inputs: Sequence[PRMInput], bucket: int) -> jax.Array:
        """Pad one batch to its shape and launch the forward (asynchronously: JAX returns at once)."""
        rows = min(self.rows_for(bucket), _round_up(_next_power_of_two(len(inputs)), self.row_multiple))
        steps = max(self.config.min_steps, _next_power_of_two(max(len(x.separator_positions) for x in inputs)))
        ids = np.full((rows, bucket), self.pad_id, np.int32)
        segments = np.zeros((rows, bucket), np.int32)
        positions = np.zeros((rows, steps), np.int32)
        for r, x in enumerate(inputs):
            ids[r, : len(x.input_ids)] = x.input_ids
            segments[r, : len(x.input_ids)] = 1
            positions[r, : len(x.separator_positions)] = x.separator_positions
        self.stats.shapes.add((rows, bucket, steps))
        self.stats.batches += 1
        self.stats.padded_tokens += rows * bucket
        with jax.set_mesh(self.mesh):
            return self._forward(self._state, self._global(ids), self._global(segments), self._global(positions))

    def score(self, inputs: Sequence[PRMInput]) -> list[list[float]]:
        """One reward per step for each input, in input order.

        Every batch is dispatched before any result is fetched, so padding the next batch on the
        host overlaps the device running the previous one; results are only `[rows, steps]`.
        """
        inputs = list(inputs)
        start = time.perf_counter()
        launched = [
            (indices, self._dispatch([inputs[i] for i in indices], bucket))
            for bucket, indices in self._plan([len(x.input_ids) for x in inputs])
        ]
        out: list[list[float]] = [[] for _ in inputs]
        for indices, rewards in launched:
            values = np.asarray(jax.device_get(rewards))
            for r, i in enumerate(indices):
                out[i] = [float(v) for v in values[r, : len(inputs[i].separator_positions)]]
        self.stats.sequences += len(inputs)
        self.stats.tokens += sum(len(x.input_ids) for x in inputs)
        self.stats.seconds += time.perf_counter() - start
        return out


#: Inputs sorted and bucketed together per `StepScorer.score` call: larger windows pack tighter,
#: and hold more tokenized inputs in host memory.
SCORE_WINDOW = 4096


class NonFiniteRewardError(ValueError):
    """A scorer returned a NaN or infinite step reward: no metric may be computed from it."""


def checked_rewards(rewards: Sequence[float], where: str) -> list[float]:
    """`rewards` as a list when every one is finite; else `NonFiniteRewardError` naming `where` and the step."""
    for step, value in enumerate(rewards):
        if not math.isfinite(value):
            raise NonFiniteRewardError(
                f"{where}: step {step} reward is {value}: the PRM's output is not finite (a diverged or corrupt "
                "checkpoint, or overflow in the compute dtype: try --dtype=float32); no prediction is made from it"
            )
    return list(rewards)


def score_stream(
    scorer: StepScorer,
    items: Iterable[tuple[K, PRMInput]],
    window: int = SCORE_WINDOW,
    *,
    describe: Callable[[K], str] = str,
) -> Iterator[tuple[K, list[float]]]:
    """`(key, rewards)` for a stream of `(key, input)`, in order, scoring `window` inputs per
    `StepScorer.score` call (each window is sorted and bucketed on its own).

    Every reward list is checked here (`checked_rewards`), whichever backend scored it;
    `describe(key)` names the record in the error (e.g. `record 'gsm8k-3' (gsm8k.json:40)`).
    """
    keys: list[K] = []
    inputs: list[PRMInput] = []

    def scored() -> Iterator[tuple[K, list[float]]]:
        for key, rewards in zip(keys, scorer.score(inputs)):
            yield key, checked_rewards(rewards, describe(key))

    for key, x in items:
        keys.append(key)
        inputs.append(x)
        if len(inputs) >= window:
            yield from scored()
            keys, inputs = [], []
    if inputs:
        yield from scored()
