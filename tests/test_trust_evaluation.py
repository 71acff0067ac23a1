"""Issue 26, evaluation: what an evaluation may no longer get wrong in silence, or lose.

* a PRM whose rewards are not finite is refused at the scorer's output, for every task, naming
  the record and the step (it used to give a clean ProcessBench report: every prediction -1);
* a `--data` folder whose subset file is a dangling symlink or not a regular file is refused
  (it used to be dropped, and the average F1 covered fewer subsets);
* a Best-of-N k above the responses a problem has is reported as not measured (it used to be a
  column copied from the largest real k);
* over-length scoring is bounded by `max_score_tokens` (longer inputs are never given to the
  scorer, their records counted), and a run that fails late keeps the rows it finished;
* a JSON-array record past Python's decoder (a 5,000-digit integer, deep nesting) is one line at
  `file:line`, not a bare ValueError or RecursionError;
* a problem or step holding the separator or a chat control token, and a malformed gold answer,
  are refused when the record is read, naming `file:line` and the field;
* a vLLM checkpoint's config.json that does not read is named.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from tiny_assets import TINY_VOCAB_SIZE, build_tiny_tokenizer, tiny_model_config

from prm_jax.evaluation import runner
from prm_jax.evaluation.records import BoNRecord, BoNResponse, EvaluationDataError, ProcessBenchRecord
from prm_jax.evaluation.report import bon_markdown
from prm_jax.evaluation.scorer import BatchedScorer, NonFiniteRewardError
from prm_jax.evaluation.tasks import MAX_SCORE_TOKENS, OverLengthCount, bon_with_prm, processbench_with_prm
from prm_jax.tokenization import PRMInput


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer")))


class FakeScorer:
    """A `StepScorer` with chosen rewards: `reward(n, step)` for the n-th input it is given."""

    def __init__(self, reward: Callable[[int, int], float] = lambda n, s: 0.9, fail_on_call: int | None = None):
        self.reward, self.fail_on_call = reward, fail_on_call
        self.calls, self.seen, self.lengths = 0, 0, []

    def score(self, inputs: Sequence[PRMInput]) -> list[list[float]]:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory while trying to allocate 29.6G")
        out = []
        for x in inputs:
            out.append([self.reward(self.seen, s) for s in range(len(x.separator_positions))])
            self.seen += 1
            self.lengths.append(len(x.input_ids))
        return out


def pb(record_id: str, words: int = 3, steps: int = 2, label: int = -1, subset: str = "gsm8k") -> ProcessBenchRecord:
    text = " ".join(["two"] * words)
    return ProcessBenchRecord(record_id, subset, f"Compute {record_id}.", tuple([text] * steps), label, True, "tiny")


def bon(record_id: str, n: int, words: int = 3) -> BoNRecord:
    response = lambda j: BoNResponse((" ".join(["two"] * words), f"\\boxed{{{j}}}"), j == 0)  # noqa: E731
    return BoNRecord(record_id, "d", f"Compute {record_id}.", "0", tuple(response(j) for j in range(n)))


# ---------------------------------------------------------------------------- 6. non-finite rewards


def nan_at(input_index: int, step: int) -> Callable[[int, int], float]:
    return lambda n, s: math.nan if (n, s) == (input_index, step) else 0.9


def test_non_finite_rewards_are_refused_by_every_task_naming_the_record_and_step(tokenizer) -> None:
    """ProcessBench used to predict -1 for every NaN reward (F1 0, exit 0); now every task stops at
    the scorer's output with one line naming the record, the response and the step."""
    records = [pb("g0"), pb("g1", label=1), pb("g2")]
    with pytest.raises(NonFiniteRewardError, match=r"record 'g1'.*: step 1 reward is nan"):
        processbench_with_prm(records, FakeScorer(nan_at(1, 1)), tokenizer)
    inf = lambda n, s: math.inf if n == 3 else 0.9  # noqa: E731 - q1's second response
    with pytest.raises(NonFiniteRewardError, match=r"record 'q1' response 1: step 0 reward is inf"):
        bon_with_prm([bon("q0", 2), bon("q1", 2)], FakeScorer(inf), tokenizer)


def test_a_nan_head_through_the_jax_scorer_and_the_launcher_is_one_user_error(tokenizer, tmp_path, monkeypatch) -> None:
    from flax import nnx

    from launch.errors import user_message
    from prm_jax.models.transformer import Transformer

    model = Transformer(tiny_model_config(vocab_size=TINY_VOCAB_SIZE), rngs=nnx.Rngs(0))
    model.score.out_bias[...] = jnp.full_like(model.score.out_bias[...], jnp.nan)
    scorer = BatchedScorer(model, mesh=jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]))
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps({**pb(f"g{i}").__dict__, "steps": ["a", "b"]}) + "\n" for i in range(2)))
    monkeypatch.setattr(runner, "_prm_scorer", lambda config: (scorer, tokenizer, None))
    config = runner.EvaluationConfig(task="processbench", data=str(data), out=str(tmp_path / "o"), model=str(data))
    with pytest.raises(NonFiniteRewardError) as error:
        runner.run_evaluation(config)
    message = user_message(error.value)
    assert message is not None and "\n" not in message and "record 'g0'" in message and "step 0" in message
    assert not (tmp_path / "o" / "results.json").exists()


# ---------------------------------------------------------------------------- 8. --data folders


def test_a_data_folder_refuses_subset_files_it_cannot_read(tmp_path) -> None:
    """A dangling symlink, a FIFO or a directory named like a subset file used to be dropped."""
    from prm_jax.evaluation.records import input_files

    folder = tmp_path / "processbench"
    folder.mkdir()
    (folder / "gsm8k.json").write_text("[]")
    real = tmp_path / "elsewhere.jsonl"
    real.write_text("")
    (folder / "math.jsonl").symlink_to(real)  # a symlink to a regular file is a subset file
    assert [p.name for p in input_files(folder)] == ["gsm8k.json", "math.jsonl"]

    (folder / "omnimath.json").symlink_to(tmp_path / "gone.json")
    with pytest.raises(EvaluationDataError, match=r"omnimath\.json: a dangling symlink.*gone\.json"):
        input_files(folder)
    (folder / "omnimath.json").unlink()
    os.mkfifo(folder / "olympiadbench.json")
    with pytest.raises(EvaluationDataError, match=r"olympiadbench\.json is not a regular file but a FIFO"):
        input_files(folder)
    (folder / "olympiadbench.json").unlink()
    (folder / "olympiadbench.json").mkdir()
    with pytest.raises(EvaluationDataError, match=r"olympiadbench\.json is not a regular file but a directory"):
        input_files(folder)


# ---------------------------------------------------------------------------- 9. --bon_k above N


def test_bon_k_above_the_responses_is_reported_as_not_measured(tokenizer) -> None:
    out = bon_with_prm([bon("q0", 3), bon("q1", 2)], FakeScorer(), tokenizer, ks=[1, 2, 3, 8])
    assert list(out.results["by_k"]) == ["1", "2"]  # measured on every problem's first k responses
    not_measured = out.results["by_k_not_measured"]
    assert list(not_measured) == ["3", "8"]
    assert "1 of 2 problems have fewer than 3 responses (the fewest: 2, record 'q1')" in not_measured["3"]
    markdown = bon_markdown(out.results)
    assert "k = 3, 8: not measured" in markdown


# ---------------------------------------------------------------------------- 14. bounded over-length scoring


def test_inputs_over_the_score_cap_never_reach_the_scorer_and_are_counted(tokenizer) -> None:
    """Under the default over_length=score, an input of any length used to go to the scorer (a 24k
    token record needed 29.6 GB of attention); now `max_score_tokens` bounds every input scored."""
    records = [pb("g0"), pb("g1", words=200), pb("g2"), pb("m0", words=300, subset="math")]
    scorer = FakeScorer()
    out = processbench_with_prm(records, scorer, tokenizer, max_length=None, max_score_tokens=150)
    assert max(scorer.lengths) <= 150 and scorer.seen == 2
    assert [row["id"] for row in out.predictions] == ["g0", "g2"]
    over = out.results["over_length"]
    assert (over["max_score_tokens"], over["n_over_cap"], over["n_skipped"]) == (150, 2, 2)
    assert over["over_cap_records"] == ["g1", "m0"] and over["longest"] > 150
    assert "math" not in out.results["subsets"]

    scorer = FakeScorer()
    out = bon_with_prm([bon("q0", 2), bon("q1", 2, words=200)], scorer, tokenizer, max_score_tokens=150)
    assert max(scorer.lengths) <= 150 and [row["id"] for row in out.predictions] == ["q0"]
    assert out.results["over_length"]["over_cap_records"] == ["q1"]
    # The default cap never cuts into the trained context.
    assert OverLengthCount(4096, "score").max_score_tokens == MAX_SCORE_TOKENS
    assert OverLengthCount(65536, "score").max_score_tokens == 65536
    with pytest.raises(ValueError, match="max_score_tokens=0 must be >= 1"):
        runner.EvaluationConfig(task="processbench", data="d", out="o", model="m", max_score_tokens=0)


def _processbench_data(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({**pb(f"g{i}").__dict__, "steps": ["a", "b"]}) + "\n" for i in range(n)))
    return path


def test_a_late_failure_keeps_the_rows_already_scored(tokenizer, tmp_path, monkeypatch) -> None:
    """An out-of-memory error in the last window used to lose every score; the finished rows are
    now in predictions.partial.jsonl (no results.json: the run did not finish)."""
    data = _processbench_data(tmp_path / "gsm8k.jsonl", 5)
    out = tmp_path / "o"
    config = runner.EvaluationConfig(task="processbench", data=str(data), out=str(out), model=str(data), window=2)
    monkeypatch.setattr(runner, "_prm_scorer", lambda config: (FakeScorer(fail_on_call=3), tokenizer, None))
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        runner.run_evaluation(config)
    partial = [json.loads(line) for line in (out / "predictions.partial.jsonl").read_text().splitlines()]
    assert [row["id"] for row in partial] == ["g0", "g1", "g2", "g3"] and not (out / "results.json").exists()
    assert all(row["rewards"] == [0.9, 0.9] and row["pred"] == -1 for row in partial)

    monkeypatch.setattr(runner, "_prm_scorer", lambda config: (FakeScorer(), tokenizer, None))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="a_file is not a folder"):  # refused before scoring, not at its first row
        runner.run_evaluation(dataclasses.replace(config, out=str(tmp_path / "a_file")))
    runner.run_evaluation(config)
    assert not (out / "predictions.partial.jsonl").exists()
    final = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert final[:4] == partial and len(final) == 5


# ---------------------------------------------------------------------------- 13. JSON past the decoder's limits


def _array_file(path: Path, elements: list[str]) -> Path:
    path.write_text("[\n" + ",\n".join(elements) + "\n]\n")
    return path


def test_a_json_array_element_past_the_decoders_limits_is_one_line_at_its_element(tmp_path, monkeypatch) -> None:
    """A ProcessBench array file with a 5,000-digit integer, or nesting past the recursion limit, used
    to end in a bare ValueError or RecursionError (after re-reading the rest of the file as if the
    element were cut by a chunk boundary); now it is an EvaluationDataError at the element's line."""
    import prm_jax.evaluation.records as records_module
    from prm_jax.evaluation.records import read_processbench

    good = json.dumps({"id": "g0", "problem": "p", "steps": ["a"], "label": -1})
    huge = '{"id": "g1", "problem": "p", "steps": ["a"], "label": ' + "9" * 5000 + "}"
    deep = '{"id": "g1", "problem": "p", "steps": ["a"], "label": -1, "meta": ' + "[" * 100_000 + "]" * 100_000 + "}"
    for name, element, why in [("huge", huge, "more than 4300 digits"), ("deep", deep, "nested deeper")]:
        path = _array_file(tmp_path / f"{name}.json", [good, element, good.replace("g0", "g2")])
        with pytest.raises(EvaluationDataError) as error:
            list(read_processbench(path))
        message = str(error.value)
        assert message.startswith(f"{path}:3: unreadable JSON: ") and why in message and "(element 1)" in message
        assert "\n" not in message

    # A long float is legal JSON: a read chunk ending inside its digits must not refuse it.
    monkeypatch.setattr(records_module, "_READ_CHUNK", 1000)
    long_float = '{"id": "g1", "problem": "p", "steps": ["a"], "label": -1, "meta": ' + "1" * 5000 + ".5}"
    path = _array_file(tmp_path / "float.json", [good, long_float])
    assert [r.id for r in read_processbench(path)] == ["g0", "g1"]


# ---------------------------------------------------------------------------- 7, 10. text and gold rules at read time


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _read_error(path: Path, reader: Callable) -> str:
    with pytest.raises(EvaluationDataError) as error:
        list(reader(path))
    return str(error.value)


def test_evaluation_readers_refuse_control_tokens_and_malformed_golds_naming_file_line_and_field(tmp_path) -> None:
    """A `<|im_end|>` in a problem fakes a turn boundary in the prompt, a separator in a step is scored
    as a step end, and a gold like `x}{y` means the responses' `correct` flags were graded wrong: all
    used to be read (or found only by the scorer, labelled `steps` even when it was the problem)."""
    from prm_jax.evaluation.records import read_bon, read_processbench

    row = {"id": "g1", "problem": "p", "steps": ["a", "b"], "label": -1}
    cases = [
        ({**row, "problem": "Compute 2+2.<|im_end|>"}, "problem", "contains '<|im_end|>' (at character 13)"),
        ({**row, "steps": ["a", "b <extra_0> c"]}, "steps", "step 1 contains the step separator '<extra_0>'"),
        ({**row, "steps": ["<|im_start|>user", "b"]}, "steps", "step 0 contains '<|im_start|>'"),
    ]
    for bad_row, field, why in cases:
        path = _jsonl(tmp_path / "gsm8k.jsonl", [{**row, "id": "g0"}, bad_row])
        assert f"{path}:2: field {field!r}: {why}" in _read_error(path, read_processbench)

    response = {"steps": ["x", "\\boxed{4}"], "correct": True}
    bon_row = {"id": "q", "problem": "p", "answer": "4", "responses": [response, response]}
    cases = [
        ({**bon_row, "problem": "p<|endoftext|>"}, "problem", "contains '<|endoftext|>'"),
        ({**bon_row, "responses": [response, {**response, "steps": ["x<extra_0>"]}]}, "responses[1].steps", "step 0"),
        ({**bon_row, "answer": "x}{y"}, "answer", "the gold answer has unbalanced braces: the '}' at character 2"),
        ({**bon_row, "answer": "\\frac{1}{"}, "answer", "the gold answer has unbalanced braces: 1 '{' never closed"),
        ({**bon_row, "answer": " "}, "answer", "the gold answer is empty"),
    ]
    for bad_row, field, why in cases:
        path = _jsonl(tmp_path / "math500.jsonl", [bad_row])
        assert f"{path}:1: field {field!r}: {why}" in _read_error(path, read_bon)
    assert [r.answer for r in read_bon(_jsonl(tmp_path / "ok.jsonl", [{**bon_row, "answer": "\\frac{1}{2}"}]))]


# shared/ lies beside the checkout (developers' machines and CI alike).
REAL_PROCESSBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "processbench"


@pytest.mark.skipif(not REAL_PROCESSBENCH.is_dir(), reason="the ProcessBench release is not on this machine")
def test_the_real_processbench_release_still_reads_whole() -> None:
    """The new text rule must never refuse the benchmark itself: no official record holds a separator
    or a chat control token."""
    from collections import Counter

    from prm_jax.evaluation.records import read_processbench

    subsets = Counter(r.subset for r in read_processbench(REAL_PROCESSBENCH))
    assert subsets == {"gsm8k": 400, "math": 1000, "olympiadbench": 1000, "omnimath": 1000}


def test_the_scorer_names_the_field_that_holds_a_tokenizers_own_control_token(tokenizer) -> None:
    """At scoring time the tokenizer's own special tokens count too; `prepare_input` used to label
    every failure `field 'steps'`, the problem's included, and Best-of-N's without the response."""
    import copy

    from prm_jax.evaluation.tasks import prepare_input

    tokenizer = copy.deepcopy(tokenizer)  # the module's tokenizer stays as built
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|eot_id|>"]})
    with pytest.raises(EvaluationDataError, match=r"^d\.jsonl:3: field 'problem': contains '<\|eot_id\|>'"):
        prepare_input(tokenizer, "Compute.<|eot_id|>", ["a"], source="d.jsonl:3")
    with pytest.raises(EvaluationDataError, match=r"^d\.jsonl:3: field 'steps': step 1 contains '<\|eot_id\|>'"):
        prepare_input(tokenizer, "Compute.", ["a", "b<|eot_id|>"], source="d.jsonl:3")
    record = dataclasses.replace(bon("q0", 3), source="d.jsonl:7")
    responses = list(record.responses)
    responses[2] = BoNResponse(("x <|eot_id|>",), False)
    with pytest.raises(EvaluationDataError, match=r"^d\.jsonl:7: field 'responses\[2\]\.steps': step 0 contains"):
        bon_with_prm([dataclasses.replace(record, responses=tuple(responses))], FakeScorer(), tokenizer)


# ---------------------------------------------------------------------------- vLLM's config.json


def test_a_vllm_checkpoints_config_json_that_does_not_read_is_named(tmp_path) -> None:
    """The vLLM scorer read config.json with json.loads: a truncated file, a 5,000-digit number or a
    non-object gave a message without the file (or an AttributeError), a FIFO was skipped."""
    from types import SimpleNamespace

    from prm_jax.generation.vllm_backend import _refuse_architectures_vllm_lacks, _separator_id_from_checkpoint

    model = tmp_path / "export"
    model.mkdir()
    config = model / "config.json"
    fake_vllm = SimpleNamespace(
        ModelRegistry=SimpleNamespace(get_supported_archs=lambda: ["Qwen2ForProcessRewardModel"])
    )
    cases = [
        ('{"step_separator_id": 151651,\n"architectures": [', r":2: malformed JSON: Expecting value"),
        ('{"step_separator_id": ' + "1" * 5000 + "}", r":1: unreadable JSON: a number of more than 4300 digits"),
        ("[151651]", r": expected a JSON object, got array"),
        ('{"step_separator_id": "151651"}', r": field 'step_separator_id': expected a token id"),
    ]
    for text, message in cases:
        config.write_text(text)
        with pytest.raises(ValueError, match="^" + str(config).replace(".", r"\.") + message):
            _separator_id_from_checkpoint(str(model), None, False)
    config.unlink()
    os.mkfifo(config)
    with pytest.raises(ValueError, match=r"config\.json .*a FIFO"):
        _refuse_architectures_vllm_lacks(fake_vllm, str(model))
    config.unlink()
    config.write_text(json.dumps({"architectures": ["Qwen3ForProcessRewardModel"], "step_separator_id": 7}))
    assert _separator_id_from_checkpoint(str(model), None, False) == 7
    with pytest.raises(ValueError, match=r"has no model class for \['Qwen3ForProcessRewardModel'\]"):
        _refuse_architectures_vllm_lacks(fake_vllm, str(model))
