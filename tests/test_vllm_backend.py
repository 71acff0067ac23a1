"""vLLM backends: the mapping logic against a fake `vllm` module (the real engines: test_vllm_engine.py)."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from tiny_assets import build_tiny_tokenizer

from prm_jax.generation import vllm_backend
from prm_jax.generation.types import Completion, RequestOutput, SamplingParams, VLLMEngineConfig
from prm_jax.generation.vllm_backend import VLLMBackend, VLLMStepScorer, to_request_output, to_vllm_sampling_params
from prm_jax.tokenization import PRMInput, build_prm_input, separator_token_id

# --------------------------------------------------------------------------------------------
# A fake vllm module: records what the backends build and answers with scripted outputs.


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.__dict__.update(kwargs)


class FakePoolerConfig:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


def fake_completion(index, token_ids, finish_reason="length", stop_reason=None):
    return SimpleNamespace(
        index=index,
        text=f"t{token_ids}",
        token_ids=list(token_ids),
        finish_reason=finish_reason,
        stop_reason=stop_reason,
    )


class FakeLLM:
    """Generation: completion j of a request is [prompt length, j, seed]; pooling: scripted data."""

    default_step_tag_id = 151651  # what vLLM's Qwen2ForProcessRewardModel pools on without a step_tag_id

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        pooler = kwargs.get("pooler_config")
        step_tag_id = pooler.kwargs["step_tag_id"] if pooler is not None else self.default_step_tag_id
        self.llm_engine = SimpleNamespace(
            model_config=SimpleNamespace(
                max_model_len=kwargs.get("max_model_len") or 512, pooler_config=SimpleNamespace(step_tag_id=step_tag_id)
            )
        )
        self.finish_reason = "length"
        self.pooled = []  # per-prompt `outputs.data` that encode() returns
        self.generate_calls = []
        self.encode_calls = []
        self.supported_tasks = ("token_classify",)

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.generate_calls.append((prompts, sampling_params))
        outputs = []
        for i, (prompt, sp) in enumerate(zip(prompts, sampling_params)):
            n_prompt = len(prompt["prompt_token_ids"])
            # Children listed in reverse: the backend must order them by index.
            children = [fake_completion(j, [n_prompt, j, sp.seed], self.finish_reason) for j in reversed(range(sp.n))]
            outputs.append(SimpleNamespace(request_id=str(i), outputs=children))
        return outputs

    def encode(self, prompts, pooling_task=None, use_tqdm=True):
        self.encode_calls.append((prompts, pooling_task))
        return [SimpleNamespace(outputs=SimpleNamespace(data=d)) for d in self.pooled[: len(prompts)]]


def make_fake_vllm():
    return SimpleNamespace(
        SamplingParams=FakeSamplingParams,
        TokensPrompt=lambda **kw: dict(kw),
        LLM=FakeLLM,
        config=SimpleNamespace(PoolerConfig=FakePoolerConfig),
        platforms=SimpleNamespace(current_platform=SimpleNamespace(is_cpu=lambda: True)),
    )


@pytest.fixture
def fake_vllm(monkeypatch):
    module = make_fake_vllm()
    monkeypatch.setattr(vllm_backend, "_import_vllm", lambda: module)
    return module


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


# --------------------------------------------------------------------------------------------
# Sampling-parameter and output mapping.


def test_sampling_params_mapping():
    params = SamplingParams(
        n=8,
        temperature=0.7,
        top_p=0.9,
        top_k=0,
        max_tokens=64,
        stop=("\n\n", "END"),
        stop_token_ids=(5, 7),
        seed=123,
        ignore_eos=True,
    )
    sp = to_vllm_sampling_params(params, make_fake_vllm())
    assert sp.kwargs == dict(
        n=8,
        temperature=0.7,
        top_p=0.9,
        top_k=0,
        max_tokens=64,
        stop=["\n\n", "END"],
        stop_token_ids=[5, 7],
        seed=123,
        ignore_eos=True,
        skip_special_tokens=True,
        include_stop_str_in_output=False,
    )
    assert to_vllm_sampling_params(SamplingParams(top_k=20, stop="x"), make_fake_vllm()).kwargs["top_k"] == 20
    assert to_vllm_sampling_params(SamplingParams(stop="x"), make_fake_vllm()).kwargs["stop"] == ["x"]


def test_greedy_asks_vllm_for_one_completion():
    """vLLM rejects n > 1 with temperature 0; greedy completions are identical anyway."""
    sp = to_vllm_sampling_params(SamplingParams(n=4, temperature=0.0), make_fake_vllm())
    assert sp.n == 1 and sp.kwargs["temperature"] == 0.0


def test_output_mapping_orders_children_and_maps_finish_reasons():
    params = SamplingParams(n=3, temperature=1.0)
    raw = SimpleNamespace(
        request_id="0",
        outputs=[
            fake_completion(2, [9], "length"),
            fake_completion(0, [1, 2, 3], "stop", stop_reason=None),  # EOS
            fake_completion(1, [4, 5], "stop", stop_reason="\n\n"),  # stop string
        ],
    )
    out = to_request_output(raw, params, [10, 11])
    assert isinstance(out, RequestOutput) and out.prompt_token_ids == (10, 11)
    assert [c.token_ids for c in out.completions] == [(1, 2, 3), (4, 5), (9,)]
    assert [c.finish_reason for c in out.completions] == ["stop", "stop", "length"]
    assert [c.stop_reason for c in out.completions] == [None, "\n\n", None]
    assert all(isinstance(c, Completion) for c in out.completions)


def test_greedy_output_is_repeated_n_times():
    raw = SimpleNamespace(outputs=[fake_completion(0, [1, 2], "stop", stop_reason=7)])
    out = to_request_output(raw, SamplingParams(n=3, temperature=0.0), [1])
    assert len(out.completions) == 3 and len(set(out.completions)) == 1
    assert out.completions[0].stop_reason == 7


@pytest.mark.parametrize("reason", ["abort", "error", "repetition", None])
def test_abnormal_finish_raises(reason):
    raw = SimpleNamespace(request_id="3", outputs=[fake_completion(0, [1], reason)])
    with pytest.raises(RuntimeError, match="finish_reason"):
        to_request_output(raw, SamplingParams(), [1])


def test_wrong_number_of_completions_raises():
    raw = SimpleNamespace(outputs=[fake_completion(0, [1])])
    with pytest.raises(RuntimeError, match="n=2"):
        to_request_output(raw, SamplingParams(n=2), [1])


# --------------------------------------------------------------------------------------------
# VLLMBackend with the fake engine.


def test_backend_sends_one_request_per_prompt_with_n(fake_vllm, tokenizer_dir):
    engine = VLLMEngineConfig(tensor_parallel_size=2, max_model_len=512, enforce_eager=True, kv_cache_gib=0.5)
    backend = VLLMBackend(str(tokenizer_dir), engine=engine)
    assert backend.llm.kwargs["tensor_parallel_size"] == 2 and backend.llm.kwargs["enforce_eager"] is True
    assert backend.llm.kwargs["enable_prefix_caching"] is True and backend.llm.kwargs["seed"] == 0
    # GPU options pass through; on the CPU build chunked prefill is off and the KV cache is sized explicitly.
    assert (
        backend.llm.kwargs["gpu_memory_utilization"] == 0.9 and backend.llm.kwargs["kv_cache_memory_bytes"] == 1 << 29
    )
    assert backend.llm.kwargs["enable_chunked_prefill"] is False and backend.context_length == 512
    prompts = [[{"role": "user", "content": "What is 2 + 2?"}], "plain text prompt", [5, 6, 7]]
    outputs = backend.generate(prompts, SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=32))

    ((sent_prompts, sent_params),) = backend.llm.generate_calls
    assert len(sent_prompts) == 3 and [sp.n for sp in sent_params] == [4, 4, 4]
    assert all(sp.max_tokens == 32 and sp.seed == 11 for sp in sent_params)
    assert sent_prompts[2] == {"prompt_token_ids": [5, 6, 7]}
    chat_ids = sent_prompts[0]["prompt_token_ids"]
    assert backend.tokenizer.decode(chat_ids).startswith("<|im_start|>user\nWhat is 2 + 2?")
    assert backend.tokenizer.decode(chat_ids).endswith("<|im_start|>assistant\n")

    assert len(outputs) == 3
    for sent, out in zip(sent_prompts, outputs):
        assert out.prompt_token_ids == tuple(sent["prompt_token_ids"])
        n_prompt = len(sent["prompt_token_ids"])
        assert [c.token_ids for c in out.completions] == [(n_prompt, j, 11) for j in range(4)]
        assert all(c.finish_reason == "length" for c in out.completions)


def test_backend_per_prompt_params_and_greedy(fake_vllm, tokenizer_dir):
    backend = VLLMBackend(str(tokenizer_dir))
    params = [SamplingParams(n=2, seed=1), SamplingParams(n=3, temperature=0.0)]
    outputs = backend.generate([[1, 2], [3]], params)
    ((_, sent_params),) = backend.llm.generate_calls
    assert [sp.n for sp in sent_params] == [2, 1]
    assert [len(o.completions) for o in outputs] == [2, 3]
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        backend.generate([[1], [2], [3]], params)
    assert backend.generate([], SamplingParams()) == []


def test_backend_raises_on_abort(fake_vllm, tokenizer_dir):
    backend = VLLMBackend(str(tokenizer_dir))
    backend.llm.finish_reason = "abort"
    with pytest.raises(RuntimeError, match="abort"):
        backend.generate([[1, 2]], SamplingParams())


def test_missing_vllm_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'prm-jax\[vllm\]'"):
        VLLMBackend("some/model")
    with pytest.raises(ImportError, match="prm-jax"):
        VLLMStepScorer("some/model", step_separator_id=1)


# --------------------------------------------------------------------------------------------
# VLLMStepScorer with the fake engine.


def _prm_dir(tmp_path, separator_id):
    (tmp_path / "config.json").write_text(json.dumps({"step_separator_id": separator_id}))
    return tmp_path


def test_scorer_configures_step_pooling_and_reads_class_1(fake_vllm, tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    sep = separator_token_id(tok)
    inputs = [build_prm_input(tok, "1 + 1?", ["1 + 1 = 2", "\\boxed{2}"]), build_prm_input(tok, "x?", ["x"])]
    scorer = VLLMStepScorer(str(_prm_dir(tmp_path, sep)), engine=VLLMEngineConfig(dtype="bfloat16"))
    scorer.llm.pooled = [np.array([[0.9, 0.1], [0.3, 0.7]], dtype=np.float32), [[0.2, 0.8]]]

    assert scorer.step_separator_id == sep
    assert scorer.llm.kwargs["runner"] == "pooling" and scorer.llm.kwargs["dtype"] == "bfloat16"
    assert scorer.llm.kwargs["pooler_config"].kwargs == {"pooling_type": "STEP", "step_tag_id": sep}
    scores = scorer.score(inputs)
    np.testing.assert_allclose(scores[0], [0.1, 0.7], rtol=1e-6)
    np.testing.assert_allclose(scores[1], [0.8])
    ((prompts, task),) = scorer.llm.encode_calls
    assert task == "token_classify" and prompts[0] == {"prompt_token_ids": inputs[0].input_ids}
    assert scorer.score([]) == []


def test_scorer_leaves_vllms_default_pooler_for_separator_151651(fake_vllm, tmp_path):
    scorer = VLLMStepScorer(str(_prm_dir(tmp_path, 151651)))
    assert scorer.step_separator_id == 151651 and "pooler_config" not in scorer.llm.kwargs


def test_scorer_refuses_an_engine_that_pools_on_another_token(fake_vllm, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(FakeLLM, "default_step_tag_id", None)  # a vLLM without the 151651 default
    with pytest.raises(ValueError, match="pools on token None, not the step separator 151651"):
        VLLMStepScorer(str(_prm_dir(tmp_path, 151651)))


def test_scorer_refuses_an_architecture_vllm_lacks(fake_vllm, tmp_path) -> None:
    fake_vllm.ModelRegistry = SimpleNamespace(get_supported_archs=lambda: ["Qwen2ForProcessRewardModel"])
    fake_vllm.__version__ = "0.32.0"
    config = {"architectures": ["Qwen3ForProcessRewardModel"], "step_separator_id": 151651}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"vLLM 0.32.0 has no model class for \['Qwen3ForProcessRewardModel'\]"):
        VLLMStepScorer(str(tmp_path))
    config["architectures"] = ["Qwen2ForProcessRewardModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert VLLMStepScorer(str(tmp_path)).step_separator_id == 151651


def test_chunked_prefill_is_left_to_vllm_on_gpus(fake_vllm, tokenizer_dir) -> None:
    fake_vllm.platforms.current_platform.is_cpu = lambda: False
    backend = VLLMBackend(str(tokenizer_dir))
    assert "enable_chunked_prefill" not in backend.llm.kwargs and "kv_cache_memory_bytes" not in backend.llm.kwargs


def test_scorer_separator_id_from_tokenizer_when_config_lacks_it(fake_vllm, tokenizer_dir):
    from transformers import AutoTokenizer

    scorer = VLLMStepScorer(str(tokenizer_dir))  # no config.json: falls back to the tokenizer's <extra_0>
    assert scorer.step_separator_id == separator_token_id(AutoTokenizer.from_pretrained(tokenizer_dir))


def test_scorer_rejects_wrong_step_count(fake_vllm, tokenizer_dir, tmp_path):
    scorer = VLLMStepScorer(str(tokenizer_dir), step_separator_id=9)
    x = PRMInput(input_ids=[1, 9, 2, 9], separator_positions=[1, 3])
    scorer.llm.pooled = [[[0.5, 0.5]]]  # one row for two steps
    with pytest.raises(ValueError, match="1 step scores for 2 steps"):
        scorer.score([x])
    scorer.llm.pooled = [[0.5, 0.5]]  # not [num_steps, 2]
    with pytest.raises(ValueError, match=r"\[num_steps, 2\]"):
        scorer.score([x])
    # A separator id inside the text would be pooled too: refused before anything is sent.
    with pytest.raises(ValueError, match="holds 3 of them for 2"):
        scorer.score([PRMInput(input_ids=[9, 1, 9, 2, 9], separator_positions=[2, 4])])
