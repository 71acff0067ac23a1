"""The embedded demo: synthesis figures against the exact checker, and the whole run end to end."""

import json
import re
from pathlib import Path

import pytest

from data_pipeline import math_world
from data_pipeline.schemas import GradeRecord, MCCost, MCRecord, StepLabel
from data_pipeline.shards import Layout, Shard
from launch import demo_pipeline as demo
from prm_jax.files import atomic_write_json

PROBLEM = math_world.WorldProblem("p", 7, (("+", 2), ("-", 5)))
RIGHT = ["7 + 2 = 9", "9 - 5 = 4", "The answer is \\boxed{4}."]
WRONG_AT_0 = ["7 + 2 = 8", "8 - 5 = 3", "The answer is \\boxed{3}."]
WRONG_AT_1 = ["7 + 2 = 9", "9 - 5 = 5", "The answer is \\boxed{5}."]


def _mc_record(rid: str, num_steps: int, first_error: int) -> MCRecord:
    """Hard labels whose first zero is at `first_error` (-1: all positive), early-stopped there."""
    count = num_steps if first_error == -1 else first_error + 1
    labels = []
    for i in range(count):
        hard = 0 if i == first_error else 1
        last = i == num_steps - 1
        labels.append(
            StepLabel(hard, 0, float(hard), hard, False) if last else StepLabel(hard, 4, hard / 4, hard, True)
        )
    return MCRecord(rid, "p", "labelled", None, 4, num_steps, tuple(labels), first_error, count < num_steps, MCCost())


def test_mc_first_error_agreement_is_scored_against_the_checker(tmp_path) -> None:
    # (steps, MC's first error): truth is -1, 0, 1, -1, 1; MC agrees on the first three only.
    planted = [(RIGHT, -1), (WRONG_AT_0, 0), (WRONG_AT_1, 1), (RIGHT, 1), (WRONG_AT_1, -1)]
    figures = demo.mc_checker_agreement((PROBLEM, steps, mc) for steps, mc in planted)
    assert figures["responses"] == 5 and figures["agreement"] == pytest.approx(3 / 5)
    assert figures["mc_too_early"] == 1 and figures["mc_too_late"] == 1
    assert figures["matrix_rows_checker_cols_mc"]["-1"] == {"-1": 1, "1": 1}

    # The same figure from stage files, as the demo reads them (a skipped MC record is not counted).
    layout = Layout(tmp_path)
    shard = Shard()
    grades, mcs = [], []
    for i, (steps, mc) in enumerate(planted):
        answer = steps[-1][len("The answer is \\boxed{") : -2]
        right = answer == str(PROBLEM.answer)
        grades.append(
            GradeRecord(
                f"p#{i}",
                "p",
                i,
                PROBLEM.text,
                str(PROBLEM.answer),
                tuple(steps),
                answer,
                "stop",
                20,
                "correct" if right else "incorrect",
                right,
            )
        )
        mcs.append(_mc_record(f"p#{i}", len(steps), mc))
    grades.append(GradeRecord("p#9", "p", 9, PROBLEM.text, "4", ("7 + 2 =",), None, "length", 20, "no_answer", False))
    mcs.append(MCRecord("p#9", "p", "skipped", "truncated", 4, 1, (), None, False, MCCost()))
    for stage, records in (("grade", grades), ("mc", mcs)):
        path = layout.records(stage, shard)
        path.parent.mkdir(parents=True)
        path.write_text("".join(json.dumps(r.to_json()) + "\n" for r in records))
    atomic_write_json(layout.summary, {"keep_rate": 0.5})
    figures = demo.synthesis_figures(tmp_path)
    assert figures["mc_first_error_agreement"] == pytest.approx(3 / 5)
    assert figures["consensus_keep_rate"] == 0.5
    assert figures["synth_policy_accuracy"] == pytest.approx(2 / 6)


def test_baseline_f1_and_world_difficulty() -> None:
    assert demo.baseline_f1(10, 5) == 0.0
    config = demo.default_config()
    splits = demo.make_splits(config)
    texts = {name: {p.text for p in problems} for name, problems in splits.items()}
    assert not texts["eval"] & texts["sft"] and not texts["eval"] & texts["synth"] and not texts["synth"] & texts["sft"]
    for p in splits["sft"][:500]:
        value = p.first
        for op, n in p.operations:
            value = value + n if op == "+" else value - n
            assert 0 <= value <= config.world.max_value and 1 <= n <= 9


def test_detection_by_error_kind() -> None:
    predictions = [
        {"id": "a", "label": 1, "pred": 1},
        {"id": "b", "label": 0, "pred": -1},
        {"id": "c", "label": 2, "pred": 2},
        {"id": "d", "label": -1, "pred": 0},
        {"id": "e", "label": 1, "pred": 0},
    ]
    kinds = {"a": "out_of_range", "b": "in_range", "c": "out_of_range", "e": "in_range"}
    table = demo.detection_by_kind(predictions, kinds)
    assert table == {
        "out_of_range": {"records": 2, "found": 2, "rate": 1.0},
        "in_range": {"records": 2, "found": 0, "rate": 0.0},
    }


def test_mistake_kinds_setting() -> None:
    assert demo.mistake_kinds("carry") == ("carry",)
    assert demo.mistake_kinds(" carry, off_by_one ") == ("carry", "off_by_one")
    for bad in ("", "carry,typo"):
        with pytest.raises(ValueError, match="sft.mistakes"):
            demo.mistake_kinds(bad)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"sft.steps": 0}, "sft.steps"),
        ({"synth.k": -1}, "synth.k"),
        ({"judge.error_rate": 1.5}, "judge.error_rate"),
        ({"sft.mistakes": "carry,typo"}, "sft.mistakes"),
        ({"eval.temperature": -0.1}, "eval.temperature"),
        ({"sft.lr": -1.0}, "sft.lr"),
        ({"world.min_ops": 4, "world.max_ops": 2}, "world"),
        ({"sft.seq_len": 4096}, "sft.seq_len"),
    ],
)
def test_a_bad_demo_config_is_refused_before_anything_is_written(overrides, field, tmp_path) -> None:
    with pytest.raises(ValueError, match=rf"--config\.{re.escape(field)}"):
        demo.run_demo(small_config(**overrides), tmp_path / "w", say=lambda line: None)
    assert not (tmp_path / "w").exists()


def test_launch_demo_reports_every_bad_value_in_one_block(tmp_path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.demo",
            f"--workdir={tmp_path / 'w'}",
            "--config.sft.steps=0",
            "--config.judge.error_rate=2",
        ],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("error: invalid demo config (2 problem(s))") and "Traceback" not in result.stderr
    assert "--config.sft.steps=0" in result.stderr and "--config.judge.error_rate=2.0" in result.stderr
    assert not (tmp_path / "w").exists()


def small_config(**overrides):
    """Reduced sizes for CI (the floors below are set well under what these sizes give)."""
    c = demo.default_config()
    c.progress = False
    for dotted, value in overrides.items():
        node = c
        *path, last = dotted.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return c


# The default policy SFT (the arithmetic is learnt abruptly after 12k-16k noisy solutions; the default
# budget is 32k), less synthesis, PRM training and evaluation: about 6 minutes on 2 CPU cores. The
# floors sit under the band of the default run over 3 seeds x 3 CPU instruction sets (README, "The
# embedded demo"; bench/demo_band.py), which these reduced sizes stay inside.
E2E_SIZES = {"synth.num_problems": 256, "prm.steps": 300, "eval.num_problems": 128}
POLICY_ACCURACY_BAND = (0.45, 0.85)
MC_AGREEMENT_FLOOR = 0.75
PRM_F1_FLOOR = 0.85
OUT_OF_RANGE_FLOOR = 0.9
BON_MARGIN = 0.05


@pytest.mark.slow
def test_demo_end_to_end_learns(tmp_path) -> None:
    results = demo.run_demo(small_config(**E2E_SIZES), tmp_path, say=lambda line: None)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written == json.loads(json.dumps(results))
    for name in ("policy_accuracy", "mc_first_error_agreement", "consensus_keep_rate", "prm_f1", "baseline_f1"):
        assert isinstance(written[name], float), name
    for artifact in (
        "results.png",
        "bon.png",
        "prm_hf/config.json",
        "prm_hf/model.safetensors",
        "synth/summary.json",
        "eval/processbench/world.jsonl",
        "eval/bon_results/results.json",
        "timings.json",
    ):
        assert (tmp_path / artifact).exists(), artifact
    # The policy learnt the arithmetic and keeps the mistakes it was shown; MC labels mostly match the checker.
    low, high = POLICY_ACCURACY_BAND
    assert low <= written["policy_accuracy"] <= high, written
    assert written["mc_first_error_agreement"] >= MC_AGREEMENT_FLOOR, written
    # The PRM learned to flag wrong steps: held-out F1 clearly above always answering "no error".
    assert written["baseline_f1"] == 0.0
    assert written["prm_f1"] >= PRM_F1_FLOOR, written
    # It finds the impossible results (off by ten) the policy learnt to write.
    by_kind = written["prm_detection_by_error_kind"]
    assert by_kind["out_of_range"]["rate"] >= OUT_OF_RANGE_FLOOR, by_kind
    # Best-of-N: the PRM's pick beats majority voting over the same responses.
    bon = written["bon"]
    assert bon["prm"] >= bon["maj"] + BON_MARGIN and bon["prm"] <= bon["pass"], bon


MICRO = [
    "--config.sft.steps=4",
    "--config.sft.num_problems=64",
    "--config.synth.num_problems=4",
    "--config.prm.steps=4",
    "--config.eval.num_problems=4",
    "--config.synth.max_tokens=24",
    "--config.synth.mc_max_tokens=16",
    "--config.eval.max_tokens=24",
    "--config.progress=false",
]


@pytest.mark.slow
def test_demo_same_seed_same_results(tmp_path) -> None:
    """Every stage is seeded: two fresh runs, in separate processes started side by side, write the
    same results.json (tiny sizes: the comparison is about determinism, not quality)."""
    import subprocess
    import sys

    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "launch.demo", f"--workdir={tmp_path / name}", *MICRO],
            cwd=Path(__file__).resolve().parents[1],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in ("a", "b")
    ]
    for run in runs:
        output, _ = run.communicate(timeout=600)
        assert run.returncode == 0, output[-3000:]
    a = (tmp_path / "a" / "results.json").read_text()
    assert a == (tmp_path / "b" / "results.json").read_text()
    assert {"prm", "maj", "pass"} <= json.loads(a)["bon"].keys()
