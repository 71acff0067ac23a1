"""Records -> examples: supervision exactly at separators (PRM) or on the completion (SFT)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_assets import build_tiny_tokenizer

from prm_jax.data.pipeline import load_prm_examples, load_sft_examples
from prm_jax.data.records import DataError, PRMRecord, SFTRecord
from prm_jax.data.tokenize import Example, TokenizeConfig, TokenizeStats, tokenize_prm, tokenize_sft
from prm_jax.tokenization import SYSTEM_PROMPT, build_prm_input, render_chat

SEP = "<extra_0>"
STEPS = (
    "We compute 3 * 4 = 12.",
    "Then 2 + 12 = 14.",
    "So the answer is 15.",
    "Therefore the final answer is \\boxed{15}.",
)
PROBLEM = "What is 2 + 3 * 4?"


def _sft_prompt(tokenizer, prompt: str) -> str:
    """The prompt text SFT trains the policy on: the system prompt, the user turn, an open reply."""
    return render_chat(tokenizer, [{"role": "user", "content": prompt}], system_prompt=SYSTEM_PROMPT)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def plain_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    path = build_tiny_tokenizer(tmp_path_factory.mktemp("plain"), chat_template=False)
    return AutoTokenizer.from_pretrained(path)


def _sep_id(tokenizer) -> int:
    (sep_id,) = tokenizer.encode(SEP, add_special_tokens=False)
    return sep_id


def _supervised(example: Example) -> np.ndarray:
    return np.nonzero(example.loss_mask)[0]


def _check_prm_invariants(example: Example, tokenizer, labels) -> None:
    pos = _supervised(example)
    assert [tokenizer.decode([t]) for t in example.input_ids[pos]] == [SEP] * len(pos)
    # Every separator token is supervised (no unsupervised separators left in the input).
    assert np.array_equal(np.nonzero(example.input_ids == _sep_id(tokenizer))[0], pos)
    np.testing.assert_array_equal(example.labels[pos], np.asarray(labels, np.float32))
    np.testing.assert_array_equal(example.step_index[pos], np.arange(len(pos)))
    off = np.ones(len(example), bool)
    off[pos] = False
    assert not example.labels[off].any() and (example.step_index[off] == -1).all()
    assert not example.targets.any()
    assert set(np.unique(example.loss_mask)) <= {0.0, 1.0}


def test_hard_labels_at_separator_positions(tokenizer):
    record = PRMRecord("r", PROBLEM, STEPS, (1, 1, 1, 1))
    stats = TokenizeStats()
    example = tokenize_prm(record, tokenizer, TokenizeConfig(max_length=512), 7, stats)
    built = build_prm_input(tokenizer, PROBLEM, STEPS)
    assert example.input_ids.tolist() == built.input_ids
    assert _supervised(example).tolist() == built.separator_positions
    _check_prm_invariants(example, tokenizer, [1, 1, 1, 1])
    assert example.example_index == 7 and example.record_id == "r"
    assert example.input_ids.dtype == np.int32 and example.labels.dtype == np.float32
    assert stats == TokenizeStats(seen=1, kept=1, supervised_positions=4, tokens=len(example))


def test_drop_after_first_error_removes_later_steps_from_input_and_labels(tokenizer):
    record = PRMRecord("r", PROBLEM, STEPS, (1, 1, 0, 1))
    stats = TokenizeStats()
    example = tokenize_prm(record, tokenizer, TokenizeConfig(max_length=512), 0, stats)
    assert example.input_ids.tolist() == build_prm_input(tokenizer, PROBLEM, STEPS[:3]).input_ids
    text = tokenizer.decode(example.input_ids)
    assert STEPS[2] in text and "boxed{15}" not in text
    _check_prm_invariants(example, tokenizer, [1, 1, 0])
    assert stats.steps_dropped_after_error == 1 and stats.supervised_positions == 3

    keep_all = TokenizeConfig(max_length=512, drop_after_first_error=False)
    full = tokenize_prm(record, tokenizer, keep_all, 0)
    _check_prm_invariants(full, tokenizer, [1, 1, 0, 1])


def test_soft_labels_kept_and_threshold_decides_the_first_error(tokenizer):
    labels = (0.875, 0.125, 0.0, 0.5)
    record = PRMRecord("s", PROBLEM, STEPS, labels)
    assert record.hard_labels is False
    example = tokenize_prm(record, tokenizer, TokenizeConfig(max_length=512, soft_labels=True), 0)
    _check_prm_invariants(example, tokenizer, [0.875, 0.125, 0.0])  # the default cuts after the first 0

    half = TokenizeConfig(max_length=512, soft_labels=True, negative_threshold=0.5)
    example = tokenize_prm(record, tokenizer, half, 0)
    _check_prm_invariants(example, tokenizer, [0.875, 0.125])  # 0.125 <= 0.5 is negative when asked


def test_soft_labels_default_cut_is_after_the_first_zero_as_in_the_paper(tokenizer):
    # [1, 0.25, 0.5, 0]: the real negative step is the last one (no completion reached the answer);
    # a 0.5 threshold would cut at 0.25 and lose it.
    record = PRMRecord("s", PROBLEM, STEPS, (1.0, 0.25, 0.5, 0.0))
    stats = TokenizeStats()
    example = tokenize_prm(record, tokenizer, TokenizeConfig(max_length=512, soft_labels=True), 0, stats)
    _check_prm_invariants(example, tokenizer, [1.0, 0.25, 0.5, 0.0])
    assert stats.steps_dropped_after_error == 0
    hard = PRMRecord("h", PROBLEM, STEPS, (1, 0, 1, 1))
    _check_prm_invariants(tokenize_prm(hard, tokenizer, TokenizeConfig(max_length=512), 0), tokenizer, [1, 0])
    from prm_jax.training.config import default_config

    assert default_config().data.negative_threshold == 0.0


def test_soft_labels_without_soft_mode_are_an_error(tokenizer):
    record = PRMRecord("s", PROBLEM, STEPS, (1.0, 0.75, 0.0, 0.0))
    with pytest.raises(DataError, match="record 's' has soft label 0.75.*soft_labels=True"):
        tokenize_prm(record, tokenizer, TokenizeConfig(max_length=512), 0)


def test_truncation_keeps_only_complete_steps(tokenizer):
    full = build_prm_input(tokenizer, PROBLEM, STEPS)
    # Room for the first two separators and part of step 3.
    max_length = full.separator_positions[1] + 3
    cfg = TokenizeConfig(max_length=max_length, drop_after_first_error=False)
    stats = TokenizeStats()
    example = tokenize_prm(PRMRecord("t", PROBLEM, STEPS, (1, 0, 1, 1)), tokenizer, cfg, 0, stats)
    assert len(example) <= max_length
    two_steps = build_prm_input(tokenizer, PROBLEM, STEPS[:2]).input_ids
    assert example.input_ids.tolist() == two_steps[:max_length]
    assert STEPS[2] not in tokenizer.decode(example.input_ids)
    _check_prm_invariants(example, tokenizer, [1, 0])
    assert stats.truncated == 1 and stats.steps_dropped_overlong == 2
    assert stats.kept == 1 and stats.dropped_overlong == 0


def test_only_the_template_tail_overflowing_is_not_truncation(tokenizer):
    full = build_prm_input(tokenizer, PROBLEM, STEPS)
    max_length = full.separator_positions[-1] + 1
    assert len(full.input_ids) > max_length  # the end-of-turn tokens do not fit
    for overlong in ("truncate", "drop"):
        stats = TokenizeStats()
        cfg = TokenizeConfig(max_length=max_length, overlong=overlong)
        example = tokenize_prm(PRMRecord("t", PROBLEM, STEPS, (1,) * 4), tokenizer, cfg, 0, stats)
        assert example.input_ids.tolist() == full.input_ids[:max_length]
        _check_prm_invariants(example, tokenizer, [1, 1, 1, 1])
        assert stats.truncated == 0 and stats.kept == 1


def test_no_step_fits_or_drop_mode_returns_none_and_counts(tokenizer):
    full = build_prm_input(tokenizer, PROBLEM, STEPS)
    record = PRMRecord("t", PROBLEM, STEPS, (1,) * 4)
    stats = TokenizeStats()
    tiny = TokenizeConfig(max_length=full.separator_positions[0])
    assert tokenize_prm(record, tokenizer, tiny, 0, stats) is None
    drop = TokenizeConfig(max_length=full.separator_positions[2], overlong="drop")
    assert tokenize_prm(record, tokenizer, drop, 0, stats) is None
    fits = TokenizeConfig(max_length=len(full.input_ids), overlong="drop")
    assert tokenize_prm(record, tokenizer, fits, 0, stats) is not None
    assert stats.seen == 3 and stats.kept == 1 and stats.dropped_overlong == 2
    assert stats.steps_dropped_overlong == 8 and stats.truncated == 0


def test_separator_inside_a_step_is_a_data_error():
    # The record refuses it (prm_jax.tokenization.text_problem), before any tokenizer sees it.
    with pytest.raises(DataError, match="field 'steps': step 0 contains the step separator"):
        PRMRecord("bad", PROBLEM, ("a <extra_0> b",), (1,))


def test_sft_loss_on_completion_and_eos_only(tokenizer):
    completion = "We compute 3 * 4 = 12.\n\nSo the answer is \\boxed{14}."
    stats = TokenizeStats()
    example = tokenize_sft(SFTRecord("x", PROBLEM, completion), tokenizer, TokenizeConfig(max_length=512), 3, stats)
    prompt_text = _sft_prompt(tokenizer, PROBLEM)
    assert prompt_text.endswith("<|im_start|>assistant\n") and SYSTEM_PROMPT in prompt_text
    prompt_ids = tokenizer.encode(prompt_text, add_special_tokens=False)
    completion_ids = tokenizer.encode(completion, add_special_tokens=False)
    ids = example.input_ids.tolist()
    assert ids == prompt_ids + completion_ids + [tokenizer.eos_token_id]
    pos = _supervised(example)
    assert pos.tolist() == list(range(len(prompt_ids) - 1, len(ids) - 1))
    np.testing.assert_array_equal(example.targets[pos], example.input_ids[pos + 1])
    assert tokenizer.decode(example.targets[pos]) == completion + tokenizer.eos_token
    assert not example.targets[example.loss_mask == 0].any()
    assert not example.labels.any() and (example.step_index == -1).all()
    assert stats.kept == 1 and stats.supervised_positions == len(completion_ids) + 1


def test_sft_plain_prompt_without_chat_template(plain_tokenizer):
    example = tokenize_sft(
        SFTRecord("x", "Add 1 and 2.", "1 + 2 = 3."), plain_tokenizer, TokenizeConfig(max_length=512), 0
    )
    text = plain_tokenizer.decode(example.input_ids)
    assert text == f"{SYSTEM_PROMPT}\n\nAdd 1 and 2.\n\n1 + 2 = 3.{plain_tokenizer.eos_token}"
    pos = _supervised(example)
    assert plain_tokenizer.decode(example.targets[pos]) == "1 + 2 = 3." + plain_tokenizer.eos_token


@pytest.mark.parametrize("fixture", ["tokenizer", "plain_tokenizer"])
def test_sft_prompt_is_the_synthesis_policy_prompt(fixture, request):
    """Policy SFT trains on the prompt synthesis samples the policy with (one renderer, one rule)."""
    from data_pipeline.solutions import policy_prompt

    tok = request.getfixturevalue(fixture)
    example = tokenize_sft(SFTRecord("x", PROBLEM, "14"), tok, TokenizeConfig(max_length=512), 0)
    prompt_ids = tok.encode(policy_prompt(tok, PROBLEM), add_special_tokens=False)
    assert example.input_ids.tolist()[: len(prompt_ids)] == prompt_ids
    assert len(example.input_ids) == len(prompt_ids) + len(tok.encode("14", add_special_tokens=False)) + 1


def test_sft_overlong(tokenizer):
    completion = "Step 1: We compute 3 * 4 = 12. Then 2 + 12 = 14."
    record = SFTRecord("x", PROBLEM, completion)
    prompt_len = len(tokenizer.encode(_sft_prompt(tokenizer, PROBLEM), add_special_tokens=False))
    completion_ids = tokenizer.encode(completion, add_special_tokens=False)
    stats = TokenizeStats()
    cut = tokenize_sft(record, tokenizer, TokenizeConfig(max_length=prompt_len + 3), 0, stats)
    assert len(cut) == prompt_len + 3
    assert cut.targets[_supervised(cut)].tolist() == completion_ids[:3]  # EOS cut first
    assert stats.truncated == 1
    assert tokenize_sft(record, tokenizer, TokenizeConfig(max_length=prompt_len), 0, stats) is None
    drop = TokenizeConfig(max_length=prompt_len + 3, overlong="drop")
    assert tokenize_sft(record, tokenizer, drop, 0, stats) is None
    assert stats.dropped_overlong == 2 and stats.kept == 1 and stats.seen == 3


def test_load_prm_examples_indexes_and_counts(tokenizer, tmp_path):
    rows = [
        {"id": "a", "problem": PROBLEM, "steps": list(STEPS), "labels": [1, 1, 0, 0]},
        {"id": "b", "problem": "x" * 400, "steps": ["y"], "labels": [1]},  # too long
        {"id": "c", "problem": PROBLEM, "steps": list(STEPS[:2]), "labels": [1, 1]},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    examples, stats = load_prm_examples(path, tokenizer, TokenizeConfig(max_length=160))
    assert [(e.example_index, e.record_id) for e in examples] == [(0, "a"), (1, "c")]
    assert stats.as_dict() == {
        "seen": 3,
        "kept": 2,
        "truncated": 0,
        "dropped_overlong": 1,
        "steps_dropped_after_error": 1,
        "steps_dropped_overlong": 1,
        "supervised_positions": 5,
        "tokens": len(examples[0]) + len(examples[1]),
    }
    merged = TokenizeStats().merge(stats).merge(stats)
    assert merged.seen == 6 and merged.supervised_positions == 10


def test_load_errors_carry_file_and_line(tokenizer, tmp_path):
    soft = {"id": "s", "problem": PROBLEM, "steps": ["a", "b"], "labels": [0.5, 1.0]}
    path = tmp_path / "soft.jsonl"
    path.write_text("\n" + json.dumps(soft) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"soft\.jsonl:2: field 'labels': record 's' has soft"):
        load_prm_examples(path, tokenizer, TokenizeConfig(max_length=512))
    examples, _ = load_prm_examples(path, tokenizer, TokenizeConfig(512, soft_labels=True))
    assert examples[0].labels[examples[0].loss_mask > 0].tolist() == [0.5, 1.0]


def test_load_refuses_a_split_separator(tmp_path):
    from transformers import AutoTokenizer

    split = AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path / "split", separator_special=False))
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"id": "a", "problem": "p", "steps": ["s"], "labels": [1]}) + "\n")
    with pytest.raises(ValueError, match="prepare_step_separator"):
        load_prm_examples(path, split, TokenizeConfig(max_length=512))


def test_load_sft_examples(tokenizer, tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(
        json.dumps({"id": "a", "prompt": "Hi", "completion": "Hello."})
        + "\n"
        + json.dumps({"id": "b", "prompt": "1+1?", "completion": "2"})
        + "\n",
        encoding="utf-8",
    )
    examples, stats = load_sft_examples(path, tokenizer, TokenizeConfig(max_length=256))
    assert [e.record_id for e in examples] == ["a", "b"] and stats.kept == 2
    assert tokenizer.decode(examples[1].targets[examples[1].loss_mask > 0]) == "2<|im_end|>"


def test_config_and_example_validation():
    with pytest.raises(ValueError, match="max_length"):
        TokenizeConfig(max_length=1)
    with pytest.raises(ValueError, match="overlong"):
        TokenizeConfig(max_length=8, overlong="split")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negative_threshold"):
        TokenizeConfig(max_length=8, negative_threshold=1.0)  # every label would be negative
    ok = dict(
        input_ids=np.zeros(3, np.int32),
        loss_mask=np.zeros(3, np.float32),
        labels=np.zeros(3, np.float32),
        targets=np.zeros(3, np.int32),
        step_index=np.full(3, -1, np.int32),
        example_index=0,
    )
    Example(**ok)
    with pytest.raises(ValueError, match="input_ids must be int32"):
        Example(**{**ok, "input_ids": np.zeros(3, np.int64)})
    with pytest.raises(ValueError, match="labels has length 2"):
        Example(**{**ok, "labels": np.zeros(2, np.float32)})
