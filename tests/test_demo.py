"""The embedded demo: synthesis figures against the exact checker, and the whole run end to end."""

import json
import re
from pathlib import Path

import pytest

from data_pipeline import math_world
from data_pipeline.schemas import GradeRecord, MCCost, MCRecord, SampleRecord, StepLabel
from data_pipeline.shards import Layout, Shard, read_records_if_exists
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
        ({"backend": "vlm"}, "backend"),
        ({"vllm.kv_cache_gib": -0.5}, "vllm.kv_cache_gib"),
        ({"vllm.gpu_memory_utilization": 0.0}, "vllm.gpu_memory_utilization"),
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
# budget is 32k), less synthesis, PRM training and evaluation: 565 s on 2 cores (425 s of it the
# policy SFT), in its own process as the band runs were, with the same figures as their none/s0. The floors
# sit under this test's own spread, measured at these sizes over seeds and CPU classes (XLA:CPU's
# instruction-set caps on an AMD EPYC, plus the Intel Xeon AVX-512/AMX run that missed the earlier
# 0.9 floor; docs/performance.md, "The end-to-end test's spread"), each with the margin stated.
E2E_SIZES = {"synth.num_problems": 256, "prm.steps": 300, "eval.num_problems": 128}
POLICY_ACCURACY_BAND = (0.45, 0.85)  # measured 0.621-0.684: 0.17 below, 0.17 above
MC_AGREEMENT_FLOOR = 0.75  # measured >= 0.913: 0.16 under
PRM_F1_FLOOR = 0.85  # measured >= 0.954: 0.10 under (the Intel run passed it)
OUT_OF_RANGE_FLOOR = 0.8  # measured >= 0.985 here, 0.870 (187/215) on the Intel run: 0.07 under that
BON_MARGIN = 0.03  # prm@4 - maj@4 measured >= 0.094 (12 of 128 problems): 0.064 under


@pytest.mark.slow
def test_demo_end_to_end_learns(tmp_path) -> None:
    """`python -m launch.demo` at the sizes above, in its own process: the user's command, and the
    setting the floors were measured in (one CPU device; this test process has 4 virtual ones,
    which on 2 cores made the same run take 623 s instead of 565 s)."""
    import subprocess
    import sys

    sizes = [f"--config.{name}={value}" for name, value in E2E_SIZES.items()]
    run = subprocess.run(
        [sys.executable, "-m", "launch.demo", f"--workdir={tmp_path}", *sizes, "--config.progress=false"],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    written = json.loads((tmp_path / "results.json").read_text())
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
    assert written["baseline_f1"] == 0.0
    # Every floor is checked and a miss reports them all, with every figure (one run is 9 minutes).
    by_kind, bon = written["prm_detection_by_error_kind"], written["bon"]
    low, high = POLICY_ACCURACY_BAND
    floors = {
        # The policy learnt the arithmetic and keeps the mistakes it was shown.
        "policy accuracy in band": low <= written["policy_accuracy"] <= high,
        # MC labels mostly match the checker.
        "MC first error agreement": written["mc_first_error_agreement"] >= MC_AGREEMENT_FLOOR,
        # The PRM learned to flag wrong steps: held-out F1 clearly above always answering "no error".
        "PRM F1": written["prm_f1"] >= PRM_F1_FLOOR,
        # It finds the impossible results (off by ten) the policy learnt to write.
        "out-of-range errors found": by_kind["out_of_range"]["rate"] >= OUT_OF_RANGE_FLOOR,
        # Best-of-N: the PRM's pick beats majority voting over the same responses.
        "prm@4 beats maj@4": bon["prm"] >= bon["maj"] + BON_MARGIN and bon["prm"] <= bon["pass"],
    }
    missed = [name for name, held in floors.items() if not held]
    assert not missed, f"missed {missed}: {written}"


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


# The sizes .ci/run's smoke run uses: enough for every stage to produce records, not to learn.
CI_SIZES = {
    "sft.steps": 40,
    "sft.num_problems": 256,
    "synth.num_problems": 16,
    "prm.steps": 20,
    "eval.num_problems": 16,
}


@pytest.mark.vllm
@pytest.mark.slow
def test_demo_on_vllm_generates_and_scores_through_vllm(tmp_path, monkeypatch) -> None:
    """`backend="vllm"`: the policy engine samples for synthesis and the held-out responses, the
    exported PRM is scored by vLLM's pooling runner; the JAX sampler and scorer are never called.
    Three engines: the policy's, then one scorer per evaluation (ProcessBench, Best-of-N)."""
    import time

    from vllm_assets import require_vllm

    require_vllm()
    from prm_jax.evaluation.scorer import BatchedScorer
    from prm_jax.generation.jax_sampler import JaxSampler
    from prm_jax.generation.vllm_backend import VLLMBackend, VLLMStepScorer

    engines, prompts, scored = [], [], []

    def wrap_init(cls):
        init = cls.__init__

        def timed(self, *args, **kwargs):
            started = time.monotonic()
            init(self, *args, **kwargs)
            engines.append((cls.__name__, time.monotonic() - started))

        monkeypatch.setattr(cls, "__init__", timed)

    for cls in (VLLMBackend, VLLMStepScorer):
        wrap_init(cls)
    generate, score = VLLMBackend.generate, VLLMStepScorer.score
    monkeypatch.setattr(VLLMBackend, "generate", lambda self, p, params: prompts.extend(p) or generate(self, p, params))
    monkeypatch.setattr(VLLMStepScorer, "score", lambda self, inputs: scored.extend(inputs) or score(self, inputs))

    def not_here(*args, **kwargs):
        raise AssertionError("the JAX path ran under backend=vllm")

    monkeypatch.setattr(JaxSampler, "generate", not_here)
    monkeypatch.setattr(BatchedScorer, "score", not_here)
    # The vLLM processes alive when each training starts: none (policy SFT), none again (PRM
    # training: the policy's engine was shut down after its last use; its worker process notices
    # within seconds, so allow it 90 s to go on a loaded machine, where an engine left running would stay).
    import psutil

    from prm_jax.training import run as training_run

    engine_processes = []
    train = training_run.train_from_config

    def vllm_processes() -> int:
        count = 0
        for child in psutil.Process().children(recursive=True):
            try:
                if child.status() != psutil.STATUS_ZOMBIE:
                    count += "VLLM" in " ".join(child.cmdline() or [child.name()])
            except psutil.NoSuchProcess:  # exited meanwhile
                pass
        return count

    def counted(*args, **kwargs):
        deadline = time.monotonic() + 90
        while vllm_processes() and time.monotonic() < deadline:
            time.sleep(0.5)
        engine_processes.append(vllm_processes())
        return train(*args, **kwargs)

    monkeypatch.setattr(training_run, "train_from_config", counted)

    config = small_config(backend="vllm", **CI_SIZES)
    results = demo.run_demo(config, tmp_path, say=lambda line: None)
    print(f"vLLM engines (class, start seconds): {engines}")
    written = json.loads((tmp_path / "results.json").read_text())
    assert written == json.loads(json.dumps(results))
    assert [name for name, _ in engines] == ["VLLMBackend", "VLLMStepScorer", "VLLMStepScorer"]
    assert engine_processes == [0, 0]
    assert written["backends"] == {
        "synthesis": "VLLMBackend",
        "eval_sampling": "VLLMBackend",
        "processbench": "vllm",
        "bon": "vllm",
    }
    run_config = json.loads((tmp_path / "synth" / "run_config.json").read_text())
    assert run_config["policy.backend"] == "vllm" and run_config["policy.model_path"] == str(tmp_path / "policy_hf")
    for task in ("processbench_results", "bon_results"):
        assert json.loads((tmp_path / "eval" / task / "results.json").read_text())["run"]["backend"] == "vllm"
    # vLLM generated every synthesis sample and MC rollout and every held-out response...
    samples = list(
        read_records_if_exists(Layout(tmp_path / "synth").records("sample", Shard()), SampleRecord.from_json)
    )
    mcs = list(read_records_if_exists(Layout(tmp_path / "synth").records("mc", Shard()), MCRecord.from_json))
    rollouts = sum(r.cost.prefixes for r in mcs)
    assert len(samples) == 16 and rollouts > 0
    assert len(prompts) == len(samples) + rollouts + CI_SIZES["eval.num_problems"]
    # ...and scored every held-out response twice (ProcessBench records, then Best-of-N candidates).
    n_records = written["eval_records"]["n_err"] + written["eval_records"]["n_ok"]
    assert n_records == CI_SIZES["eval.num_problems"] * config.eval.n and len(scored) == 2 * n_records
    for name in (
        "policy_accuracy",
        "policy_process_accuracy",
        "synth_policy_accuracy",
        "mc_first_error_agreement",
        "consensus_keep_rate",
        "prm_f1",
        "prm_acc_err",
        "prm_acc_ok",
        "baseline_f1",
    ):
        assert name in written, name
    assert {"prm", "maj", "pass", "prm_by_aggregation"} <= written["bon"].keys()
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert {"policy_export", "policy_engine", "synthesis", "eval_sampling", "evaluate"} <= timings.keys()
    for artifact in ("policy_hf/config.json", "prm_hf/config.json", "results.png", "bon.png"):
        assert (tmp_path / artifact).exists(), artifact
