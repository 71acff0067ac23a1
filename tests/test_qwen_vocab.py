"""The real Qwen2.5 vocabulary (built offline from dashscope's ranks) and the separator convention.

Facts checked here are properties of the released tokenizers: if the builder drifted from them, the
conversion/training/export tests that use it would stop standing for a real Qwen checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_assets import build_tiny_tokenizer
from transformers import AutoTokenizer

from prm_jax.data.tokenize import check_separator
from prm_jax.tokenization import (
    QWEN2_5_ADDED_TOKENS,
    STEP_SEPARATOR,
    build_prm_input,
    is_qwen2_5_vocabulary,
    prepare_step_separator,
    separator_token_id,
    vocabulary_fingerprint,
)

PROBLEM = "Compute (12 + 30) * 2."
STEPS = ["12 + 30 = 42", "42 * 2 = 84", "So the answer is \\boxed{84}."]


@pytest.fixture(scope="module")
def base(qwen_tokenizer_dirs):
    return AutoTokenizer.from_pretrained(qwen_tokenizer_dirs["base"])


@pytest.fixture(scope="module")
def released_prm(qwen_tokenizer_dirs):
    return AutoTokenizer.from_pretrained(qwen_tokenizer_dirs["prm"])


def test_real_vocabulary_facts(base, released_prm) -> None:
    assert len(base) == len(released_prm) == 151_665
    assert base.encode("Hello world") == [9707, 1879]
    assert base.encode("2024") == [17, 15, 17, 19]  # digits one per token
    assert [base.decode([i]) for i in base.encode("2024")] == ["2", "0", "2", "4"]
    assert base.encode("\n\n") == [271]
    ids = list(range(151_643, 151_665))
    assert base.convert_ids_to_tokens(ids) == list(QWEN2_5_ADDED_TOKENS)
    assert base.convert_ids_to_tokens([151_644, 151_645, 151_651, 151_657, 151_664]) == [
        "<|im_start|>",
        "<|im_end|>",
        "<|quad_end|>",
        "<tool_call>",
        "<|file_sep|>",
    ]
    # <extra_0> is not a Qwen2.5 token: the base splits it into five; only the released PRM maps it.
    assert [base.decode([i]) for i in base.encode(STEP_SEPARATOR)] == ["<", "extra", "_", "0", ">"]
    assert released_prm.encode(STEP_SEPARATOR) == [151_651]
    assert released_prm.convert_ids_to_tokens(151_651) == STEP_SEPARATOR
    assert base.encode("<|im_start|>user") == [151_644, 872]


def test_training_data_from_the_base_needs_the_separator_prepared(base) -> None:
    """What stopped `launch.train --config.data.tokenizer_dir=<Qwen2.5-Math-Instruct>` before."""
    assert separator_token_id(base) is None
    with pytest.raises(ValueError, match="not a single token"):
        check_separator(base)


def test_base_takes_the_released_prms_separator_slot(base, released_prm, tmp_path: Path) -> None:
    assert is_qwen2_5_vocabulary(base) and not is_qwen2_5_vocabulary(released_prm)
    prepared, sep = prepare_step_separator(base)
    assert (sep.token_id, sep.origin) == (151_651, "qwen2_5_slot")
    assert len(prepared) == len(base) and separator_token_id(base) is None  # the input is untouched
    # Same vocabulary as the released PRM's tokenizer, id for id.
    assert sep.vocabulary == vocabulary_fingerprint(released_prm)
    assert prepare_step_separator(released_prm)[1] == sep.__class__(STEP_SEPARATOR, 151_651, "existing", sep.vocabulary)
    prepared.save_pretrained(tmp_path / "tok")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert reloaded.encode(STEP_SEPARATOR) == [151_651] and vocabulary_fingerprint(reloaded) == sep.vocabulary
    # The model card's recipe finds exactly the steps build_prm_input supervises.
    x = build_prm_input(reloaded, PROBLEM, STEPS)
    x_ref = build_prm_input(released_prm, PROBLEM, STEPS)
    assert x.input_ids == x_ref.input_ids
    card_id = reloaded.encode(STEP_SEPARATOR)[0]
    assert [p for p, t in enumerate(x.input_ids) if t == card_id] == x.separator_positions
    assert len(x.separator_positions) == len(STEPS)
    # Everything else still tokenizes as in the base.
    text = reloaded.apply_chat_template([{"role": "user", "content": PROBLEM}], tokenize=False)
    assert reloaded.encode(text) == base.encode(text)


def test_other_vocabularies_get_a_new_special_token(tmp_path: Path) -> None:
    tiny = AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path / "tok", separator_special=False))
    assert not is_qwen2_5_vocabulary(tiny)
    prepared, sep = prepare_step_separator(tiny)
    assert (sep.token_id, sep.origin) == (403, "added") and prepared.encode(STEP_SEPARATOR) == [403]
    with pytest.raises(ValueError, match="not a single token"):
        prepare_step_separator(AutoTokenizer.from_pretrained(tmp_path / "tok"), add_if_missing=False)


def test_a_copied_layout_without_qwens_ranks_is_not_taken_for_qwen(base, tmp_path: Path) -> None:
    """Only the real vocabulary may have 151651 renamed: one extra token already breaks the layout."""
    base.save_pretrained(tmp_path / "grown")
    grown = AutoTokenizer.from_pretrained(tmp_path / "grown")
    grown.add_tokens(["<|my_marker|>"])
    assert not is_qwen2_5_vocabulary(grown)
    assert prepare_step_separator(grown)[1].token_id == 151_666
