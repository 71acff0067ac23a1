"""Evaluation inputs: the three schemas, JSON Lines and JSON arrays, and bad input named by
file, line and field (predictions joined against the data included)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import prm_jax.evaluation.records as records_module
from prm_jax.evaluation.records import EvaluationDataError, read_bon, read_predictions, read_processbench
from prm_jax.evaluation.tasks import processbench_with_predictions


def pb(record_id: str, label: int = -1, steps: list[str] | None = None, **extra) -> dict:
    return {
        "id": record_id,
        "generator": "policy",
        "problem": f"Problem {record_id}",
        "steps": steps if steps is not None else ["a", "b", "c"],
        "final_answer_correct": True,
        "label": label,
        **extra,
    }


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def bad(path: Path, reader=read_processbench) -> EvaluationDataError:
    with pytest.raises(EvaluationDataError) as info:
        list(reader(path))
    assert isinstance(info.value, ValueError)
    return info.value


# ---------------------------------------------------------------------------- formats


def test_directory_of_subset_files_json_array_and_jsonl(tmp_path) -> None:
    (tmp_path / "gsm8k.json").write_text(json.dumps([pb("g-0"), pb("g-1", 2)], indent=2))
    write_jsonl(tmp_path / "math.jsonl", [pb("m-0", 0), pb("m-1", subset="custom")])
    (tmp_path / "notes.txt").write_text("ignored")
    records = list(read_processbench(tmp_path))
    assert [(r.id, r.subset, r.label) for r in records] == [
        ("g-0", "gsm8k", -1),
        ("g-1", "gsm8k", 2),
        ("m-0", "math", 0),
        ("m-1", "custom", -1),
    ]
    assert records[1].source == f"{tmp_path / 'gsm8k.json'}:14"  # the line the element starts on
    assert records[3].source == f"{tmp_path / 'math.jsonl'}:2"
    assert records[0].steps == ("a", "b", "c") and records[0].final_answer_correct is True


def test_json_lines_in_a_json_file_are_sniffed(tmp_path) -> None:
    write_jsonl(tmp_path / "omnimath.json", [pb("o-0"), pb("o-1")])  # datasets' to_json default
    assert [r.subset for r in read_processbench(tmp_path / "omnimath.json")] == ["omnimath"] * 2


def test_json_array_streams_across_small_read_chunks(tmp_path, monkeypatch) -> None:
    rows = [pb(f"g-{i}", steps=["é" * i + "\n" + "}" * i, "{[", "x"]) for i in range(20)]
    (tmp_path / "gsm8k.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False), encoding="utf-8")
    monkeypatch.setattr(records_module, "_READ_CHUNK", 7)
    records = list(read_processbench(tmp_path / "gsm8k.json"))
    assert [r.steps[0] for r in records] == [row["steps"][0] for row in rows]
    bad_text = json.dumps(rows, indent=1).replace('"id": "g-13"', '"id": "g-13" "oops": 1')
    (tmp_path / "bad.json").write_text(bad_text)
    line = bad_text[: bad_text.index('"oops"')].count("\n") + 1
    with pytest.raises(EvaluationDataError, match=f"bad.json:{line}: malformed JSON.*element 13"):
        list(read_processbench(tmp_path / "bad.json"))
    (tmp_path / "empty.json").write_text("[ ]")
    assert list(read_processbench(tmp_path / "empty.json")) == []


def test_optional_fields(tmp_path) -> None:
    row = {"id": "x", "problem": "p", "steps": ["s"], "label": 0}
    (record,) = read_processbench(write_jsonl(tmp_path / "s.jsonl", [row]))
    assert record.final_answer_correct is None and record.generator == ""


# ---------------------------------------------------------------------------- bad ProcessBench input


def test_malformed_json_names_file_and_line(tmp_path) -> None:
    path = write_jsonl(tmp_path / "gsm8k.jsonl", [pb("a"), "", '{"id": "b", "problem": '])
    error = bad(path)
    assert f"{path}:3" in str(error) and "malformed JSON" in str(error)


def test_malformed_json_array_element_names_its_line(tmp_path) -> None:
    path = tmp_path / "gsm8k.json"
    path.write_text(json.dumps([pb("a"), pb("b")], indent=2)[:-6] + "]")
    assert f"{path}:" in str(bad(path))
    path.write_text(f"[{json.dumps(pb('a'))}\n {json.dumps(pb('b'))}]")
    assert "expected ',' or ']'" in str(bad(path))
    path.write_text("[1, 2]")
    assert "expected a JSON object" in str(bad(path))


@pytest.mark.parametrize(
    "row, field, message",
    [
        ({k: v for k, v in pb("a").items() if k != "problem"}, "problem", "missing"),
        (pb("a", steps="one step"), "steps", "array of step strings"),
        (pb("a", steps=[]), "steps", "empty"),
        (pb("a", steps=["ok", 3]), "steps", "step 1"),
        (pb("a", label=True), "label", "integer"),
        (pb("a", label=-2), "label", "out of range"),
        (pb("a", label=3), "label", "out of range"),  # 3 steps: 0..2
        (pb("a", label="1"), "label", "integer"),
        (pb(7), "id", "string"),
        (pb("  "), "id", "non-empty"),
        (pb("a", final_answer_correct="yes"), "final_answer_correct", "true or false"),
    ],
)
def test_bad_processbench_fields(tmp_path, row, field, message) -> None:
    path = write_jsonl(tmp_path / "gsm8k.jsonl", [pb("ok"), row])
    error = bad(path)
    assert f"{path}:2" in str(error) and f"field {field!r}" in str(error) and message in str(error)
    assert error.field == field


def test_duplicate_ids_across_files_name_both_places(tmp_path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [pb("same")])
    write_jsonl(tmp_path / "b.jsonl", [pb("other"), pb("same")])
    error = bad(tmp_path)
    assert f"{tmp_path / 'b.jsonl'}:2" in str(error) and f"{tmp_path / 'a.jsonl'}:1" in str(error)


def test_missing_inputs(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        list(read_processbench(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="no \\*.jsonl"):
        list(read_processbench(tmp_path))


def test_a_byte_order_mark_is_skipped_at_the_start_of_a_file_only(tmp_path) -> None:
    path = tmp_path / "gsm8k.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(pb("a")) + "\n").encode())
    assert [r.id for r in read_processbench(path)] == ["a"]
    array = tmp_path / "math.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps([pb("b")]).encode())
    assert [r.id for r in read_processbench(array)] == ["b"]
    path.write_bytes(path.read_bytes() + b"\xef\xbb\xbf" + (json.dumps(pb("c")) + "\n").encode())
    assert f"{path}:2: malformed JSON" in str(bad(path))


def test_one_record_limit_for_lines_and_array_elements(tmp_path) -> None:
    row = json.dumps(pb("a"))
    path = write_jsonl(tmp_path / "gsm8k.jsonl", [row])
    array = tmp_path / "math.json"
    array.write_text(f"[{row}]")
    for data in (path, array):
        assert [r.id for r in read_processbench(data, max_record_bytes=len(row))] == ["a"]
    for data, what in ((path, "line"), (array, "record")):
        error = bad(data, lambda p: read_processbench(p, max_record_bytes=len(row) - 1))
        assert str(error).startswith(
            f"{data}:1: {what} longer than the limit of {len(row) - 1} bytes; refused before it is parsed "
            "(raise --max_record_bytes if such records are intended)"
        )


# ---------------------------------------------------------------------------- Best-of-N


def bon(record_id: str, responses: list, **extra) -> dict:
    return {"id": record_id, "problem": "p", "answer": 4, "responses": responses, **extra}


def test_bon_records(tmp_path) -> None:
    path = write_jsonl(
        tmp_path / "math500.jsonl",
        [
            bon(
                "a",
                [
                    {"steps": ["x", "\\boxed{4}"], "correct": True},
                    {"steps": ["y"], "correct": False, "final_answer": 3},
                ],
            ),
            bon("b", [{"steps": ["z"], "correct": False}], dataset="aime"),
        ],
    )
    a, b = read_bon(path)
    assert (a.dataset, b.dataset) == ("math500", "aime") and a.answer == "4"
    assert a.responses[1].final_answer == "3" and a.responses[0].final_answer is None


@pytest.mark.parametrize(
    "row, field",
    [
        (bon("a", [{"steps": ["x"], "correct": True}, {"steps": [], "correct": True}]), "responses[1].steps"),
        (bon("a", [{"correct": True}]), "responses[0].steps"),
        (bon("a", [{"steps": ["x"], "correct": 1}]), "responses[0].correct"),
        (bon("a", [{"steps": ["x"]}]), "responses[0].correct"),
        (bon("a", [{"steps": ["x"], "correct": True, "final_answer": ["4"]}]), "responses[0].final_answer"),
        (bon("a", []), "responses"),
        (bon("a", "text"), "responses"),
        ({"id": "a", "problem": "p", "responses": [{"steps": ["x"], "correct": True}]}, "answer"),
    ],
)
def test_bad_bon_fields(tmp_path, row, field) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    error = bad(path, read_bon)
    assert f"{path}:1" in str(error) and f"field {field!r}" in str(error)


# ---------------------------------------------------------------------------- predictions


@pytest.fixture()
def data_dir(tmp_path) -> Path:
    data = tmp_path / "processbench"
    data.mkdir()
    write_jsonl(data / "gsm8k.jsonl", [pb("g-0", -1), pb("g-1", 1), pb("g-2", 0, final_answer_correct=True)])
    write_jsonl(data / "math.jsonl", [pb("m-0", 2), pb("m-1", -1)])
    return data


def preds(tmp_path: Path, rows: list) -> Path:
    return write_jsonl(tmp_path / "preds.jsonl", rows)


def test_predictions_are_scored(data_dir, tmp_path) -> None:
    path = preds(
        tmp_path,
        [
            {"id": "g-0", "pred": -1},
            {"id": "g-1", "pred": 1},
            {"id": "g-2", "pred": None},
            {"id": "m-0", "pred": 2},
            {"id": "m-1", "pred": 0},
        ],
    )
    out = processbench_with_predictions(read_processbench(data_dir), path)
    gsm8k, math_ = out.results["subsets"]["gsm8k"], out.results["subsets"]["math"]
    assert (gsm8k["acc_err"], gsm8k["acc_ok"], gsm8k["n_unparseable"]) == (0.5, 1.0, 1)
    assert gsm8k["f1"] == pytest.approx(2 / 3)
    assert (math_["acc_err"], math_["acc_ok"], math_["f1"]) == (1.0, 0.0, 0.0)
    assert out.results["average_f1"] == pytest.approx(1 / 3)
    assert out.results["analyses"]["flawed_process"]["n"] == 3  # every record has a correct answer here
    assert [r["id"] for r in out.predictions] == ["g-0", "g-1", "g-2", "m-0", "m-1"]


def test_predictions_for_unknown_ids_are_named(data_dir, tmp_path) -> None:
    path = preds(tmp_path, [{"id": "g-0", "pred": -1}, {"id": "zz-1", "pred": 0}, {"id": "zz-2", "pred": 0}])
    with pytest.raises(EvaluationDataError, match="2 prediction\\(s\\) for ids not in the data: 'zz-1', 'zz-2'"):
        processbench_with_predictions(read_processbench(data_dir), path)


def test_missing_predictions_are_an_error_or_scored_wrong(data_dir, tmp_path) -> None:
    path = preds(tmp_path, [{"id": "g-0", "pred": -1}, {"id": "g-1", "pred": 1}])
    with pytest.raises(EvaluationDataError, match="no prediction for 3 record\\(s\\): 'g-2', 'm-0', 'm-1'"):
        processbench_with_predictions(read_processbench(data_dir), path)
    out = processbench_with_predictions(read_processbench(data_dir), path, missing="wrong")
    assert out.results["n_missing"] == 3
    assert out.results["subsets"]["math"]["n_unparseable"] == 2 and out.results["subsets"]["math"]["f1"] == 0.0
    assert out.results["subsets"]["gsm8k"]["acc_err"] == 0.5


def test_bad_predictions(data_dir, tmp_path) -> None:
    path = preds(tmp_path, [{"id": "g-0", "pred": -1}, {"id": "g-1", "pred": 3}])  # g-1 has 3 steps
    with pytest.raises(EvaluationDataError, match=f"{path}:2: field 'pred': prediction 3 is out of range"):
        processbench_with_predictions(read_processbench(data_dir), path)
    for row, field in (({"id": "g-0", "pred": -5}, "pred"), ({"id": "g-0", "pred": "1"}, "pred"), ({"pred": 1}, "id")):
        path = preds(tmp_path, [row])
        with pytest.raises(EvaluationDataError, match=f"{path}:1: field '{field}'"):
            list(read_predictions(path))
    path = preds(tmp_path, [{"id": "g-0", "pred": -1}, {"id": "g-0", "pred": 0}])
    with pytest.raises(EvaluationDataError, match="duplicate id 'g-0'"):
        list(read_predictions(path))
