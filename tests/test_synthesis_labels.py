"""Labelling logic with a scripted generator: MC labels, early stop, judge parsing, votes, consensus."""

from __future__ import annotations

import json

import pytest

from data_pipeline.consensus import decide, training_record
from data_pipeline.grading import GradingPool
from data_pipeline.ids import stable_seed
from data_pipeline.judge import Judge, JudgeSettings, judge_verdict
from data_pipeline.mc import MCLabeler, MCSettings
from data_pipeline.schemas import GradeRecord, JudgeRecord, MCCost, MCRecord
from data_pipeline.scripted import CharTokenizer, ScriptedBackend
from data_pipeline.solutions import continuation_prompt, policy_prompt, split_steps
from prm_jax.critique import classify_verdict
from prm_jax.data.records import read_prm_records
from prm_jax.generation.types import Completion, RequestOutput, SamplingParams, per_prompt_params

K = 4
STEPS = ("Let x be 2.", "Then 2x = 4.", "Add 1: 5.", "Double: 10.", "Halve: 5.", "So \\boxed{5}.")


def grade_record(steps=STEPS, *, status="incorrect", finish_reason="stop", gold="4", rid="p#0") -> GradeRecord:
    return GradeRecord(
        id=rid,
        problem_id=rid.split("#")[0],
        index=0,
        problem="What is 2 + 2?",
        gold=gold,
        steps=tuple(steps),
        answer="5",
        finish_reason=finish_reason,
        num_tokens=40,
        status=status,
        correct=status == "correct",
    )


def rollout_script(correct_after: dict[str, int], *, tokens: int = 30):
    """Completions of the prefix ending with step s: the first correct_after[s] of them reach \\boxed{4}."""

    def script(prompt: str, index: int, params):
        for step, n_correct in correct_after.items():
            if prompt.endswith(step + "\n\n"):
                return ("... so \\boxed{4}." if index < n_correct else "... so \\boxed{7}.", tokens)
        raise AssertionError(f"unexpected prompt ending {prompt[-40:]!r}")

    return script


def label(record, script, **settings) -> tuple[MCRecord, ScriptedBackend]:
    backend = ScriptedBackend(script)
    labeler = MCLabeler(backend, GradingPool(workers=0), MCSettings.from_config(k=K, **settings))
    (result,) = list(labeler.label([record]))
    MCRecord.from_json(json.loads(json.dumps(result.to_json())))  # the schema accepts what we write
    return result, backend


def test_hard_and_soft_labels_first_error_and_early_stop() -> None:
    script = rollout_script({STEPS[0]: 3, STEPS[1]: 1, STEPS[2]: 0, STEPS[3]: 4, STEPS[4]: 2})
    record, backend = label(grade_record(), script)
    assert [x.n_correct for x in record.labels] == [3, 1, 0]
    assert [x.soft for x in record.labels] == [0.75, 0.25, 0.0]
    assert [x.hard for x in record.labels] == [1, 1, 0]  # >= 1 correct completion is positive
    assert record.first_error == 2 and record.early_stopped and record.status == "labelled"
    # Steps 3 and 4 were never rolled out: 3 of the 5 prefixes ran.
    assert record.cost == MCCost(
        prefixes=3, completions=12, generated_tokens=12 * 30, prefixes_full=5, completions_full=20
    )
    assert len(backend.requests) == 3


def test_full_expansion_labels_every_step() -> None:
    script = rollout_script({STEPS[0]: 3, STEPS[1]: 1, STEPS[2]: 0, STEPS[3]: 4, STEPS[4]: 2})
    record, backend = label(grade_record(), script, early_stop=False)
    assert [x.hard for x in record.labels] == [1, 1, 0, 1, 1, 0]  # the last step: the response's grade
    assert record.first_error == 2 and not record.early_stopped
    assert record.cost.prefixes == record.cost.prefixes_full == 5
    last = record.labels[-1]
    assert not last.rolled_out and last.n == 0 and last.soft == 0.0


def test_correct_response_has_no_error_and_its_last_step_is_free() -> None:
    steps = ("a = 1", "b = 3", "a + b = \\boxed{4}")
    record, backend = label(grade_record(steps, status="correct"), rollout_script({steps[0]: 2, steps[1]: 4}))
    assert [x.hard for x in record.labels] == [1, 1, 1]
    assert [x.soft for x in record.labels] == [0.5, 1.0, 1.0]
    assert record.first_error == -1 and not record.early_stopped
    assert record.cost.prefixes == 2  # the last step's prefix is the whole response: not rolled out


def test_incorrect_response_with_all_positive_rollouts_errs_at_the_last_step() -> None:
    steps = ("a = 1", "b = 3", "a + b = \\boxed{5}")
    record, _ = label(grade_record(steps), rollout_script({steps[0]: 1, steps[1]: 1}))
    assert [x.hard for x in record.labels] == [1, 1, 0] and record.first_error == 2


def test_one_step_response_needs_no_rollout() -> None:
    record, backend = label(grade_record(("\\boxed{4}",), status="correct"), rollout_script({}))
    assert record.first_error == -1 and record.cost.prefixes == 0 and backend.requests == []


def test_one_n_equals_k_request_per_prefix_with_the_documented_layout() -> None:
    script = rollout_script({STEPS[0]: 1, STEPS[1]: 1, STEPS[2]: 0})
    record, backend = label(grade_record(), script, temperature=0.9, max_tokens=77, base_seed=5)
    head = policy_prompt(backend.tokenizer, "What is 2 + 2?")
    assert head == "Please reason step by step, and put your final answer within \\boxed{}.\n\nWhat is 2 + 2?\n\n"
    for i, request in enumerate(backend.requests):
        assert request.prompt == head + "\n\n".join(STEPS[: i + 1]) + "\n\n"
        assert request.prompt == continuation_prompt(backend.tokenizer, "What is 2 + 2?", STEPS[: i + 1])
        assert request.params.n == K and request.params.temperature == 0.9 and request.params.max_tokens == 77
        assert request.params.seed == stable_seed(5, "mc", "p#0", i)
    assert len({r.params.seed for r in backend.requests}) == 3


def test_completion_answer_is_read_from_prefix_plus_completion() -> None:
    steps = ("So x = \\boxed{4}", "Check: fine", "\\boxed{4}")
    # The completion of prefix 0 gives no box of its own: the solution's last box is the prefix's.
    record, _ = label(
        grade_record(steps, status="correct"),
        lambda prompt, index, params: ("Check done.", 5) if prompt.endswith(steps[0] + "\n\n") else ("\\boxed{9}", 5),
    )
    assert [x.n_correct for x in record.labels] == [K, 0]


@pytest.mark.parametrize(
    "record, reason, settings",
    [
        (grade_record(steps=(), status="empty"), "no_steps", {}),
        (grade_record(finish_reason="length"), "truncated", {}),
        (grade_record(status="bad_gold"), "bad_gold", {}),
        # An unknown grade is not a wrong answer: no last-step 0 label from a timeout or a crash.
        (grade_record(status="timeout"), "grade_timeout", {}),
        (grade_record(status="error"), "grade_error", {}),
    ],
)
def test_skipped_responses_say_why(record, reason, settings) -> None:
    result, backend = label(record, rollout_script({}), **settings)
    assert result.status == "skipped" and result.skip_reason == reason and result.first_error is None
    assert backend.requests == []


def test_truncated_responses_are_labelled_when_asked() -> None:
    script = rollout_script({STEPS[0]: 0})
    result, _ = label(grade_record(finish_reason="length"), script, skip_truncated=False)
    assert result.status == "labelled" and result.first_error == 0


def test_prompts_longer_than_the_context_are_skipped() -> None:
    backend = ScriptedBackend(rollout_script({}), context_length=120)
    labeler = MCLabeler(backend, GradingPool(workers=0), MCSettings.from_config(k=K))
    (result,) = labeler.label([grade_record()])
    assert result.skip_reason == "prompt_too_long" and backend.requests == []


def test_continuous_batching_gives_the_same_labels_as_one_at_a_time() -> None:
    records = [grade_record(STEPS[: 2 + i % 4], rid=f"p{i}#0") for i in range(7)]
    script = rollout_script({STEPS[0]: 2, STEPS[1]: 1, STEPS[2]: 0, STEPS[3]: 1, STEPS[4]: 1})

    def run(batch: int) -> dict[str, MCRecord]:
        labeler = MCLabeler(
            ScriptedBackend(script), GradingPool(workers=0), MCSettings.from_config(k=K, batch_responses=batch)
        )
        return {r.id: r for r in labeler.label(records)}

    assert run(1) == run(3) == run(64)
    assert len(run(3)) == 7


# ---------------------------------------------------------------------------- judge


@pytest.mark.parametrize(
    "text, verdict, reason",
    [
        ("The first error is in paragraph 1. \\boxed{1}", 1, "ok"),
        ("All steps are right. \\boxed{-1}", -1, "ok"),
        ("\\boxed{0} ... on reflection \\boxed{2}", 2, "ok"),  # several boxes: the last one counts
        ("\\boxed{\\text{2}}", 2, "ok"),
        ("I think paragraph 1 is wrong.", None, "no_box"),
        ("\\boxed{paragraph one}", None, "not_integer"),
        ("\\boxed{1.5}", None, "not_integer"),
        ("\\boxed{3}", None, "out_of_range"),
        ("\\boxed{-2}", None, "out_of_range"),
        ("\\boxed{1", None, "no_box"),  # unbalanced: no complete box
    ],
)
def test_judge_verdict_parsing(text, verdict, reason) -> None:
    assert classify_verdict(text, num_steps=3) == (verdict, reason)


@pytest.mark.parametrize(
    "verdicts, reasons, expected",
    [
        ((1,), ("ok",), (1, None)),
        ((1, 1, 2), ("ok",) * 3, (1, None)),
        ((-1, -1, None), ("ok", "ok", "no_box"), (-1, None)),
        ((1, 2, None), ("ok", "ok", "no_box"), (1, None)),  # a tie goes to the first sampled
        ((1, None, None), ("ok", "no_box", "no_box"), (1, None)),  # unparseable samples do not vote
        ((1, 2), ("ok", "ok"), (1, None)),
        ((2, 1, 1, 2), ("ok",) * 4, (2, None)),
        ((None, 0, 2, 2), ("no_box", "ok", "ok", "ok"), (2, None)),  # a plurality, not a majority of 4
        ((None, None, None), ("no_box", "not_integer", "no_box"), (None, "no_box")),
        ((None,), ("out_of_range",), (None, "out_of_range")),
    ],
)
def test_judge_verdict(verdicts, reasons, expected) -> None:
    assert judge_verdict(verdicts, reasons) == expected


def test_judge_samples_one_request_per_response_and_votes() -> None:
    answers = {0: "\\boxed{1}", 1: "hmm \\boxed{1}", 2: "\\boxed{0}", 3: "no idea"}

    def script(prompt, index, params):
        assert "<paragraph_0>\nLet x be 2.\n</paragraph_0>" in prompt and "[Math Problem]" in prompt
        return answers[index]

    backend = ScriptedBackend(script)
    judge = Judge(backend, JudgeSettings.from_config(num_samples=4, temperature=0.8, base_seed=3))
    empty = grade_record(steps=(), status="empty", rid="q#1")
    result, skipped = judge.judge_batch([grade_record(), empty])
    assert result.verdicts == (1, 1, 0, None) and result.reasons == ("ok", "ok", "ok", "no_box")
    assert result.first_error == 1 and result.no_verdict_reason is None  # the plurality, 2 of 4
    assert skipped.status == "skipped" and skipped.skip_reason == "no_steps"
    (request,) = backend.requests
    assert request.params.n == 4 and request.params.seed == stable_seed(3, "judge", "p#0")
    JudgeRecord.from_json(json.loads(json.dumps(result.to_json())))


class SameCritic:
    """One critic for both callers (synthesis's judge and ProcessBench evaluation, both sending chat
    messages): the same sampled critiques whatever form the prompt takes."""

    tokenizer = CharTokenizer()

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def generate(self, prompts, params):
        return [
            RequestOutput((0,), tuple(Completion(t, (0,), "stop") for t in self.texts[: p.n]))
            for p in per_prompt_params(params, len(prompts))
        ]


@pytest.mark.parametrize(
    "texts, expected",
    [
        (["\\boxed{1}", "\\boxed{2}", "no box"], 1),  # a tie: the first sampled
        (["\\boxed{0}", "x", "y", "\\boxed{0}", "\\boxed{2}"], 0),  # 2 of 5: a plurality
        (["\\boxed{-1}", "\\boxed{2}", "\\boxed{2}", "\\boxed{-1}"], -1),
        (["nothing", "\\boxed{9}"], None),  # no parseable sample
    ],
)
def test_one_critic_gives_one_verdict_in_synthesis_and_evaluation(texts, expected) -> None:
    from prm_jax.evaluation.records import ProcessBenchRecord
    from prm_jax.evaluation.tasks import processbench_with_critic

    critic, n = SameCritic(texts), len(texts)
    (judged,) = Judge(critic, JudgeSettings.from_config(num_samples=n, temperature=0.8)).judge_batch(
        [grade_record(STEPS[:3])]
    )
    record = ProcessBenchRecord("r", "gsm8k", "What is 2 + 2?", STEPS[:3], 1, False)
    evaluated = processbench_with_critic([record], critic, SamplingParams(n=n, temperature=0.8, max_tokens=8))
    assert judged.verdicts == tuple(evaluated.predictions[0]["verdicts"])
    assert judged.first_error == evaluated.predictions[0]["pred"] == expected


def test_judge_with_the_paper_prompt_parses_conclusions() -> None:
    def script(prompt, index, params):
        assert "<paragraph_1>\nLet x be 2.\n</paragraph_1>" in prompt and "<paragraph_0>" not in prompt
        conclusions = ["Correct", "Correct", "Incorrect"] if index == 0 else ["Correct"]
        return "".join(f"<conclusion_{k}>{c}</conclusion_{k}>" for k, c in enumerate(conclusions, 1))

    judge = Judge(ScriptedBackend(script), JudgeSettings.from_config(num_samples=2, temperature=0.8, prompt="paper"))
    (result,) = judge.judge_batch([grade_record()])
    assert result.verdicts == (2, None) and result.reasons == ("ok", "incomplete")
    JudgeRecord.from_json(json.loads(json.dumps(result.to_json())))  # the schema knows the new reasons
    with pytest.raises(ValueError, match="judge.prompt"):
        JudgeSettings.from_config(prompt="chatty")


def test_synthesis_config_checks_the_judge_prompt(tmp_path) -> None:
    from data_pipeline.config import default_config, validate

    config = default_config()
    config.judge.prompt = "paper"
    config.problems.path = str(tmp_path / "problems.jsonl")
    (tmp_path / "problems.jsonl").write_text('{"id": "p", "problem": "1 + 1?", "answer": "2"}\n')
    validate(config)
    config.judge.prompt = "other"
    with pytest.raises(ValueError, match="judge.prompt"):
        validate(config)


# ---------------------------------------------------------------------------- consensus


def mc_record(first_error: int, *, num_steps: int = 4, status: str = "labelled") -> MCRecord:
    if status == "skipped":
        return MCRecord("p#0", "p", "skipped", "truncated", K, num_steps, (), None, False, MCCost())
    from data_pipeline.schemas import StepLabel

    n = num_steps if first_error == -1 else first_error + 1
    labels = []
    for i in range(n):
        good = first_error == -1 or i < first_error
        n_correct = (i % K) + 1 if good else 0
        labels.append(StepLabel(n_correct, K, n_correct / K, int(n_correct >= 1), True))
    return MCRecord("p#0", "p", "labelled", None, K, num_steps, tuple(labels), first_error, n < num_steps, MCCost())


def judge_record(first_error: int | None, *, status: str = "judged", reason: str | None = None) -> JudgeRecord:
    if status == "skipped":
        return JudgeRecord("p#0", "p", "skipped", "no_steps", 4, (), (), None, None)
    return JudgeRecord(
        "p#0",
        "p",
        "judged",
        None,
        4,
        (first_error,),
        ("ok" if first_error is not None else reason,),
        first_error,
        None if first_error is not None else reason,
    )


@pytest.mark.parametrize(
    "mc, judge, mode, expected",
    [
        (mc_record(2), judge_record(2), "agree", (2, "kept")),
        (mc_record(-1), judge_record(-1), "agree", (-1, "kept")),  # both -1 agree
        (mc_record(1), judge_record(2), "agree", (None, "disagree")),
        (mc_record(-1), judge_record(0), "agree", (None, "disagree")),
        (mc_record(1), judge_record(None, reason="no_box"), "agree", (None, "no_verdict:no_box")),
        (mc_record(1, status="skipped"), judge_record(1), "agree", (None, "mc_skipped:truncated")),
        (mc_record(1), judge_record(None, status="skipped"), "agree", (None, "judge_skipped:no_steps")),
        (None, judge_record(1), "agree", (None, "mc_missing")),
        (mc_record(1), judge_record(2), "mc", (1, "kept")),
        (mc_record(1), None, "mc", (1, "kept")),
        (mc_record(1), judge_record(2), "judge", (2, "kept")),
    ],
)
def test_consensus_keeps_only_agreement(mc, judge, mode, expected) -> None:
    assert decide(mc, judge, mode) == expected


def test_the_mc_hard_threshold_moves_the_first_error_earlier() -> None:
    from data_pipeline.consensus import mc_first_error, mc_hard_labels
    from data_pipeline.schemas import StepLabel

    # n_correct of k=4 per step: 4, 2, 1, then the last step (not rolled out) keeps its grade.
    labels = tuple(StepLabel(n, K, n / K, int(n >= 1), True) for n in (4, 2, 1)) + (StepLabel(1, 0, 1.0, 1, False),)
    mc = MCRecord("p#0", "p", "labelled", None, K, 4, labels, -1, False, MCCost())
    assert mc_hard_labels(mc, 0.0) == [1, 1, 1, 1] and mc_first_error(mc, 0.0) == -1
    assert mc_hard_labels(mc, 0.25) == [1, 1, 0, 1] and mc_first_error(mc, 0.25) == 2  # 1/4 is not > 1/4
    assert mc_first_error(mc, 0.5) == 1 and mc_first_error(mc, 0.875) == 1  # 4 of 4 is above every threshold
    grade = grade_record(STEPS[:4], status="correct")
    record = training_record(grade, mc, 1, mode="mc", label_type="hard", mc_threshold=0.5)
    assert record["labels"] == [1, 0]
    # In "agree" mode the judge is compared with the thresholded first error.
    assert decide(mc, judge_record(1), "agree", 0.5) == (1, "kept")
    assert decide(mc, judge_record(1), "agree") == (None, "disagree")


def test_training_records_end_at_the_first_error(tmp_path) -> None:
    grade = grade_record(STEPS[:4])
    hard = training_record(grade, mc_record(2), 2, mode="agree", label_type="hard")
    assert hard["steps"] == list(STEPS[:3]) and hard["labels"] == [1, 1, 0]
    soft = training_record(grade, mc_record(2), 2, mode="agree", label_type="soft")
    assert soft["labels"] == [0.25, 0.5, 0.0] and all(isinstance(x, float) for x in soft["labels"])
    clean = training_record(
        grade_record(STEPS[:4], status="correct"), mc_record(-1), -1, mode="agree", label_type="hard"
    )
    assert clean["steps"] == list(STEPS[:4]) and clean["labels"] == [1, 1, 1, 1]
    judged = training_record(grade, None, 1, mode="judge", label_type="hard")
    assert judged["labels"] == [1, 0]
    for name, record in (("hard", hard), ("soft", soft), ("clean", clean)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(record) + "\n")
        (parsed,) = read_prm_records(path)
        assert parsed.hard_labels == (name != "soft") and len(parsed.steps) == len(parsed.labels)


def test_steps_split_on_blank_lines() -> None:
    assert split_steps("a\n\nb\n\n\n\n c \n\n") == ["a", "b", "c"]
    assert split_steps("one line\nsame step") == ["one line\nsame step"]
    assert split_steps("   \n\n  ") == []
