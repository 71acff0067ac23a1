"""Tests for prm_jax.tokenization on tiny offline tokenizers (see tiny_assets.py).

What matters for a PRM is that every step ends at exactly one separator token whose position we
know, and that our ids match the reference recipe of the Qwen2.5-Math-PRM model card, so a model
trained with our inputs is scored correctly by other tools (transformers, vLLM) and vice versa.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_assets import IM_END, IM_START, build_tiny_tokenizer
from tokenizers import processors
from transformers import AutoTokenizer

from prm_jax.tokenization import (
    STEP_SEPARATOR,
    SYSTEM_PROMPT,
    PRMInput,
    build_prm_input,
    ensure_step_separator,
    render_chat,
    separator_token_id,
)

PROBLEM = "Tom has 3 boxes with 4 apples each. He eats 2. How many apples are left?"
# Leading/trailing whitespace and newlines on purpose: steps must survive verbatim.
STEPS = [
    "Each box has 4 apples, so 3 * 4 = 12 apples.",
    " He eats 2, so 12 - 2 = 10.\n",
    "\nThe answer is $\\boxed{10}$.",
]


@pytest.fixture(scope="session")
def chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny tokenizer with the Qwen-style chat template and <extra_0> as a special token."""
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok_chat"))


@pytest.fixture(scope="session")
def plain_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny tokenizer without a chat template (base-model style)."""
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok_plain"), chat_template=False)


@pytest.fixture(scope="session")
def split_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny tokenizer on which <extra_0> is not a token and splits into pieces."""
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok_split"), separator_special=False)


def _load(path: Path):
    """Load a fresh tokenizer (tests that mutate it must not share one)."""
    return AutoTokenizer.from_pretrained(str(path))


def _chat(system: str, user: str, assistant: str) -> str:
    """The Qwen2.5 rendering of a three-turn conversation, written out by hand."""
    return (
        f"{IM_START}system\n{system}{IM_END}\n"
        f"{IM_START}user\n{user}{IM_END}\n"
        f"{IM_START}assistant\n{assistant}{IM_END}\n"
    )


# --- the tiny tokenizer itself -------------------------------------------------------------


def test_tiny_tokenizer_is_qwen_like(chat_dir: Path) -> None:
    tok = _load(chat_dir)
    assert 300 <= len(tok) <= 500
    assert tok.pad_token == "<|endoftext|>"
    assert tok.eos_token == IM_END
    assert tok.bos_token is None
    sep_id = tok.convert_tokens_to_ids(STEP_SEPARATOR)
    assert separator_token_id(tok) == sep_id
    assert sep_id in tok.all_special_ids
    assert ensure_step_separator(tok) == (sep_id, False)
    # No BOS/EOS is added by default, which is what makes the model-card path match ours.
    text = "Step 1: 2 + 3 = 5.\n\n"
    assert tok.encode(text) == tok.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(text)) == text
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == f"{IM_START}user\nhi{IM_END}\n{IM_START}assistant\n"


def test_tiny_tokenizer_is_deterministic(tmp_path: Path) -> None:
    a = build_tiny_tokenizer(tmp_path / "a", separator_special=False)
    b = build_tiny_tokenizer(tmp_path / "b", separator_special=False)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_tiny_tokenizer_without_template(plain_dir: Path) -> None:
    tok = _load(plain_dir)
    assert not tok.chat_template
    assert separator_token_id(tok) is not None


# --- separator handling ----------------------------------------------------------------------


def test_split_separator_is_detected_and_named(split_dir: Path) -> None:
    tok = _load(split_dir)
    pieces = [tok.decode([i]) for i in tok.encode(STEP_SEPARATOR, add_special_tokens=False)]
    assert len(pieces) > 1
    assert separator_token_id(tok) is None
    with pytest.raises(ValueError) as err:
        ensure_step_separator(tok, add_if_missing=False)
    assert repr(STEP_SEPARATOR) in str(err.value)
    assert repr(pieces) in str(err.value)
    assert separator_token_id(tok) is None  # nothing was added


def test_ensure_step_separator_adds_and_survives_reload(split_dir: Path, tmp_path: Path) -> None:
    tok = _load(split_dir)
    original_len = len(tok)
    specials_before = set(tok.all_special_tokens)

    sep_id, added = ensure_step_separator(tok)
    assert added is True
    assert sep_id >= original_len
    assert len(tok) == original_len + 1
    assert tok.encode(STEP_SEPARATOR, add_special_tokens=False) == [sep_id]
    assert separator_token_id(tok) == sep_id
    # Existing special tokens are kept; the separator joins them.
    assert specials_before | {STEP_SEPARATOR} <= set(tok.all_special_tokens)
    # In context it is never merged with neighbouring text.
    ids = tok.encode("a<extra_0>b <extra_0>\n", add_special_tokens=False)
    assert ids.count(sep_id) == 2
    # Idempotent.
    assert ensure_step_separator(tok) == (sep_id, False)

    tok.save_pretrained(str(tmp_path / "saved"))
    reloaded = _load(tmp_path / "saved")
    assert len(reloaded) == original_len + 1
    assert separator_token_id(reloaded) == sep_id
    assert ensure_step_separator(reloaded, add_if_missing=False) == (sep_id, False)
    assert reloaded.encode("x<extra_0>", add_special_tokens=False) == tok.encode("x<extra_0>", add_special_tokens=False)


# --- render_chat: the one chat layout -------------------------------------------------------

USER = [{"role": "user", "content": PROBLEM}]


@pytest.mark.parametrize("system_prompt", [None, ""])
def test_render_chat_without_system_prompt_adds_no_system_turn(
    system_prompt: str | None, chat_dir: Path, plain_dir: Path
) -> None:
    """`None` and `""` are one case: no system turn (never an empty one), in every layout."""
    chat, plain = _load(chat_dir), _load(plain_dir)
    opened = f"{IM_START}user\n{PROBLEM}{IM_END}\n{IM_START}assistant\n"
    assert render_chat(chat, USER, system_prompt=system_prompt) == opened
    assert render_chat(plain, USER, system_prompt=system_prompt) == f"{PROBLEM}\n\n"
    assistant = STEP_SEPARATOR.join(STEPS) + STEP_SEPARATOR
    prm = build_prm_input(chat, PROBLEM, STEPS, system_prompt=system_prompt)
    assert chat.decode(prm.input_ids) == f"{opened}{assistant}{IM_END}\n"
    prm = build_prm_input(plain, PROBLEM, STEPS, system_prompt=system_prompt)
    assert plain.decode(prm.input_ids) == f"{PROBLEM}\n\n{assistant}"


@pytest.mark.parametrize("system_prompt", [None, ""])
def test_render_chat_leaves_the_default_to_a_qwen_math_template(
    system_prompt: str | None, qwen_tokenizer_dirs: dict[str, Path]
) -> None:
    """Qwen2.5-Math-Instruct's template supplies the math system prompt when none is given, so no
    system prompt renders exactly what the paper's system prompt does, for the policy and the PRM."""
    base, prm = _load(qwen_tokenizer_dirs["base"]), _load(qwen_tokenizer_dirs["prm"])
    assert render_chat(base, USER, system_prompt=system_prompt) == render_chat(base, USER, system_prompt=SYSTEM_PROMPT)
    assert build_prm_input(prm, PROBLEM, STEPS, system_prompt=system_prompt) == build_prm_input(prm, PROBLEM, STEPS)


def test_render_chat_turns(chat_dir: Path, plain_dir: Path) -> None:
    chat, plain = _load(chat_dir), _load(plain_dir)
    # A system prompt opens the chat; the assistant turn is left open for the answer.
    text = render_chat(chat, USER, system_prompt="Be brief.")
    assert text == f"{IM_START}system\nBe brief.{IM_END}\n{IM_START}user\n{PROBLEM}{IM_END}\n{IM_START}assistant\n"
    assert render_chat(plain, USER, system_prompt="Be brief.") == f"Be brief.\n\n{PROBLEM}\n\n"
    # A last assistant message closes the chat: no second, empty assistant turn.
    closed = [*USER, {"role": "assistant", "content": "12"}]
    assert render_chat(chat, closed) == f"{IM_START}user\n{PROBLEM}{IM_END}\n{IM_START}assistant\n12{IM_END}\n"
    assert render_chat(plain, closed) == f"{PROBLEM}\n\n12"
    # The messages' own system turn is kept; a second one is refused, not silently dropped.
    own = [{"role": "system", "content": "Be brief."}, *USER]
    assert render_chat(chat, own) == text
    with pytest.raises(ValueError, match="already open with a system turn"):
        render_chat(chat, own, system_prompt=SYSTEM_PROMPT)
    with pytest.raises(ValueError, match="at least one message"):
        render_chat(chat, [])


# --- build_prm_input -------------------------------------------------------------------------


def _check_steps(tok, prm: PRMInput, steps: list[str], prefix: str, suffix: str) -> None:
    """Positions hold the separator, and the tokens between separators decode to the steps."""
    sep_id = separator_token_id(tok)
    pos = prm.separator_positions
    assert len(pos) == len(steps)
    assert all(prm.input_ids[p] == sep_id for p in pos)
    assert prm.input_ids.count(sep_id) == len(steps)
    assert tok.decode(prm.input_ids[: pos[0]]) == prefix + steps[0]
    for i in range(1, len(steps)):
        assert tok.decode(prm.input_ids[pos[i - 1] + 1 : pos[i]]) == steps[i]
    assert tok.decode(prm.input_ids[pos[-1] + 1 :]) == suffix


def test_build_prm_input_chat_layout(chat_dir: Path) -> None:
    tok = _load(chat_dir)
    prm = build_prm_input(tok, PROBLEM, STEPS)
    assistant = STEP_SEPARATOR.join(STEPS) + STEP_SEPARATOR
    expected = _chat(SYSTEM_PROMPT, PROBLEM, assistant)
    assert tok.decode(prm.input_ids) == expected
    prefix = f"{IM_START}system\n{SYSTEM_PROMPT}{IM_END}\n{IM_START}user\n{PROBLEM}{IM_END}\n"
    _check_steps(tok, prm, STEPS, prefix + f"{IM_START}assistant\n", f"{IM_END}\n")
    # The assistant turn ends "<extra_0><|im_end|>\n" as in the Qwen2.5-Math-PRM layout.
    assert prm.input_ids[prm.separator_positions[-1] + 1] == tok.convert_tokens_to_ids(IM_END)
    assert prm.separator_positions[-1] == len(prm.input_ids) - 3


@pytest.mark.parametrize("tokenizer", ["tiny", "qwen2_5_prm"])
def test_build_prm_input_matches_model_card_reference(tokenizer: str, request: pytest.FixtureRequest) -> None:
    """The Qwen2.5-Math-PRM model card renders with tokenize=False then calls tokenizer.encode;
    also on the released PRM's real vocabulary (separator 151651, digits one token each)."""
    if tokenizer == "tiny":
        tok = _load(request.getfixturevalue("chat_dir"))
    else:
        tok = _load(request.getfixturevalue("qwen_tokenizer_dirs")["prm"])
        assert tok.encode("<extra_0>") == [151_651]
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": PROBLEM},
        {"role": "assistant", "content": "<extra_0>".join(STEPS) + "<extra_0>"},
    ]
    conversation_str = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert isinstance(conversation_str, str)
    reference_ids = tok.encode(conversation_str)  # default add_special_tokens=True, as in the card
    step_sep_id = tok.encode("<extra_0>")[0]
    prm = build_prm_input(tok, PROBLEM, STEPS)
    assert prm.input_ids == reference_ids
    assert prm.separator_positions == [i for i, t in enumerate(reference_ids) if t == step_sep_id]

    # Tokenizing inside apply_chat_template gives the same ids; transformers 5 returns a
    # BatchEncoding by default there (4.x returned a list), hence the unwrapping.
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=False)
    ids = out if isinstance(out, list) else list(out["input_ids"])
    assert ids == reference_ids


def test_build_prm_input_does_not_add_special_tokens_again(chat_dir: Path) -> None:
    """With a BOS-adding tokenizer the rendered text must not get a second, template-less BOS."""
    tok = _load(chat_dir)
    bos_id = tok.convert_tokens_to_ids("<|endoftext|>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos_id)]
    )
    assert tok.encode("hi")[0] == bos_id  # the tokenizer now adds a BOS by default
    prm = build_prm_input(tok, PROBLEM, STEPS)
    assert prm.input_ids[0] != bos_id
    assert tok.decode(prm.input_ids) == _chat(SYSTEM_PROMPT, PROBLEM, STEP_SEPARATOR.join(STEPS) + STEP_SEPARATOR)


def test_build_prm_input_custom_system_prompt_and_single_step(chat_dir: Path) -> None:
    tok = _load(chat_dir)
    prm = build_prm_input(tok, "1 + 1?", ["2"], system_prompt="Be brief.")
    assert tok.decode(prm.input_ids) == _chat("Be brief.", "1 + 1?", "2" + STEP_SEPARATOR)
    assert len(prm.separator_positions) == 1


def test_build_prm_input_allows_empty_steps(chat_dir: Path) -> None:
    tok = _load(chat_dir)
    steps = ["first", "", "third"]
    prm = build_prm_input(tok, PROBLEM, steps)
    a, b, _ = prm.separator_positions
    assert b == a + 1
    prefix = _chat(SYSTEM_PROMPT, PROBLEM, "").removesuffix(f"{IM_END}\n")
    _check_steps(tok, prm, steps, prefix, f"{IM_END}\n")


def test_build_prm_input_plain_fallback(plain_dir: Path) -> None:
    tok = _load(plain_dir)
    prm = build_prm_input(tok, PROBLEM, STEPS)
    assistant = STEP_SEPARATOR.join(STEPS) + STEP_SEPARATOR
    assert tok.decode(prm.input_ids) == f"{SYSTEM_PROMPT}\n\n{PROBLEM}\n\n{assistant}"
    _check_steps(tok, prm, STEPS, f"{SYSTEM_PROMPT}\n\n{PROBLEM}\n\n", "")
    assert prm.separator_positions[-1] == len(prm.input_ids) - 1


def test_build_prm_input_custom_separator(tmp_path: Path) -> None:
    tok = _load(build_tiny_tokenizer(tmp_path / "tok", separator="<step>"))
    assert separator_token_id(tok, "<step>") is not None
    assert separator_token_id(tok) is None  # <extra_0> is not in this vocabulary
    prm = build_prm_input(tok, PROBLEM, STEPS, separator="<step>")
    expected = _chat(SYSTEM_PROMPT, PROBLEM, "<step>".join(STEPS) + "<step>")
    assert tok.decode(prm.input_ids) == expected
    sep_id = separator_token_id(tok, "<step>")
    assert [prm.input_ids[p] for p in prm.separator_positions] == [sep_id] * len(STEPS)


# --- errors ----------------------------------------------------------------------------------


def test_build_prm_input_rejects_empty_steps(chat_dir: Path) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        build_prm_input(_load(chat_dir), PROBLEM, [])


def test_build_prm_input_rejects_bad_types(chat_dir: Path) -> None:
    tok = _load(chat_dir)
    with pytest.raises(TypeError, match="sequence of step strings"):
        build_prm_input(tok, PROBLEM, "a single string is not a list of steps")
    with pytest.raises(TypeError, match="step 1"):
        build_prm_input(tok, PROBLEM, ["ok", 3])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="problem"):
        build_prm_input(tok, None, ["ok"])  # type: ignore[arg-type]


def test_build_prm_input_rejects_separator_inside_text(chat_dir: Path) -> None:
    tok = _load(chat_dir)
    with pytest.raises(ValueError, match="step 1 contains"):
        build_prm_input(tok, PROBLEM, ["fine", "bad <extra_0> step", "fine"])
    with pytest.raises(ValueError, match="problem contains"):
        build_prm_input(tok, "what is <extra_0>?", ["x"])
    with pytest.raises(ValueError, match="system_prompt contains"):
        build_prm_input(tok, PROBLEM, ["x"], system_prompt="<extra_0>")


def test_build_prm_input_requires_single_token_separator(split_dir: Path) -> None:
    tok = _load(split_dir)
    with pytest.raises(ValueError, match="ensure_step_separator") as err:
        build_prm_input(tok, PROBLEM, STEPS)
    assert "not a single token" in str(err.value)
    sep_id, added = ensure_step_separator(tok)
    assert added
    prm = build_prm_input(tok, PROBLEM, STEPS)
    assert [prm.input_ids[p] for p in prm.separator_positions] == [sep_id] * len(STEPS)


def test_prm_input_rejects_bad_positions() -> None:
    PRMInput(input_ids=[5, 6, 7], separator_positions=[0, 2])
    with pytest.raises(ValueError, match="strictly increasing"):
        PRMInput(input_ids=[5, 6, 7], separator_positions=[2, 1])
    with pytest.raises(ValueError, match="strictly increasing"):
        PRMInput(input_ids=[5, 6, 7], separator_positions=[3])
