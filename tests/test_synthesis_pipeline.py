"""The synthesis pipeline with a scripted policy and judge: bad input, resume, shards, merge, readers."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from data_pipeline.config import default_config
from data_pipeline.context import SynthesisError
from data_pipeline.grading import GradingPool
from data_pipeline.pipeline import run
from data_pipeline.problems import read_problems
from data_pipeline.schemas import ErrorRecord, MCRecord, Problem, SampleRecord
from data_pipeline.scripted import ScriptedBackend
from data_pipeline.shards import Layout, Shard, exclusive_lock
from prm_jax.data.records import read_prm_records
from prm_jax.jsonl import AppendOnlyWriter, DataError, read_records

SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


def world(prompt: str, index: int, params) -> str:
    """A policy and judge in one: deterministic, with a known right answer for every label.

    Response j to "What is a + b?": 0 is right; 1 errs visibly ("bad") at step 0; 2 errs subtly
    ("subtle") at step 1, which MC catches and the judge misses; 3 is right. Rollouts from a
    prefix are right for even completion indices unless the prefix holds an error. The judge
    names the first "bad" paragraph. "empty" problems get an empty response 1.
    """
    if "[Math Problem]" in prompt:
        paragraphs = re.findall(r"<paragraph_(\d+)>\n(.*?)\n</paragraph_\1>", prompt, flags=re.S)
        bad = [int(i) for i, text in paragraphs if "bad" in text]
        return f"Reviewing... \\boxed{{{bad[0] if bad else -1}}}"
    body = prompt.split(SYSTEM + "\n\n", 1)[1]
    problem, _, prefix = body.partition("?\n\n")
    a, b = map(int, re.findall(r"\d+", problem)[:2])
    if not prefix:  # the sampling prompt
        if "empty" in problem and index == 1:
            return ""
        return [
            f"We add {a} and {b}.\n\nThe sum is \\boxed{{{a + b}}}.",
            f"We subtract, a bad idea.\n\nSo {a} - {b}.\n\nThe answer is \\boxed{{{a - b}}}.",
            f"We add {a} and {b}.\n\nA subtle slip: carry one.\n\nSo \\boxed{{{a + b + 1}}}.",
            f"First {a}.\n\nThen plus {b}.\n\nTotal: \\boxed{{{a + b}}}.",
        ][index % 4]
    broken = "bad" in prefix or "subtle" in prefix
    return f"... \\boxed{{{a + b if index % 2 == 0 and not broken else 0}}}"


def write_problems(path: Path, lines: list[str | dict]) -> Path:
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return path


def make_config(problems: Path, **overrides):
    c = default_config()
    c.problems.path = str(problems)
    c.sample.n = 4
    c.mc.k = 4
    c.io.progress = False
    c.sample.batch_size = 3
    c.mc.batch_responses = 3
    c.judge.batch_size = 5
    for dotted, value in overrides.items():
        section, _, field = dotted.partition("__")
        if field:
            c[section][field] = value
        else:
            c[section] = value
    return c


def run_scripted(config, workdir: Path, **kwargs) -> ScriptedBackend:
    backend = ScriptedBackend(world)
    run(config, workdir, policy=backend, judge=backend, grader=GradingPool(workers=0), **kwargs)
    return backend


GOOD = [{"id": f"q{i}", "problem": f"What is {i} + {2 * i}?", "answer": str(3 * i)} for i in range(1, 6)]


def final_outputs(workdir: Path) -> tuple[str, dict]:
    summary = json.loads((workdir / "summary.json").read_text())
    return (workdir / "consensus" / "prm_train.jsonl").read_text(), summary


def test_pipeline_labels_keep_and_drop_as_scripted(tmp_path) -> None:
    problems = write_problems(tmp_path / "problems.jsonl", GOOD[:2])
    run_scripted(make_config(problems), tmp_path / "w")
    records = {r.id: r for r in read_prm_records(tmp_path / "w" / "consensus" / "prm_train.jsonl")}
    # Responses 0 and 3 are right (MC -1, judge -1), 1 errs at step 0 (both say 0): kept. Response 2's
    # subtle slip is found by MC (1) but not by the judge (-1): dropped.
    assert sorted(records) == ["q1#0", "q1#1", "q1#3", "q2#0", "q2#1", "q2#3"]
    assert records["q1#1"].labels == (0.0,) and records["q1#1"].steps == ("We subtract, a bad idea.",)
    assert records["q1#3"].labels == (1.0, 1.0, 1.0) and records["q1#3"].hard_labels
    _, summary = final_outputs(tmp_path / "w")
    assert summary["keep_rate"] == 0.75
    assert summary["counts"]["consensus"]["dropped"] == {"disagree": 2}
    assert summary["mc_judge_agreement"]["matrix_rows_mc_cols_judge"] == {
        "-1": {"-1": 4},
        "0": {"0": 2},
        "1": {"-1": 2},
    }
    # Early stop: response 1 stops at step 0 (1 of 2 prefixes), response 2 at step 1 (2 of 2).
    compute = summary["mc_compute"]
    assert (compute["prefixes_run"], compute["prefixes_full"]) == (2 * (1 + 1 + 2 + 2), 2 * (1 + 2 + 2 + 2))
    assert compute["completions_run"] == 4 * compute["prefixes_run"]


def test_soft_labels_and_ablation_modes_recompute_consensus(tmp_path) -> None:
    problems = write_problems(tmp_path / "problems.jsonl", GOOD[:2])
    config = make_config(problems)
    run_scripted(config, tmp_path / "w")
    soft = make_config(problems, consensus__label_type="soft")
    run_scripted(soft, tmp_path / "w")  # consensus settings may change on a finished workdir
    records = {r.id: r for r in read_prm_records(tmp_path / "w" / "consensus" / "prm_train.jsonl")}
    assert not records["q1#3"].hard_labels and records["q1#3"].labels == (0.5, 0.5, 1.0)
    mc_only = make_config(problems, consensus__mode="mc")
    run_scripted(mc_only, tmp_path / "w")
    records = {r.id: r for r in read_prm_records(tmp_path / "w" / "consensus" / "prm_train.jsonl")}
    assert len(records) == 8 and records["q1#2"].labels == (1.0, 0.0)


def test_bad_input_becomes_counted_error_records(tmp_path) -> None:
    lines = [
        GOOD[0],
        "{not json",
        "[1, 2, 3]",
        {"id": "no-answer", "problem": "What is 1 + 1?"},
        {"id": "blank", "problem": " ", "answer": "1"},
        {"id": "q1", "problem": "What is 9 + 9?", "answer": "18"},  # duplicate id
        {"id": "e1", "problem": "What is 2 + 2, empty?", "answer": "4"},
    ]
    problems = write_problems(tmp_path / "problems.jsonl", lines)
    run_scripted(make_config(problems), tmp_path / "w")
    layout = Layout(tmp_path / "w")
    errors = read_records(layout.errors("sample", Shard()), ErrorRecord.from_json)
    by_kind = {(e.error, e.source.rsplit(":", 1)[1] if e.source else None) for e in errors}
    assert by_kind == {
        ("malformed_json", "2"),
        ("malformed_json", "3"),
        ("missing_answer", "4"),
        ("missing_field", "5"),
        ("duplicate_id", "6"),
        ("empty_response", "7"),
    }
    _, summary = final_outputs(tmp_path / "w")
    assert summary["errors"]["input"] == {
        "duplicate_id": 1,
        "malformed_json": 2,
        "missing_answer": 1,
        "missing_field": 1,
    }
    assert summary["errors"]["sample"] == {"empty_response": 1} and summary["errors"]["total"] == 6
    counts = summary["counts"]
    assert counts["sample"]["empty_responses"] == 1 and counts["grade"]["status"]["empty"] == 1
    assert counts["mc"]["skipped"] == {"no_steps": 1} and counts["judge"]["skipped"] == {"no_steps": 1}
    # Nothing is lost: every sampled response is kept or dropped with a reason.
    consensus = counts["consensus"]
    assert consensus["candidates"] == counts["sample"]["responses"] == 8
    assert consensus["kept"] + sum(consensus["dropped"].values()) == 8


@pytest.mark.parametrize(
    "lines, match",
    [
        ([GOOD[0], "{not json"], r"problems\.jsonl:2: malformed_json"),
        ([GOOD[0], {"id": "x", "problem": "What is 1 + 1?"}], r"problems\.jsonl:2: missing_answer"),
        ([{"id": "e", "problem": "What is 2 + 2, empty?", "answer": "4"}], r"problems\.jsonl:1: empty_response"),
    ],
)
def test_on_error_stop_stops_cleanly(tmp_path, lines, match) -> None:
    problems = write_problems(tmp_path / "problems.jsonl", lines)
    with pytest.raises(SynthesisError, match=match):
        run_scripted(make_config(problems, on_error="stop"), tmp_path / "w")
    assert not Layout(tmp_path / "w").done("sample", Shard()).exists()


def test_rerun_is_idempotent_and_a_crash_mid_mc_resumes_exactly(tmp_path) -> None:
    problems = write_problems(tmp_path / "problems.jsonl", GOOD)
    reference = tmp_path / "reference"
    run_scripted(make_config(problems), reference)
    again = run_scripted(make_config(problems), reference)
    assert again.requests == []  # everything was done: no generation at all
    expected = final_outputs(reference)

    # A run killed during mc: 3 MC records, then half a line; the mc marker and later stages absent.
    crashed = tmp_path / "crashed"
    shutil.copytree(reference, crashed)
    layout = Layout(crashed)
    mc_lines = layout.records("mc", Shard()).read_text().splitlines(keepends=True)
    layout.records("mc", Shard()).write_text("".join(mc_lines[:3]) + mc_lines[3][:25])
    for path in (
        layout.done("mc", Shard()),
        layout.records("judge", Shard()),
        layout.done("judge", Shard()),
        layout.final_records,
        layout.summary,
    ):
        path.unlink()
    shutil.rmtree(crashed / "consensus")
    resumed = run_scripted(make_config(problems), crashed)
    assert final_outputs(crashed) == expected
    mc_records = read_records(layout.records("mc", Shard()), MCRecord.from_json)  # no duplicate ids
    assert len(mc_records) == 5 * 4
    mc_requests = [r for r in resumed.requests if "[Math Problem]" not in r.prompt]
    assert sum(r.params.n == 4 for r in mc_requests) < sum(rec.cost.prefixes for rec in mc_records)


def test_shards_are_disjoint_and_the_merge_is_deterministic(tmp_path) -> None:
    problems = write_problems(tmp_path / "problems.jsonl", GOOD)
    run_scripted(make_config(problems), tmp_path / "one")
    sharded = tmp_path / "three"
    for index in (2, 0, 1):  # any order; the last one to finish merges
        run_scripted(make_config(problems), sharded, shard=Shard(index, 3))
    one_records, one_summary = final_outputs(tmp_path / "one")
    three_records, three_summary = final_outputs(sharded)
    assert three_records == one_records  # byte-identical, sorted by id
    assert three_summary["counts"] == one_summary["counts"] and three_summary["num_shards"] == 3
    ids = [
        set(s.id for s in read_records(Layout(sharded).records("sample", Shard(i, 3)), SampleRecord.from_json))
        for i in range(3)
    ]
    assert sum(len(s) for s in ids) == len(set().union(*ids)) == 5


def test_merge_waits_for_every_shard(tmp_path) -> None:
    problems = write_problems(tmp_path / "problems.jsonl", GOOD)
    run_scripted(make_config(problems), tmp_path / "w", shard=Shard(0, 2))
    assert not Layout(tmp_path / "w").final_records.exists()
    with pytest.raises(SynthesisError, match="shard-00001-of-00002"):
        run_scripted(make_config(problems), tmp_path / "w", stage="merge", shard=Shard(0, 2))


def test_workdir_refuses_other_settings_and_stages_run_in_order(tmp_path) -> None:
    problems = write_problems(tmp_path / "problems.jsonl", GOOD[:1])
    with pytest.raises(SynthesisError, match="stage 'grade' has not finished"):
        run_scripted(make_config(problems), tmp_path / "w", stage="mc")
    run_scripted(make_config(problems), tmp_path / "w", stage="sample")
    with pytest.raises(SynthesisError, match=r"mc\.k: 4 -> 8"):
        run_scripted(make_config(problems, mc__k=8), tmp_path / "w")
    with pytest.raises(SynthesisError, match="num_shards"):
        run_scripted(make_config(problems), tmp_path / "w", shard=Shard(0, 2))
    # A workdir recorded before judge.prompt existed resumes with the prompt it used, and only that one.
    layout = Layout(tmp_path / "w")
    recorded = json.loads(layout.run_config.read_text())
    del recorded["judge.prompt"]
    layout.run_config.write_text(json.dumps(recorded))
    run_scripted(make_config(problems), tmp_path / "w", stage="sample")
    with pytest.raises(SynthesisError, match=r"judge\.prompt: 'processbench' -> 'paper'"):
        run_scripted(make_config(problems, judge__prompt="paper"), tmp_path / "w")
    # Recorded before the vote rule was a setting: one judge sample resumes; several voted by a
    # strict majority, so their verdicts would mix with critic_vote's pluralities: refused.
    del recorded["judge.vote"]
    layout.run_config.write_text(json.dumps(recorded))
    run_scripted(make_config(problems), tmp_path / "w", stage="sample")
    recorded.update({"judge.num_samples": 4, "judge.vote_threshold": 0.5})
    layout.run_config.write_text(json.dumps(recorded))
    with pytest.raises(SynthesisError, match=r"judge\.vote: 'strict majority \(judge\.vote_threshold=0\.5\)'"):
        run_scripted(
            make_config(problems, judge__num_samples=4, judge__temperature=0.8), tmp_path / "w", stage="sample"
        )
    problems.write_text(problems.read_text().replace("1 + 2", "1 + 3"))
    with pytest.raises(SynthesisError, match="problems.sha256"):
        run_scripted(make_config(problems), tmp_path / "w")


def test_corrupted_stage_files_are_reported_with_file_and_line(tmp_path) -> None:
    problems = write_problems(tmp_path / "problems.jsonl", GOOD[:2])
    run_scripted(make_config(problems), tmp_path / "w")
    layout = Layout(tmp_path / "w")
    grades = layout.records("grade", Shard())
    lines = grades.read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace('"status": "', '"status": "maybe_')
    grades.write_text("".join(lines))
    with pytest.raises(DataError, match=r"grade/shard-00000-of-00001\.jsonl:3: field 'status'"):
        run_scripted(make_config(problems), tmp_path / "w", stage="consensus")


def test_append_only_writer_repairs_a_torn_tail_and_never_duplicates(tmp_path) -> None:
    path = tmp_path / "errors.jsonl"
    record = ErrorRecord(id="a", stage="s", error="e", message="m")
    with AppendOnlyWriter(path, ErrorRecord.from_json) as writer:
        assert writer.write(record) and not writer.write(record)
    with open(path, "ab") as f:
        f.write(b'{"id": "b", "stage"')  # killed mid-write
    with AppendOnlyWriter(path, ErrorRecord.from_json) as writer:
        assert writer.dropped_tail and writer.ids == {"a"}
        assert writer.write(ErrorRecord(id="b", stage="s", error="e", message="m"))
    assert [r.id for r in read_records(path, ErrorRecord.from_json)] == ["a", "b"]
    # A record longer than the line limit is refused before a byte is written (a reopen could not read it).
    with AppendOnlyWriter(path, ErrorRecord.from_json, max_line_bytes=200) as writer:
        with pytest.raises(DataError, match=r"record 'c' is \d+ bytes as JSON, over the 200-byte line limit"):
            writer.write(ErrorRecord(id="c", stage="s", error="e", message="m" * 300))
        assert writer.write(ErrorRecord(id="d", stage="s", error="e", message="m"))
    assert [r.id for r in read_records(path, ErrorRecord.from_json)] == ["a", "b", "d"]
    path.write_text('{"broken\n' + path.read_text())
    with pytest.raises(DataError, match=r"errors\.jsonl:1: malformed JSON"):
        AppendOnlyWriter(path, ErrorRecord.from_json)
    with exclusive_lock(tmp_path / "x.lock"):
        with pytest.raises(RuntimeError, match="another process"):
            with exclusive_lock(tmp_path / "x.lock"):
                pass


def test_shards_and_problems_read_like_every_record_file(tmp_path) -> None:
    """The rules of `prm_jax.jsonl`: a BOM only at the start, a bounded line, JSON type names, a
    named torn tail, non-blank ids, and duplicates named with their first line."""
    path = tmp_path / "errors.jsonl"
    line = json.dumps(ErrorRecord(id="a", stage="s", error="e", message="m").to_json(), sort_keys=True)
    path.write_bytes(b"\xef\xbb\xbf" + line.encode() + b"\n")
    assert [r.id for r in read_records(path, ErrorRecord.from_json)] == ["a"]
    with AppendOnlyWriter(path, ErrorRecord.from_json) as writer:
        assert writer.ids == {"a"} and not writer.dropped_tail
        assert writer.write(ErrorRecord(id="b", stage="s", error="e", message="m"))
    assert [r.id for r in read_records(path, ErrorRecord.from_json)] == ["a", "b"]
    with pytest.raises(DataError, match=r"errors\.jsonl:1: line longer than the limit of 20 bytes"):
        read_records(path, ErrorRecord.from_json, max_line_bytes=20)
    for text, message in (
        (line + "\n[1]\n", r":2: expected a JSON object, got array"),
        (line + "\n" + line[:10], r":2: malformed JSON.*the last line has no newline"),
        (line.replace('"id": "a"', '"id": " "') + "\n", r":1: field 'id': must be a non-empty string"),
        (line + "\n" + line + "\n", r":2: field 'id': duplicate id 'a' \(first seen on line 1\)"),
    ):
        path.write_text(text)
        with pytest.raises(DataError, match=message):
            read_records(path, ErrorRecord.from_json)
    with pytest.raises(DataError, match=r"errors\.jsonl:2: field 'id': duplicate id 'a' \(first seen on line 1\)"):
        AppendOnlyWriter(path, ErrorRecord.from_json)
    problems = tmp_path / "problems.jsonl"
    problems.write_bytes(b"\xef\xbb\xbf" + json.dumps({"id": "p", "problem": "1 + 1?", "answer": "2"}).encode())
    assert [p.id for p in read_problems(problems)] == ["p"]


def test_gsm8k_and_math_readers(tmp_path) -> None:
    gsm8k = write_problems(
        tmp_path / "gsm8k.jsonl",
        [
            {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
            {"question": "A dozen eggs cost $2. Cost of 60?", "answer": "60 / 12 * 2 = 10\n#### 10"},
            {"question": "No gold here", "answer": "it is seven"},
        ],
    )
    first = list(read_problems(gsm8k, "gsm8k"))
    assert [type(x) for x in first] == [Problem, Problem, ErrorRecord]
    assert first[0].answer == "7" and first[0].id.startswith("gsm8k-") and first[2].error == "missing_answer"
    assert [x.id for x in read_problems(gsm8k, "gsm8k")][:2] == [first[0].id, first[1].id]  # stable ids
    math = write_problems(
        tmp_path / "math.jsonl",
        [
            {"problem": "Compute $\\frac{1}{2}+\\frac{1}{4}$.", "solution": "It is $\\boxed{\\frac{3}{4}}$."},
            {"problem": "Find x.", "solution": "x = 2", "answer": "2", "unique_id": "test/algebra/1.json"},
            {"problem": "Find y.", "solution": "no box"},
        ],
    )
    items = list(read_problems(math, "math"))
    assert items[0].answer == "\\frac{3}{4}" and items[0].id.startswith("math-")
    assert items[1].id == "test/algebra/1.json" and items[1].answer == "2"
    assert isinstance(items[2], ErrorRecord) and items[2].error == "missing_answer"
    plain = write_problems(tmp_path / "plain.jsonl", [{"id": 7, "problem": "What is 3 + 4?", "answer": 7}])
    (problem,) = read_problems(plain, "jsonl")
    assert (problem.id, problem.answer) == ("7", "7")


def test_launcher_stops_cleanly_on_bad_input(tmp_path) -> None:
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    problems = write_problems(tmp_path / "problems.jsonl", [GOOD[0], {"id": "x", "problem": "What is 1 + 1?"}])
    model = tmp_path / "model"  # exists (validated up front); never loaded: the bad line stops the run first
    model.mkdir()
    (model / "config.json").write_text("{}")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.synthesize",
            f"--config={repo / 'configs' / 'synth_tiny.py'}",
            f"--workdir={tmp_path / 'w'}",
            f"--config.problems.path={problems}",
            "--config.on_error=stop",
            f"--config.policy.model_path={model}",
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "problems.jsonl:2: missing_answer" in result.stderr and "Traceback" not in result.stderr


def test_context_stops_the_engines_it_built_and_frees_the_policys_before_a_second_judge(tmp_path, monkeypatch) -> None:
    """A vLLM engine holds its GPUs until closed: the context closes what it built (never what it was
    given), and frees the policy's engine before starting a judge on another model."""
    import data_pipeline.backends as backends
    from data_pipeline.context import StageContext

    events = []

    class Engine:
        def __init__(self, section, seed=0):
            self.name = section.model_path
            events.append(("start", self.name))

        def close(self):
            events.append(("close", self.name))

    monkeypatch.setattr(backends, "build_backend", Engine)
    config = default_config()
    config.policy.model_path, config.judge.model_path = "policy-model", "judge-model"
    ctx = StageContext(config, Layout(tmp_path), Shard(0, 1))
    ctx.policy_backend(), ctx.judge_backend()
    assert events == [("start", "policy-model"), ("close", "policy-model"), ("start", "judge-model")]
    ctx.close()
    assert events[-1] == ("close", "judge-model") and len(events) == 4

    events.clear()
    config.judge.model_path = ""  # the judge shares the policy's engine: one start, one close
    ctx = StageContext(config, Layout(tmp_path), Shard(0, 1))
    assert ctx.judge_backend() is ctx.policy_backend()
    ctx.close()
    assert events == [("start", "policy-model"), ("close", "policy-model")]

    given = Engine(config.policy)  # injected: the caller's to close
    events.clear()
    ctx = StageContext(config, Layout(tmp_path), Shard(0, 1), policy=given)
    ctx.judge_backend()
    ctx.close()
    assert events == []
