"""launch.lessons: the label-quality measures, the verdicts, and the small scale end to end (twice: the
same seed gives the same lessons.json), plus the committed default-scale report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch import lessons_pipeline as lp
from launch import lessons_report as lr

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- label quality


@pytest.mark.parametrize(
    ("labeller", "truth", "num_steps", "expected"),
    [
        (-1, -1, 4, (0, 0, 0)),  # both clean: four correct positives
        (2, 2, 4, (1, 0, 0)),  # exact: its 0 label is a true error
        (1, 2, 4, (0, 1, 0)),  # too early: a correct step labelled 0
        (3, 1, 4, (1, 0, 2)),  # too late: steps 1 and 2 labelled 1 though the prefix is wrong; step 3 is a true 0
        (-1, 1, 4, (0, 0, 3)),  # missed: steps 1..3 are errors labelled 1
        (2, -1, 4, (0, 1, 0)),  # a false alarm on a clean response
    ],
)
def test_step_confusion_over_the_labels_a_record_carries(labeller, truth, num_steps, expected) -> None:
    assert lp.step_confusion(labeller, truth, num_steps) == expected


def test_label_quality_adds_up_the_responses() -> None:
    pairs = [(-1, -1, 3), (1, 1, 3), (0, 2, 3), (-1, 0, 2)]
    q = lp.label_quality(pairs, candidates=8)
    assert q["records"] == 4 and q["keep_rate"] == 0.5 and q["with_error"] == 2
    assert q["first_error_agreement"] == 0.5
    assert q["error_precision"] == 0.5  # (1,1) right, (0,2) a false alarm
    assert q["error_recall"] == pytest.approx(1 / 3)  # (-1,0) misses steps 0 and 1


def test_soft_label_error_against_the_prefix_truth() -> None:
    records = [{"id": "a", "labels": [1.0, 0.5, 0.0]}, {"id": "b", "labels": [0.75]}]
    assert lp.soft_label_error(records, {"a": 2, "b": -1}) == pytest.approx((0 + 0.25 + 0 + 0.0625) / 4)


# ---------------------------------------------------------------------------- verdicts


def _lessons(f1: dict[str, list[float]]) -> dict:
    return {
        "arms": [
            {"name": name, "figures": {"f1": lp._mean_std(values), "prm_product": lp._mean_std(values)}}
            for name, values in f1.items()
        ]
    }


def test_a_difference_inside_the_seeds_noise_is_not_a_finding() -> None:
    lessons = _lessons({"a": [0.90, 0.95, 0.85], "b": [0.88, 0.93, 0.86], "c": [0.70, 0.71, 0.69]})
    assert not lr.difference(lessons, "a", "b")["beyond_noise"]
    d = lr.difference(lessons, "a", "c")
    assert d["beyond_noise"] and d["diff"] == pytest.approx(0.2)
    # Without spread, a difference under half a point is still not a finding.
    assert not lr.difference(_lessons({"a": [0.9] * 3, "b": [0.898] * 3}), "a", "b")["beyond_noise"]


def test_kendall_tau() -> None:
    assert lr.kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0
    assert lr.kendall_tau([1, 2, 3], [30, 20, 10]) == -1.0
    assert lr.kendall_tau([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(4 / 6)


def test_a_bad_lessons_config_is_refused_naming_the_field() -> None:
    config = lp.default_config()
    config.lessons.judge_error_rates = (0.2, 0.3)  # neither the judge arm's rate nor the checker
    config.lessons.seeds = 0
    problems = "\n".join(lp.validate_config(config))
    assert "lessons.judge_error_rates" in problems and "judge.error_rate=0.1" in problems
    assert "must include 0.0" in problems and "lessons.seeds" in problems


def test_small_scale_keeps_what_a_flag_set() -> None:
    config = lp.default_config()
    config.scale = "small"
    config.prm.steps = 7
    small = lp.scaled(config)
    assert small.prm.steps == 7 and small.sft.steps == lp.SMALL_SCALE["sft.steps"]
    assert tuple(small.lessons.judge_error_rates) == lp.SMALL_SCALE["lessons.judge_error_rates"]
    assert lp.scaled(lp.default_config()).sft.steps == lp.default_config().sft.steps


# ---------------------------------------------------------------------------- end to end


def _start(workdir: Path) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "launch.lessons",
        f"--workdir={workdir}",
        "--config.scale=small",
        "--config.progress=false",
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)


def _finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output[-3000:]


@pytest.mark.slow
def test_small_scale_writes_every_arm_and_finding_and_a_rerun_resumes(tmp_path) -> None:
    first = tmp_path / "a"
    _finish(_start(first))
    lessons = json.loads((first / "lessons.json").read_text())

    config = lp.default_config()
    config.scale = "small"
    expected_arms = [arm.name for arm in lp.arms(lp.scaled(config))]
    assert [arm["name"] for arm in lessons["arms"]] == expected_arms
    for arm in lessons["arms"]:
        assert len(arm["seeds"]) == 3 and len(set(arm["seeds"])) == 3
        assert len(arm["figures"]["prm_product"]["values"]) == 3
        assert (first / "arms" / arm["name"] / f"seed{arm['seeds'][0]}" / "prm_hf" / "model.safetensors").is_file()
    assert {f["reproduced"] for f in lessons["findings"]} <= {lr.REPRODUCED, lr.NOT_REPRODUCED, lr.NOT_COMPARABLE}
    for finding in lessons["findings"]:
        assert finding["paper"] and finding["measured"] and finding["reason"]
    report = (first / "lessons_reproduced.md").read_text()
    assert all(f"`{name}`" in report for name in expected_arms)
    assert all((first / "lessons_reproduced" / png).is_file() for png in ("lessons_f1.png", "lessons_noise.png"))
    # Every labeller's training set, and the MC threshold swept over 0..(k-1)/k.
    quality = lessons["label_quality"]
    assert [row["threshold"] for row in quality["mc_threshold_sweep"]] == [j / 8 for j in range(8)]
    assert quality["labellers"]["checker"]["first_error_agreement"] == 1.0  # the checker is the truth

    # A rerun in the same workdir resumes (nothing retrained) and writes the same file.
    before = {p: p.stat().st_mtime_ns for p in (first / "arms").rglob("figures.json")}
    _finish(_start(first))
    assert {p: p.stat().st_mtime_ns for p in (first / "arms").rglob("figures.json")} == before
    assert json.loads((first / "lessons.json").read_text()) == lessons


@pytest.mark.redundant
def test_small_scale_twice_gives_the_same_lessons(tmp_path) -> None:
    """Redundant with `test_demo.py::test_demo_same_seed_same_results`, which holds every stage the
    lessons run is made of to its seed; this repeats it for the whole lessons run (two small-scale
    runs side by side: about 5 minutes on 2 cores)."""
    runs = [_start(tmp_path / name) for name in ("a", "b")]
    for process in runs:
        _finish(process)
    assert (tmp_path / "a" / "lessons.json").read_text() == (tmp_path / "b" / "lessons.json").read_text()


def test_the_committed_report_is_the_default_scale_run() -> None:
    report = (REPO / "docs" / "lessons_reproduced.md").read_text()
    assert "scale `default`" in report and "3 PRM seeds per arm" in report
    for arm in lp.arms(lp.default_config()):
        assert f"`{arm.name}`" in report, f"docs/lessons_reproduced.md has no arm {arm.name}"
    for png in ("lessons_f1.png", "lessons_thresholds.png", "lessons_noise.png", "lessons_data_size.png"):
        assert (REPO / "docs" / "lessons_reproduced" / png).is_file()
    readme = (REPO / "README.md").read_text()
    assert "docs/lessons_reproduced.md" in readme


def test_launch_lessons_refuses_a_bad_config_before_writing_anything(tmp_path) -> None:
    workdir = tmp_path / "w"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.lessons",
            f"--workdir={workdir}",
            "--config.lessons.seeds=0",
            "--config.scale=tiny",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--config.lessons.seeds=0" in result.stderr and "--config.scale='tiny'" in result.stderr
    assert not workdir.exists()


def test_a_resume_with_other_settings_is_refused_but_progress_may_change(tmp_path) -> None:
    config = lp.default_config()
    lp.check_run_config(config, tmp_path)
    config.progress = False  # a runtime setting
    lp.check_run_config(config, tmp_path)
    config.prm.steps = 50
    config.lessons.data_fractions = (0.5,)
    with pytest.raises(ValueError, match=r"other lessons settings \(lessons.data_fractions, prm.steps"):
        lp.check_run_config(config, tmp_path)


def test_an_undefined_figure_makes_a_finding_not_comparable() -> None:
    finding = {"reproduced": lr.REPRODUCED, "reason": "x", "comparisons": [{"diff": float("nan")}]}
    assert lr._undefined(finding)["reproduced"] == lr.NOT_COMPARABLE
    assert lr._undefined({**finding, "comparisons": [{"diff": 0.1}]})["reproduced"] == lr.REPRODUCED


def test_arms_at_the_checkers_ceiling_cannot_be_told_apart() -> None:
    lessons = _lessons({"checker": [0.99, 0.99, 0.99], "a": [0.99, 0.991, 0.99], "b": [0.80, 0.85, 0.82]})
    assert lr.at_ceiling(lessons, ["a"]) and not lr.at_ceiling(lessons, ["a", "b"])


def test_one_seed_or_a_repeated_rate_is_refused() -> None:
    config = lp.default_config()
    config.lessons.seeds = 1
    config.lessons.judge_error_rates = (0.0, 0.1, 0.1)
    problems = "\n".join(lp.validate_config(config))
    assert "lessons.seeds=1" in problems and "has a value twice" in problems
