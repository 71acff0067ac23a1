"""A generation backend for any OpenAI-compatible server (a policy or judge served over HTTP).

`OpenAIBackend` implements `GenerationBackend` on a server such as vLLM's
(`python -m vllm.entrypoints.openai.api_server --model DIR --served-model-name NAME`), through the
official `openai` client (optional extra: `pip install 'prm-jax[openai]'`, imported lazily in the
constructor). It mirrors `VLLMBackend` request for request:

* **One HTTP request per prompt** with `n = k`, so the server prefills the prompt once for its k
  samples. Requests run concurrently, at most `max_concurrency` at a time; the outputs come back
  one per prompt, in prompt order, whatever order the answers arrive in.
* `api="completions"` (what the synthesis pipeline uses): the prompt is rendered **locally** with
  `render_prompt` and the tokenizer given (the served model's tokenizer), checked against the
  server's context with `fit_prompt` (the same error as the other backends), `max_tokens` capped at
  what the context leaves, and sent as token ids (vLLM accepts a list of ints as the prompt).
* `api="chat"`: the prompt must be chat messages (a list of `{"role", "content"}`), sent as they
  are; the **server** applies its chat template, checks the context and caps `max_tokens`. A string
  or token ids are refused there: they are already rendered, and wrapping them in a user turn
  would apply a second template. The tokenizer is optional in this mode.
* vLLM's own sampling fields go in `extra_body`: `top_k`, `stop_token_ids`, `ignore_eos`,
  `skip_special_tokens=True` and `include_stop_str_in_output=False` (text decoded without special
  tokens, cut before a stop string, as `Completion` specifies), `return_token_ids=True` (vLLM then
  returns each choice's generated ids as `token_ids`; a server that does not is an error, since
  `Completion.token_ids` must be the real ids) and neutral `repetition_penalty`/`min_p`/penalties,
  so a `generation_config.json` the server applies as defaults cannot change the sampling.
* Finish reasons "stop" and "length" map as they are; anything else (vLLM's "abort", "error",
  "repetition", ...) raises. Greedy (`temperature == 0`) asks for `n = 1` and repeats the
  completion `n` times. Seeds: vLLM's server seeds child j of an `n = k` request with seed s with
  `s + j` (its engine's parallel sampling, as offline), our interface's scheme.

Failures: the client retries HTTP 408/409/429/5xx, connection errors and timeouts `max_retries`
times with exponential backoff (0.5 s doubling to 8 s, jittered; a short `Retry-After`/`retry-after-ms`
header is honoured instead, its cap depending on the client version). When a request still fails, `generate` raises
`OpenAIServerError` naming the server, the prompt and the number of attempts, and returns nothing
for that call: the stages write records only from a `generate` call that returned, so a stage
interrupted by a dead server resumes on the rerun with nothing lost or duplicated.

The API key is read from the environment variable named by `api_key_env` (default
`OPENAI_API_KEY`), never from a config file; without it the key is "EMPTY", which a server started
without `--api-key` accepts.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prm_jax.generation.types import (
    Prompt,
    RequestOutput,
    SamplingParams,
    fit_max_tokens,
    fit_prompt,
    is_messages,
    per_prompt_params,
    render_prompt,
    requested_n,
    served_output,
)

__all__ = ["APIS", "OpenAIBackend", "OpenAIServerError"]

#: The two endpoints: `/v1/completions` (prompt rendered here) and `/v1/chat/completions`.
APIS = ("completions", "chat")

_INSTALL_HINT = "the openai client is not installed; install the optional extra: pip install 'prm-jax[openai]'"

#: Seconds to open a connection (an unreachable host fails fast; `timeout_s` bounds the rest).
_CONNECT_TIMEOUT_S = 10.0
#: Statuses the client retries (its `_should_retry`): request timeout, lock timeout, rate limit, 5xx.
_RETRIED_STATUSES = (408, 409, 429)


class OpenAIServerError(RuntimeError):
    """The server could not be reached, timed out, kept failing, or refused a request."""


def _import_openai():
    try:
        return importlib.import_module("openai")
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error


def _attempts(error: Any) -> int | None:
    """How many times the client sent the request (it numbers its retries in a request header)."""
    request = getattr(error, "request", None)
    if request is None and getattr(error, "response", None) is not None:
        request = error.response.request
    try:
        return int(request.headers["x-stainless-retry-count"]) + 1
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


class OpenAIBackend:
    """`GenerationBackend` on an OpenAI-compatible server (vLLM's, or any that returns token ids).

    Args:
        base_url: The server's API root, e.g. `http://host:8000/v1`.
        model: The served model **name** (vLLM's `--served-model-name`, else its `--model`).
        tokenizer: The served model's tokenizer: a directory or hub name (loaded with
            `AutoTokenizer`) or a tokenizer object. Required for `api="completions"`, where prompts
            are rendered here; optional for `api="chat"`.
        api: "completions" or "chat" (see the module docstring).
        api_key_env: Name of the environment variable holding the API key (unset: "EMPTY").
        max_concurrency: Requests in flight at once.
        max_retries: Retries per request after the first attempt (429/5xx/connection errors/timeouts).
        timeout_s: Seconds one attempt may take (the whole generation of a prompt's n samples);
            opening the connection may take at most 10 s of it.
        overflow: A prompt longer than the context (completions): "error" or "truncate_left".

    The constructor asks the server for its models (`GET /models`): the model must be listed, and
    vLLM's `max_model_len` there becomes `context_length` (None when the server does not say).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        tokenizer: Any = None,
        api: str = "completions",
        api_key_env: str = "OPENAI_API_KEY",
        max_concurrency: int = 8,
        max_retries: int = 5,
        timeout_s: float = 600.0,
        overflow: str = "error",
    ) -> None:
        problems = []
        if api not in APIS:
            problems.append(f"api={api!r}: choose one of {APIS}")
        if not isinstance(max_concurrency, int) or max_concurrency < 1:
            problems.append(f"max_concurrency={max_concurrency!r} must be an integer >= 1")
        if not isinstance(max_retries, int) or max_retries < 0:
            problems.append(f"max_retries={max_retries!r} must be an integer >= 0")
        if not timeout_s > 0:
            problems.append(f"timeout_s={timeout_s!r} must be > 0")
        if api == "completions" and tokenizer is None:
            problems.append("api='completions' renders prompts locally: pass the served model's tokenizer")
        if problems:
            raise ValueError("OpenAIBackend: " + "; ".join(problems))
        openai = _import_openai()
        self._openai = openai
        self.base_url = str(base_url).rstrip("/")
        self.model = str(model)
        self.api = api
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.timeout_s = float(timeout_s)
        self.overflow = overflow
        if isinstance(tokenizer, (str, Path)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        self.tokenizer = tokenizer
        self._api_key_env = api_key_env
        self.client = self._new_client()
        self._closed = False
        self.context_length = self._served_context_length()

    def _new_client(self) -> Any:
        openai = self._openai
        return openai.OpenAI(
            base_url=self.base_url,
            api_key=os.environ.get(self._api_key_env) or "EMPTY",
            max_retries=self.max_retries,
            timeout=openai.Timeout(self.timeout_s, connect=min(self.timeout_s, _CONNECT_TIMEOUT_S)),
        )

    # ------------------------------------------------------------------ server calls

    def _call(self, what: str, function: Any, **kwargs: Any) -> Any:
        """`function(**kwargs)` with the client's errors turned into one clear `OpenAIServerError`."""
        openai = self._openai
        try:
            return function(**kwargs)
        except openai.APIStatusError as error:
            attempts = _attempts(error)
            status = error.status_code
            retried = status in _RETRIED_STATUSES or status >= 500
            tries = f" to all {attempts} attempts" if retried and attempts else ""
            raise OpenAIServerError(
                f"the OpenAI-compatible server at {self.base_url} answered {what} with HTTP {status}{tries}: "
                f"{error.message}"
            ) from None
        except openai.APIConnectionError as error:
            attempts = _attempts(error)
            tries = f"{attempts} attempts" if attempts else "every attempt"
            if isinstance(error, openai.APITimeoutError):
                reason = f"no answer within timeout_s={self.timeout_s:g} s"
            else:
                reason = f"{type(error.__cause__ or error).__name__}: {error.__cause__ or error}"
            raise OpenAIServerError(
                f"the OpenAI-compatible server at {self.base_url} failed {what} on {tries} ({reason}); "
                "is it running and reachable? A rerun resumes where the run stopped"
            ) from None

    def _served_context_length(self) -> int | None:
        listed = self._call("GET /models", self.client.models.list)
        entries = list(getattr(listed, "data", []) or [])
        names = [getattr(entry, "id", None) for entry in entries]
        if self.model not in names:
            raise OpenAIServerError(
                f"the OpenAI-compatible server at {self.base_url} does not serve model {self.model!r} "
                f"(it serves {names}); set model_path to a served model name"
            )
        value = getattr(entries[names.index(self.model)], "max_model_len", None)
        return int(value) if value else None

    def _sampling_fields(self, params: SamplingParams) -> tuple[dict[str, Any], dict[str, Any]]:
        """The request's OpenAI fields and vLLM's `extra_body` fields for `params`."""
        fields: dict[str, Any] = dict(
            model=self.model,
            n=requested_n(params),
            temperature=float(params.temperature),
            top_p=float(params.top_p),
            max_tokens=int(params.max_tokens),
            seed=int(params.seed),
            presence_penalty=0.0,
            frequency_penalty=0.0,
        )
        if params.stop:
            fields["stop"] = list(params.stop)
        extra = dict(
            top_k=int(params.top_k),
            stop_token_ids=list(params.stop_token_ids),
            ignore_eos=bool(params.ignore_eos),
            skip_special_tokens=True,
            include_stop_str_in_output=False,
            return_token_ids=True,
            repetition_penalty=1.0,
            min_p=0.0,
        )
        return fields, extra

    def _completions(self, index: int, ids: list[int], params: SamplingParams) -> RequestOutput:
        fields, extra = self._sampling_fields(params)
        response = self._call(
            f"the completion request for prompt {index}",
            self.client.completions.create,
            prompt=ids,
            extra_body=extra,
            **fields,
        )
        choices = [(c, c.text) for c in response.choices]
        return self._output(index, response, choices, params, ids)

    def _chat(self, index: int, messages: list[dict[str, str]], params: SamplingParams) -> RequestOutput:
        fields, extra = self._sampling_fields(params)
        response = self._call(
            f"the chat request for prompt {index}",
            self.client.chat.completions.create,
            messages=messages,
            extra_body=extra,
            **fields,
        )
        choices = [(c, (c.message.content if c.message is not None else None) or "") for c in response.choices]
        prompt_ids = getattr(response, "prompt_token_ids", None) or ()
        return self._output(index, response, choices, params, prompt_ids)

    def _output(
        self, index: int, response: Any, choices: list[tuple[Any, str]], params: SamplingParams, prompt_ids: Any
    ) -> RequestOutput:
        served = []
        for choice, text in choices:
            token_ids = getattr(choice, "token_ids", None)
            if token_ids is None:
                raise OpenAIServerError(
                    f"{self.base_url} returned no token_ids for prompt {index}: the backend needs a server that "
                    "honours vLLM's return_token_ids (Completion.token_ids are the generated ids)"
                )
            served.append((choice.index, text, token_ids, choice.finish_reason, getattr(choice, "stop_reason", None)))
        source = f"{self.base_url}: request {getattr(response, 'id', '?')} for prompt {index}"
        return served_output(prompt_ids, served, params, source=source, error=OpenAIServerError)

    # ------------------------------------------------------------------ public

    def close(self) -> None:
        """Close the client's connections (the server is left running); the backend is unusable afterwards."""
        self._closed = True
        self.client.close()

    def _prepared(self, prompts: list[Prompt], all_params: list[SamplingParams]) -> list[tuple[Any, SamplingParams]]:
        """Each prompt as the request sends it (token ids or messages), with its final params."""
        if self.api == "chat":
            for i, prompt in enumerate(prompts):
                if not is_messages(prompt):
                    raise TypeError(
                        f"prompt {i}: api='chat' sends chat messages (a list of {{'role', 'content'}}) and the "
                        "server applies its chat template; a string or token ids is already rendered: use "
                        "api='completions' with the served model's tokenizer"
                    )
            return [([{"role": m["role"], "content": m["content"]} for m in p], q) for p, q in zip(prompts, all_params)]
        prepared = []
        for i, (prompt, params) in enumerate(zip(prompts, all_params)):
            ids = render_prompt(self.tokenizer, prompt)
            if self.context_length is None:
                ids = fit_prompt(ids, i, len(ids) + 1)  # no known context: only the empty-prompt check
            else:
                ids = fit_prompt(ids, i, self.context_length, self.overflow)
                params = fit_max_tokens(params, len(ids), self.context_length)
            prepared.append((ids, params))
        return prepared

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[RequestOutput]:
        """One `RequestOutput` per prompt, in order; one request (`n = k`) per prompt, concurrently.

        Either every prompt's output is returned or `OpenAIServerError` is raised (the first failed
        prompt's, in prompt order) after the requests still queued are cancelled.
        """
        if self._closed:
            raise RuntimeError(f"the OpenAIBackend for {self.base_url} is closed")
        prompts = list(prompts)
        all_params = per_prompt_params(params, len(prompts))
        if not prompts:
            return []
        prepared = self._prepared(prompts, all_params)
        send = self._chat if self.api == "chat" else self._completions
        executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=min(self.max_concurrency, len(prepared)), thread_name_prefix="openai-backend"
        )
        try:
            futures = [executor.submit(send, i, prompt, p) for i, (prompt, p) in enumerate(prepared)]
            concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
            failed = [f for f in futures if f.done() and not f.cancelled() and f.exception() is not None]
            if failed:
                raise failed[0].exception()
            outputs = [f.result() for f in futures]
        except BaseException:
            # A failed prompt or Ctrl-C: the call's other requests could go on retrying for up to
            # max_retries x timeout_s. Return now: cancel the queued ones and close the client, so
            # the ones in flight end with their current attempt, unretried and unread; the next
            # call gets a fresh client.
            executor.shutdown(wait=False, cancel_futures=True)
            self.client.close()
            self.client = self._new_client()
            raise
        executor.shutdown(wait=True)
        return outputs
