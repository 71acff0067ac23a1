"""Step-separator handling and the Qwen2.5-Math-PRM input layout.

A PRM is trained and queried with one classification target per step, read at the token that
ends the step. Qwen2.5-Math-PRM marks that position with the step separator ``<extra_0>``: the
assistant turn is ``"<extra_0>".join(steps) + "<extra_0>"`` inside the model's chat template, and
the step reward is read at every position holding the separator's token id. Everything here exists
to make those positions exact: the separator must be a *single* token (otherwise there is no one
position to read), the rendered text must be encoded the same way the reference code does, and the
number of separator tokens must equal the number of steps.

The ``transformers`` tokenizer is only used through its public API (``encode``, ``decode``,
``apply_chat_template``, ``add_special_tokens``) and works with transformers 4.45+ and 5.x.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers is heavy to import; only type checkers need it here.
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "STEP_SEPARATOR",
    "SYSTEM_PROMPT",
    "PRMInput",
    "separator_token_id",
    "ensure_step_separator",
    "build_prm_input",
]

#: The step separator of Qwen2.5-Math-PRM (id 151651 in the Qwen2.5 vocabulary).
STEP_SEPARATOR = "<extra_0>"

#: The system prompt Qwen2.5-Math-PRM was trained with (its model card uses it verbatim).
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


def _encode_plain(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Encode ``text`` without letting the tokenizer add BOS/EOS or other template tokens.

    Text passed here is either already fully rendered (chat template output) or a bare separator,
    so anything the tokenizer would add on its own would be a spurious extra token.
    """
    return list(tokenizer.encode(text, add_special_tokens=False))


def separator_token_id(
    tokenizer: PreTrainedTokenizerBase, separator: str = STEP_SEPARATOR
) -> int | None:
    """Return the separator's token id if it encodes to exactly one token, else ``None``.

    ``None`` means the tokenizer splits the separator into several pieces, so a model built on it
    has no single position per step to score; see :func:`ensure_step_separator`.
    """
    ids = _encode_plain(tokenizer, separator)
    return ids[0] if len(ids) == 1 else None


def _pieces(tokenizer: PreTrainedTokenizerBase, text: str) -> list[str]:
    """The text of each token ``text`` encodes to, for error messages a human can act on."""
    return [tokenizer.decode([i]) for i in _encode_plain(tokenizer, text)]


def ensure_step_separator(
    tokenizer: PreTrainedTokenizerBase,
    separator: str = STEP_SEPARATOR,
    *,
    add_if_missing: bool = True,
) -> tuple[int, bool]:
    """Make sure ``separator`` is one token; return ``(token_id, added)``.

    Qwen2.5 tokenizers already carry ``<extra_0>`` as a single special token, but a base model
    from another family (or a custom separator) may split it. With ``add_if_missing`` the
    separator is registered as an additional special token (existing additional special tokens
    are kept), which gives it a fresh id at the end of the vocabulary and guarantees it is never
    split or merged with neighbouring text. ``added`` is ``True`` in that case and the caller
    **must** then give the model an embedding row for the new id (resize the vocabulary) before
    training or inference, and save the modified tokenizer next to the model.

    Raises:
        ValueError: The separator splits and ``add_if_missing`` is ``False``.
    """
    token_id = separator_token_id(tokenizer, separator)
    if token_id is not None:
        return token_id, False
    if not add_if_missing:
        raise ValueError(
            f"The step separator {separator!r} is not a single token for this tokenizer: it splits "
            f"into {_pieces(tokenizer, separator)!r}. Call ensure_step_separator(..., "
            "add_if_missing=True) to add it as a special token (and resize the model's embeddings)."
        )
    # transformers 4.x exposes the list as `additional_special_tokens`; 5.x renamed it
    # `extra_special_tokens` (and maps the old dict key onto the new one in add_special_tokens).
    if hasattr(tokenizer, "additional_special_tokens"):
        existing = list(tokenizer.additional_special_tokens)
    else:
        existing = list(getattr(tokenizer, "extra_special_tokens", None) or [])
    existing = [str(t) for t in existing if str(t) != separator]
    tokenizer.add_special_tokens({"additional_special_tokens": [*existing, separator]})
    token_id = separator_token_id(tokenizer, separator)
    if token_id is None:  # Defensive: add_special_tokens should make this impossible.
        raise ValueError(
            f"Adding {separator!r} as a special token did not make it a single token; it still "
            f"splits into {_pieces(tokenizer, separator)!r}."
        )
    return token_id, True


@dataclass(frozen=True)
class PRMInput:
    """One tokenized PRM example.

    Attributes:
        input_ids: Token ids of the whole rendered conversation (system, user, assistant turns).
        separator_positions: Index into ``input_ids`` of the separator that ends each step, one per
            step, in step order. The PRM's step reward for step ``i`` is read at
            ``separator_positions[i]``; training labels go there too.
    """

    input_ids: list[int]
    separator_positions: list[int]

    def __post_init__(self) -> None:
        """Reject positions that cannot index ``input_ids`` in step order (a corrupted example)."""
        n = len(self.input_ids)
        previous = -1
        for pos in self.separator_positions:
            if not previous < pos < n:
                raise ValueError(
                    f"separator_positions must be strictly increasing indices into input_ids "
                    f"(length {n}); got {self.separator_positions!r}"
                )
            previous = pos


def _has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether ``apply_chat_template`` can be used (it raises when no template is set)."""
    return bool(getattr(tokenizer, "chat_template", None))


def build_prm_input(
    tokenizer: PreTrainedTokenizerBase,
    problem: str,
    steps: Sequence[str],
    *,
    separator: str = STEP_SEPARATOR,
    system_prompt: str = SYSTEM_PROMPT,
) -> PRMInput:
    """Tokenize ``(problem, steps)`` in the Qwen2.5-Math-PRM layout.

    The conversation is ``system = system_prompt``, ``user = problem``,
    ``assistant = separator.join(steps) + separator``, rendered with the tokenizer's chat template
    (``apply_chat_template(..., tokenize=False, add_generation_prompt=False)``) and then encoded
    with ``add_special_tokens=False``: the rendered string already contains the template's special
    tokens, and encoding it again with special tokens added would, for tokenizers with a BOS, insert
    a second one. For Qwen tokenizers (no BOS) the ids equal the model card's reference
    ``tokenizer.encode(conversation_str)``.

    Without a chat template (e.g. a base model's tokenizer) the fallback text is
    ``f"{system_prompt}\\n\\n{problem}\\n\\n" + assistant_text``: the same three parts separated by
    blank lines, so the separator positions mean the same thing. A PRM must be trained and
    scored with the same layout; the fallback is only consistent with itself.

    Steps are used exactly as given (no stripping or normalisation), so the text between two
    separators is the step verbatim; split and clean steps before calling this. Empty steps are
    allowed (they yield adjacent separators).

    Raises:
        TypeError: ``problem`` is not a string, ``steps`` is a bare string, or a step is not a
            string.
        ValueError: ``steps`` is empty; a step, the problem or the system prompt contains the
            separator; or the encoded text does not hold exactly one separator token per step
            (typically because the separator is not a single token — call
            :func:`ensure_step_separator` first).
    """
    if not isinstance(problem, str):
        raise TypeError(f"problem must be a str, got {type(problem).__name__}")
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence):
        raise TypeError(
            f"steps must be a sequence of step strings (e.g. a list), got {type(steps).__name__}"
        )
    if len(steps) == 0:
        raise ValueError("steps must be a non-empty sequence of step strings")
    for i, step in enumerate(steps):
        if not isinstance(step, str):
            raise TypeError(f"step {i} must be a str, got {type(step).__name__}")
        if separator in step:
            raise ValueError(
                f"step {i} contains the step separator {separator!r}; steps must not contain it "
                "because the separator marks where each step ends"
            )
    for name, text in (("problem", problem), ("system_prompt", system_prompt)):
        if separator in text:
            raise ValueError(
                f"{name} contains the step separator {separator!r}, which would be scored as a "
                "step; remove it from the text"
            )

    assistant_text = separator.join(steps) + separator
    if _has_chat_template(tokenizer):
        messages = [
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": problem},
            {"role": "assistant", "content": assistant_text},
        ]
        # tokenize=False returns the rendered string in both transformers 4.x and 5.x (5.x returns
        # a BatchEncoding when tokenize=True, 4.x a list of ids); the string path is uniform.
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=False
        )
        if not isinstance(text, str):
            raise TypeError(
                f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str"
            )
    else:
        text = f"{system_prompt}\n\n{problem}\n\n" + assistant_text

    input_ids = _encode_plain(tokenizer, text)
    sep_id = separator_token_id(tokenizer, separator)
    positions = [] if sep_id is None else [p for p, t in enumerate(input_ids) if t == sep_id]
    if len(positions) != len(steps):
        if sep_id is None:
            reason = (
                f"the separator {separator!r} is not a single token for this tokenizer (it splits "
                f"into {_pieces(tokenizer, separator)!r}); call ensure_step_separator(tokenizer) "
                "first and resize the model's embeddings if it adds a token"
            )
        else:
            reason = (
                f"found {len(positions)} tokens with the separator id {sep_id}; the separator "
                "must be an added (special) token so it is never merged with neighbouring text "
                "(see ensure_step_separator), and the chat template must not add or drop it"
            )
        raise ValueError(
            f"expected one separator token per step ({len(steps)} steps), but {reason}"
        )
    return PRMInput(input_ids=input_ids, separator_positions=positions)
