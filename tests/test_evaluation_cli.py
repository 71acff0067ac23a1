"""`python -m launch.evaluate` end to end on a tiny converted PRM: ProcessBench (PRM scores with
a threshold sweep), Best-of-N from an Orbax checkpoint, an external predictions file, and an LLM
critic through the JAX sampler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hf_models import random_causal_lm, save_hf
from tiny_assets import TINY_VOCAB_SIZE, build_tiny_tokenizer

from prm_jax.conversion.hf_checkpoint import hf_to_orbax, orbax_to_hf
from prm_jax.evaluation.runner import EvaluationConfig, run_evaluation

ROOT = Path(__file__).resolve().parents[1]
SUBSET_KEYS = {"f1", "acc_err", "acc_ok", "n_err", "n_ok"}


def pb(record_id: str, steps: list[str], label: int, final_answer_correct: bool = True) -> dict:
    return {
        "id": record_id,
        "generator": "tiny",
        "problem": f"Compute {record_id} please.",
        "steps": steps,
        "final_answer_correct": final_answer_correct,
        "label": label,
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_cli")
    hf_lm = save_hf(random_causal_lm(vocab_size=TINY_VOCAB_SIZE, seed=5, max_position_embeddings=512), root / "hf_lm")
    tokenizer = build_tiny_tokenizer(root / "tokenizer")
    hf_to_orbax(hf_lm, root / "orbax", seed=1)
    orbax_to_hf(root / "orbax", root / "hf_prm", dtype="float32", tokenizer_dir=tokenizer)
    data = root / "processbench"
    data.mkdir()
    # The official release's layout: a JSON array per subset; math has no error-free solution.
    (data / "gsm8k.json").write_text(
        json.dumps(
            [
                pb("gsm8k-0", ["2 + 3 = 5", "5 * 4 = 20", "\\boxed{20}"], -1),
                pb("gsm8k-1", ["2 + 3 = 6", "\\boxed{6}"], 0, False),
                pb("gsm8k-2", ["we add them", "so the sum is five", "then multiply by four", "\\boxed{20}"], 2),
            ],
            indent=2,
        )
    )
    (data / "math.jsonl").write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                pb("math-0", ["x = 2", "x + 1 = 4", "\\boxed{4}"], 1, False),
                pb("math-1", ["the answer is five"], 0),
            ]
        )
    )
    responses = lambda answers: [  # noqa: E731
        {"steps": ["we add two and three", f"so the answer is \\boxed{{{a}}}"], "correct": a == 5} for a in answers
    ]
    bon = root / "bon.jsonl"
    bon.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {
                    "id": "q0",
                    "dataset": "gsm8k",
                    "problem": "2 + 3?",
                    "answer": "5",
                    "responses": responses([5, 6, 5, 7]),
                },
                {
                    "id": "q1",
                    "dataset": "gsm8k",
                    "problem": "1 + 4?",
                    "answer": "5",
                    "responses": responses([6, 6, 5, 7]),
                },
                {
                    "id": "q2",
                    "dataset": "math",
                    "problem": "10 / 2?",
                    "answer": 5,
                    "responses": responses([4, 5, 4, 4]),
                },
            ]
        )
    )
    predictions = root / "preds.jsonl"
    predictions.write_text(
        "".join(
            json.dumps(p) + "\n"
            for p in [
                {"id": "gsm8k-0", "pred": -1},
                {"id": "gsm8k-1", "pred": 0},
                {"id": "gsm8k-2", "pred": 1},
                {"id": "math-0", "pred": 1},
                {"id": "math-1", "pred": None},
            ]
        )
    )
    return {
        "root": root,
        "hf_lm": hf_lm,
        "tokenizer": tokenizer,
        "orbax": root / "orbax",
        "hf_prm": root / "hf_prm",
        "data": data,
        "bon": bon,
        "predictions": predictions,
    }


def evaluate(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "4", "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "launch.evaluate", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def strict_json(path: Path) -> dict:
    def refuse(token: str) -> None:
        raise AssertionError(f"{path}: non-standard JSON constant {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_processbench_prm_cli(setup) -> None:
    out = setup["root"] / "out_pb"
    run = evaluate(
        "--task=processbench",
        f"--model={setup['hf_prm']}",
        f"--data={setup['data']}",
        f"--out={out}",
        "--dtype=float32",
        "--param_dtype=float32",
        "--mesh=data=2,fsdp=2",
        "--min_length=256",
        "--tune_threshold_on=gsm8k",
    )
    assert run.returncode == 0, run.stderr
    assert "ProcessBench (prm) F1: gsm8k" in run.stdout
    results = strict_json(out / "results.json")
    assert results["task"] == "processbench" and results["mode"] == "prm" and results["threshold"] == 0.5
    assert list(results["subsets"]) == ["gsm8k", "math"]
    for scores in results["subsets"].values():
        assert SUBSET_KEYS <= set(scores)
    assert (results["subsets"]["gsm8k"]["n_err"], results["subsets"]["gsm8k"]["n_ok"]) == (2, 1)
    assert results["subsets"]["math"]["acc_ok"] is None and results["subsets"]["math"]["f1"] == 0.0  # empty class
    f1s = [s["f1"] for s in results["subsets"].values()]
    assert results["average_f1"] == pytest.approx(sum(f1s) / 2)
    sweep = results["threshold_sweep"]
    assert sweep["tuned_on"] == "gsm8k" and 0 <= sweep["threshold"] <= 1
    assert sweep["subsets"]["gsm8k"]["f1"] >= results["subsets"]["gsm8k"]["f1"]
    assert {"min_position", "flawed_process", "calibration"} <= set(results["analyses"])
    assert results["analyses"]["flawed_process"]["n"] == 2  # gsm8k-2, math-1
    assert results["scoring"]["sequences"] == 5 and results["run"]["devices"] == 4
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["gsm8k-0", "gsm8k-1", "gsm8k-2", "math-0", "math-1"]
    assert [len(r["rewards"]) for r in rows] == [3, 2, 4, 3, 1]
    for row in rows:
        below = [i for i, r in enumerate(row["rewards"]) if r < 0.5]
        assert row["pred"] == (below[0] if below else -1)
    markdown = (out / "results.md").read_text()
    assert "| metric | gsm8k | math | average |" in markdown and "## Threshold tuned on gsm8k" in markdown
    for name in ("f1_by_subset.png", "f1_by_threshold.png", "min_position.png", "calibration.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_bon_cli_from_orbax_with_tokenizer(setup) -> None:
    out = setup["root"] / "out_bon"
    run = evaluate(
        "--task=bon",
        f"--model={setup['orbax']}",
        f"--tokenizer={setup['tokenizer']}",
        f"--data={setup['bon']}",
        f"--out={out}",
        "--dtype=float32",
        "--param_dtype=float32",
        "--bon_k=1,2,4",
        "--min_length=256",
    )
    assert run.returncode == 0, run.stderr
    results = strict_json(out / "results.json")
    assert results["task"] == "bon" and results["aggregations"] == ["product", "min", "last", "mean"]
    assert list(results["datasets"]) == ["gsm8k", "math"]
    gsm8k, math_, average = results["datasets"]["gsm8k"], results["datasets"]["math"], results["average"]
    for block in (gsm8k, math_, average):
        assert {"n_problems", "n_responses", "n", "prm_at_n", "maj_at_n", "pass_at_n"} <= set(block)
        assert set(block["prm_at_n"]) == {"product", "min", "last", "mean"}
    # q0 votes 5 (right), q1 votes 6 (wrong), q2 votes 4 (wrong); every problem has a right answer.
    assert (gsm8k["maj_at_n"], math_["maj_at_n"], average["maj_at_n"]) == (0.5, 0.0, 0.25)
    assert average["pass_at_n"] == 1.0 and average["n"] == 4
    assert set(results["by_k"]) == {"1", "2", "4"} and results["by_k"]["4"] == average
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["majority_answer"] for r in rows] == ["5", "6", "4"]
    for row in rows:
        assert len(row["rewards"]) == 4 and all(len(r) == 2 for r in row["rewards"])
        assert row["prm_correct"]["last"] == row["correct"][row["selected"]["last"]]
    assert "| maj@4 | 50.0 | 0.0 | 25.0 |" in (out / "results.md").read_text()
    for name in ("bon_by_aggregation.png", "bon_by_k.png", "min_position.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name


def test_predictions_cli_and_unknown_ids(setup) -> None:
    out = setup["root"] / "out_preds"
    run = evaluate(
        "--task=processbench", f"--predictions={setup['predictions']}", f"--data={setup['data']}", f"--out={out}"
    )
    assert run.returncode == 0, run.stderr
    results = strict_json(out / "results.json")
    assert results["mode"] == "predictions"
    # gsm8k: ok 1/1, err: gsm8k-1 (0 == 0) hit, gsm8k-2 (1 != 2) miss -> F1 2/3; math: no ok class -> 0
    assert results["subsets"]["gsm8k"]["f1"] == pytest.approx(2 / 3)
    assert results["subsets"]["math"]["n_unparseable"] == 1 and results["subsets"]["math"]["acc_err"] == 0.5
    assert results["average_f1"] == pytest.approx(1 / 3)
    assert (out / "results.md").exists() and (out / "f1_by_subset.png").exists()

    bad = setup["root"] / "bad_preds.jsonl"
    bad.write_text(setup["predictions"].read_text() + json.dumps({"id": "aime-3", "pred": 0}) + "\n")
    run = evaluate("--task=processbench", f"--predictions={bad}", f"--data={setup['data']}", f"--out={out}_bad")
    assert run.returncode == 2
    assert "ids not in the data: 'aime-3'" in run.stderr and "Traceback" not in run.stderr
    assert not (setup["root"] / "out_preds_bad" / "results.json").exists()


def test_critic_with_the_jax_sampler(setup) -> None:
    """A causal LM critic end to end (random weights: its answers are unparseable, and counted)."""
    out = setup["root"] / "out_critic"
    config = EvaluationConfig(
        task="processbench",
        data=str(setup["data"]),
        out=str(out),
        critic_model=str(setup["hf_lm"]),
        tokenizer=str(setup["tokenizer"]),
        critic_samples=2,
        critic_temperature=1.0,
        critic_max_tokens=6,
        dtype="float32",
        param_dtype="float32",
    )
    output = run_evaluation(config)
    results = strict_json(out / "results.json")
    assert results["mode"] == "critic" and results["critic"]["samples"] == 10
    assert sum(s["n_unparseable"] for s in results["subsets"].values()) == results["critic"]["unparseable_samples"] // 2
    assert all(len(row["outputs"]) == 2 for row in output.predictions)
    with pytest.raises(FileExistsError, match="results.json exists"):
        run_evaluation(config)
    with pytest.raises(ValueError, match="exactly one of model, critic_model, predictions"):
        EvaluationConfig(task="processbench", data="d", out="o", model="m", predictions="p")
    with pytest.raises(ValueError, match="identical greedy answers"):
        EvaluationConfig(task="processbench", data="d", out="o", critic_model="m", critic_samples=4)
