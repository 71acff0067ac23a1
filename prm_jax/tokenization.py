"""Step-separator handling, the one chat renderer, and the Qwen2.5-Math-PRM input layout.

A PRM is trained and queried with one classification target per step, read at the token that
ends the step. Qwen2.5-Math-PRM marks that position with the step separator `<extra_0>`: the
assistant turn is `"<extra_0>".join(steps) + "<extra_0>"` inside the model's chat template, and
the step reward is read at every position holding the separator's token id. Everything here exists
to make those positions exact: the separator must be a *single* token (otherwise there is no one
position to read), the rendered text must be encoded the same way the reference code does, and the
number of separator tokens must equal the number of steps.

Where the separator's id comes from (`prepare_step_separator`, the one convention training
and export share): `<extra_0>` is *not* in the Qwen2.5 vocabulary. The base and Instruct
tokenizers split it into five tokens (`<`, `extra`, `_`, `0`, `>`), and id 151651 there is
the added token `<|quad_end|>`. Only the *released* Qwen2.5-Math-PRM's tokenizer maps
`<extra_0>` to 151651, and vLLM's native `Qwen2ForProcessRewardModel` pools on step_tag_id
151651 by default. So a Qwen2.5-vocabulary tokenizer gets the separator at 151651 (replacing
`<|quad_end|>`'s string, exactly what the released PRM did), and any other vocabulary gets it as a
new special token; an id other than 151651 must then be passed to vLLM explicitly
(`vllm_pooler_setting`).

What text may hold (`text_problem`, the one text-validity rule of synthesis input, training
records and evaluation records): no step separator, and no control token (`<|im_end|>`,
`<|im_start|>`, `<|endoftext|>`, any special token of the tokenizer at hand). A tokenizer reads
each as one control token, never as text: a separator inside a step is scored as a step end, and
`<|im_end|>` inside a problem closes the user turn, faking a turn boundary in every prompt built
from it. Readers without a tokenizer apply it with `CONTROL_TOKENS`; `build_prm_input` (training
and scoring) and synthesis's sample stage add the tokenizer's own special tokens (`control_tokens`).

The `transformers` tokenizer is only used through its public API (`encode`, `decode`,
`apply_chat_template`, `add_special_tokens`, `save_pretrained`) and works with transformers
4.45+ and 5.x.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # transformers is heavy to import; only type checkers need it here.
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "STEP_SEPARATOR",
    "SYSTEM_PROMPT",
    "CONTROL_TOKENS",
    "CHAT_CONTROL_TOKENS",
    "control_tokens",
    "text_problem",
    "QWEN2_5_ADDED_TOKENS",
    "QWEN2_5_FIRST_ADDED_ID",
    "VLLM_DEFAULT_STEP_TAG_ID",
    "PRMInput",
    "StepSeparator",
    "separator_token_id",
    "ensure_step_separator",
    "is_qwen2_5_vocabulary",
    "prepare_step_separator",
    "vocabulary_fingerprint",
    "vllm_pooler_setting",
    "render_chat",
    "build_prm_input",
]

#: The step separator of Qwen2.5-Math-PRM. Not a token of the Qwen2.5 base/Instruct vocabulary
#: (it splits into 5 tokens there); the released PRM's tokenizer maps it to id 151651.
STEP_SEPARATOR = "<extra_0>"

#: The 22 added tokens of every Qwen2.5 tokenizer, at ids 151643.. in this order (151,643 BPE ranks
#: come first). Id 151651 is `<|quad_end|>`, the slot the released PRM gave to `<extra_0>`.
# fmt: off
QWEN2_5_ADDED_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)
# fmt: on
QWEN2_5_FIRST_ADDED_ID = 151_643

#: The separator id of the released Qwen2.5-Math-PRM, and vLLM's default STEP-pooling step_tag_id.
VLLM_DEFAULT_STEP_TAG_ID = 151_651
_QWEN_SEPARATOR_SLOT = "<|quad_end|>"  # what id 151651 holds in the base/Instruct tokenizers
# A BPE fact of the Qwen2/2.5 ranks: tells the real vocabulary from one that only copied the
# added tokens' names.
_QWEN_BPE_PROBE = ("Hello world", [9707, 1879])

#: Control tokens of the chat format, refused in any text that becomes part of a prompt (problems,
#: steps, SFT prompts and completions) where no tokenizer is at hand: Qwen2.5's added tokens, the
#: family this project trains and its turn markers among them.
CHAT_CONTROL_TOKENS: tuple[str, ...] = QWEN2_5_ADDED_TOKENS

#: ... and with the step separator first: what a problem or a step of a PRM record may not hold.
CONTROL_TOKENS: tuple[str, ...] = (STEP_SEPARATOR, *CHAT_CONTROL_TOKENS)

#: The system prompt Qwen2.5-Math-PRM was trained with (its model card uses it verbatim).
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


def _encode_plain(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Encode `text` without letting the tokenizer add BOS/EOS or other template tokens.

    Text passed here is either already fully rendered (chat template output) or a bare separator,
    so anything the tokenizer would add on its own would be a spurious extra token.
    """
    return list(tokenizer.encode(text, add_special_tokens=False))


def separator_token_id(tokenizer: PreTrainedTokenizerBase, separator: str = STEP_SEPARATOR) -> int | None:
    """Return the separator's token id if it encodes to exactly one token, else `None`.

    `None` means the tokenizer splits the separator into several pieces, so a model built on it
    has no single position per step to score; see `ensure_step_separator`.
    """
    ids = _encode_plain(tokenizer, separator)
    return ids[0] if len(ids) == 1 else None


def _special_tokens(tokenizer: Any) -> tuple[str, ...]:
    """Every string `tokenizer` reads as a special token: its BOS/EOS/PAD/... and its added tokens
    flagged special. Added tokens that are not special (some vocabularies add runs of spaces) are
    ordinary text and stay allowed."""
    found = [str(t) for t in getattr(tokenizer, "all_special_tokens", None) or ()]
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    found += [str(t) for t in added.values() if getattr(t, "special", False)]
    return tuple(dict.fromkeys(t for t in found if t))


#: `_special_tokens` per tokenizer object, with the vocabulary size it was read at (adding a token
#: changes it). Weak: a cache must not keep a tokenizer alive.
_SPECIALS: weakref.WeakKeyDictionary[Any, tuple[int, tuple[str, ...]]] = weakref.WeakKeyDictionary()


def control_tokens(tokenizer: Any = None, separator: str | None = STEP_SEPARATOR) -> tuple[str, ...]:
    """The strings `text_problem` refuses: `separator` first (None: text that is never split into
    steps, such as SFT's), Qwen2.5's chat control tokens, and with a tokenizer every special token
    it has (a Llama policy's `<|eot_id|>` too)."""
    tokens = (*((separator,) if separator else ()), *CHAT_CONTROL_TOKENS)
    if tokenizer is not None:
        size = len(tokenizer) if hasattr(tokenizer, "__len__") else -1
        try:
            cached = _SPECIALS.get(tokenizer)
        except TypeError:  # neither hashable nor weakly referable (a test double)
            cached = None
        if cached is None or cached[0] != size:
            cached = (size, _special_tokens(tokenizer))
            try:
                _SPECIALS[tokenizer] = cached
            except TypeError:
                pass
        tokens += cached[1]
    return tuple(dict.fromkeys(tokens))


@functools.lru_cache(maxsize=64)
def _matcher(tokens: tuple[str, ...]) -> re.Pattern[str]:
    # One scan of the text for all tokens (hundreds for some vocabularies), longest first so a
    # token that contains another is the one reported.
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def text_problem(text: str, tokens: Sequence[str] = CONTROL_TOKENS, *, separator: str = STEP_SEPARATOR) -> str | None:
    """Why `text` may not go into a prompt or a PRM input, or None: the one text-validity rule.

    `text` must not hold any of `tokens` (`CONTROL_TOKENS` where no tokenizer is at hand,
    `control_tokens(tokenizer)` where one is). The message completes "the problem ..." or
    "step 2 ...".
    """
    if not tokens:
        return None
    found = _matcher(tuple(tokens)).search(text)
    if found is None:
        return None
    token = found.group()
    if token == separator:
        return (
            f"contains the step separator {token!r} (at character {found.start() + 1}), which marks where each "
            "step ends; remove it from the text"
        )
    return (
        f"contains {token!r} (at character {found.start() + 1}), a control token of the chat format that the "
        "tokenizer reads as a turn boundary or special token, not as text; remove it from the text"
    )


def _pieces(tokenizer: PreTrainedTokenizerBase, text: str) -> list[str]:
    """The text of each token `text` encodes to, for error messages a human can act on."""
    return [tokenizer.decode([i]) for i in _encode_plain(tokenizer, text)]


def ensure_step_separator(
    tokenizer: PreTrainedTokenizerBase, separator: str = STEP_SEPARATOR, *, add_if_missing: bool = True
) -> tuple[int, bool]:
    """Make sure `separator` is one token; return `(token_id, added)`.

    The released Qwen2.5-Math-PRM tokenizer carries `<extra_0>` as a single special token; the
    Qwen2.5 base/Instruct tokenizers and other families split it. With `add_if_missing` the
    separator is registered as an additional special token (existing additional special tokens
    are kept), which gives it a fresh id at the end of the vocabulary and guarantees it is never
    split or merged with neighbouring text. (For a Qwen2.5 vocabulary use
    `prepare_step_separator`, which gives it id 151651 instead, as the released PRM does.)
    `added` is `True` in that case and the caller **must** then give the model an embedding row for the new id (resize the vocabulary) before
    training or inference, and save the modified tokenizer next to the model.

    Raises:
        ValueError: The separator splits and `add_if_missing` is `False`.
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


def is_qwen2_5_vocabulary(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether `tokenizer` has the Qwen2/2.5 vocabulary layout with id 151651 still `<|quad_end|>`.

    Checked on ids, not names: the 22 added tokens sit at 151643-151664 in Qwen's order, nothing
    else was added after them, and the BPE ranks are Qwen's (a known encoding). Only then is
    replacing 151651's string the released PRM's convention rather than an arbitrary edit.
    """
    first, count = QWEN2_5_FIRST_ADDED_ID, len(QWEN2_5_ADDED_TOKENS)
    if len(tokenizer) != first + count:
        return False
    found = tokenizer.convert_ids_to_tokens(list(range(first, first + count)))
    if [str(t) for t in found] != list(QWEN2_5_ADDED_TOKENS):
        return False
    text, ids = _QWEN_BPE_PROBE
    return _encode_plain(tokenizer, text) == ids


def vocabulary_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of the token -> id mapping (added tokens included), to tell vocabularies apart.

    Chat templates and other settings are left out on purpose: a base and an Instruct tokenizer
    with the same vocabulary are interchangeable for scoring.
    """
    vocab = sorted((str(token), int(i)) for token, i in tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class StepSeparator:
    """The step separator as a model is trained and exported with it.

    Attributes:
        token: The separator string (`<extra_0>`).
        token_id: Its single token id.
        origin: `"existing"` (already one token, e.g. the released PRM's tokenizer),
            `"qwen2_5_slot"` (took id 151651 of a Qwen2.5 vocabulary, replacing `<|quad_end|>`)
            or `"added"` (a new special token at the end of another vocabulary).
        vocabulary: `vocabulary_fingerprint` of the separator-bearing tokenizer.
    """

    token: str
    token_id: int
    origin: Literal["existing", "qwen2_5_slot", "added"]
    vocabulary: str

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "separator": self.token,
            "separator_id": self.token_id,
            "origin": self.origin,
            "vocabulary": self.vocabulary,
        }


def _replace_token_string(value: Any, old: str, new: str) -> Any:
    """`value` (parsed JSON) with every string equal to `old` replaced by `new`."""
    if isinstance(value, str):
        return new if value == old else value
    if isinstance(value, list):
        return [_replace_token_string(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: _replace_token_string(v, old, new) for k, v in value.items()}
    return value


def _take_qwen_separator_slot(tokenizer: PreTrainedTokenizerBase, separator: str) -> PreTrainedTokenizerBase:
    """A copy of a Qwen2.5 tokenizer whose id 151651 is `separator` instead of `<|quad_end|>`.

    A tokenizer cannot rename an added token in place, so the tokenizer is saved, the token's
    string is replaced in the saved JSON files (`tokenizer.json`'s added tokens, and the
    `added_tokens_decoder` / special-token lists transformers 4.x also writes) and reloaded.
    """
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="prm-jax-tokenizer-") as scratch:
        tokenizer.save_pretrained(scratch)
        for path in Path(scratch).glob("*.json"):
            data = json.loads(path.read_text(encoding="utf-8"))
            path.write_text(
                json.dumps(_replace_token_string(data, _QWEN_SEPARATOR_SLOT, separator), ensure_ascii=False, indent=2),
                encoding="utf-8",
            )
        renamed = AutoTokenizer.from_pretrained(scratch)
    token_id = separator_token_id(renamed, separator)
    if token_id != VLLM_DEFAULT_STEP_TAG_ID or len(renamed) != len(tokenizer):
        raise ValueError(
            f"giving {separator!r} the Qwen2.5 slot {VLLM_DEFAULT_STEP_TAG_ID} failed: it encodes to "
            f"{_encode_plain(renamed, separator)} and the vocabulary has {len(renamed)} tokens "
            f"(was {len(tokenizer)})"
        )
    return renamed


def prepare_step_separator(
    tokenizer: PreTrainedTokenizerBase, separator: str = STEP_SEPARATOR, *, add_if_missing: bool = True
) -> tuple[PreTrainedTokenizerBase, StepSeparator]:
    """The separator-bearing tokenizer a PRM is trained and exported with, and its separator.

    One convention for training and export: a tokenizer where `separator` is already one token
    is used as is; a Qwen2.5 vocabulary (`is_qwen2_5_vocabulary`) gets it at id 151651 like
    the released Qwen2.5-Math-PRM (so vLLM, sglang and the model card's code work with their
    defaults); any other vocabulary gets it as a new special token (`ensure_step_separator`),
    whose id may need an embedding row the model does not have yet: callers compare it with the
    model's `vocab_size`. The returned tokenizer may be a new object; the one passed in is
    modified only in the `"added"` case.

    Raises:
        ValueError: The separator splits and `add_if_missing` is `False`.
    """
    token_id = separator_token_id(tokenizer, separator)
    origin: Literal["existing", "qwen2_5_slot", "added"] = "existing"
    if token_id is None and add_if_missing and is_qwen2_5_vocabulary(tokenizer):
        tokenizer, token_id, origin = (
            _take_qwen_separator_slot(tokenizer, separator),
            VLLM_DEFAULT_STEP_TAG_ID,
            "qwen2_5_slot",
        )
    elif token_id is None:
        token_id, _ = ensure_step_separator(tokenizer, separator, add_if_missing=add_if_missing)
        origin = "added"
    return tokenizer, StepSeparator(separator, token_id, origin, vocabulary_fingerprint(tokenizer))


def vllm_pooler_setting(separator_id: int) -> dict[str, Any]:
    """The pooler settings vLLM's native PRM needs to read steps at `separator_id`.

    Python: `LLM(model, runner="pooling", pooler_config=PoolerConfig(**setting))`;
    command line: `vllm serve MODEL --runner pooling --pooler-config '<setting as JSON>'`.
    """
    return {"pooling_type": "STEP", "step_tag_id": int(separator_id)}


@dataclass(frozen=True)
class PRMInput:
    """One tokenized PRM example.

    Attributes:
        input_ids: Token ids of the whole rendered conversation (system, user, assistant turns).
        separator_positions: Index into `input_ids` of the separator that ends each step, one per
            step, in step order. The PRM's step reward for step `i` is read at
            `separator_positions[i]`; training labels go there too.
    """

    input_ids: list[int]
    separator_positions: list[int]

    def __post_init__(self) -> None:
        """Reject positions that cannot index `input_ids` in step order (a corrupted example)."""
        n = len(self.input_ids)
        previous = -1
        for pos in self.separator_positions:
            if not previous < pos < n:
                raise ValueError(
                    f"separator_positions must be strictly increasing indices into input_ids "
                    f"(length {n}); got {self.separator_positions!r}"
                )
            previous = pos


def render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]], *, system_prompt: str | None = None
) -> str:
    """The text of a chat: the one renderer of every prompt here (policy prompts in synthesis,
    policy SFT, judge and critic prompts, the PRM layout), so they cannot drift apart.

    System prompt: a non-empty `system_prompt` becomes the first turn. `None` and `""` add no
    system turn, so the template's own default applies (Qwen2.5-Math-Instruct's supplies the math
    prompt, Qwen2.5-Instruct's "You are Qwen ..."); an empty system turn is never rendered, since
    `""` is how a config string says "no system prompt". Messages that open with their own system
    turn take no `system_prompt`: two system prompts are an error, not a silent choice.

    The assistant turn is left open (the generation prompt) unless the last message is the
    assistant's, as in the PRM layout. Without a chat template (a base model's tokenizer) the text
    is the message contents joined by blank lines, plus a blank line where an open answer starts;
    a model must be trained and queried with the same layout.

    Args:
        tokenizer: A Hugging Face tokenizer, or any object without a `chat_template` (plain layout).
        messages: `{"role", "content"}` mappings, in order.
        system_prompt: The system turn to put first, by the rule above.

    Returns:
        The text, to encode with `add_special_tokens=False`: it holds the template's special
        tokens already, and a tokenizer with a BOS would add a second one.

    Raises:
        ValueError: `messages` is empty, or opens with a system turn while `system_prompt` is set.
    """
    messages = [dict(m) for m in messages]
    if not messages:
        raise ValueError("a chat needs at least one message")
    if system_prompt:
        if messages[0]["role"] == "system":
            raise ValueError("the messages already open with a system turn; pass system_prompt=None")
        messages.insert(0, {"role": "system", "content": system_prompt})
    open_turn = messages[-1]["role"] != "assistant"
    if not getattr(tokenizer, "chat_template", None):
        return "\n\n".join(m["content"] for m in messages) + ("\n\n" if open_turn else "")
    # tokenize=False returns the rendered string in both transformers 4.x and 5.x (5.x returns a
    # BatchEncoding when tokenize=True, 4.x a list of ids); the string path is uniform.
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=open_turn)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def build_prm_input(
    tokenizer: PreTrainedTokenizerBase,
    problem: str,
    steps: Sequence[str],
    *,
    separator: str = STEP_SEPARATOR,
    system_prompt: str | None = SYSTEM_PROMPT,
) -> PRMInput:
    """Tokenize `(problem, steps)` in the Qwen2.5-Math-PRM layout.

    The conversation is `system = system_prompt`, `user = problem`,
    `assistant = separator.join(steps) + separator`, rendered by `render_chat` (closed assistant
    turn; its rule for an empty or `None` system prompt and for tokenizers without a chat template)
    and encoded with `add_special_tokens=False`. For Qwen tokenizers (no BOS) the ids equal the
    model card's reference `tokenizer.encode(conversation_str)`. Without a chat template the text is
    the turns joined by blank lines (`f"{system_prompt}\\n\\n{problem}\\n\\n" + assistant`, the
    system turn left out when the prompt is empty or `None`), so the separator positions mean the
    same thing.

    Steps are used exactly as given (no stripping or normalisation), so the text between two
    separators is the step verbatim; split and clean steps before calling this. Empty steps are
    allowed (they yield adjacent separators).

    Raises:
        TypeError: `problem` is not a string, `steps` is a bare string, or a step is not a
            string.
        ValueError: `steps` is empty; a step, the problem or the system prompt fails
            `text_problem` (holds the separator or a control token of this tokenizer); or the
            encoded text does not hold exactly one separator token per step
            (typically because the separator is not a single token — call
            `ensure_step_separator` first).
    """
    if not isinstance(problem, str):
        raise TypeError(f"problem must be a str, got {type(problem).__name__}")
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence):
        raise TypeError(f"steps must be a sequence of step strings (e.g. a list), got {type(steps).__name__}")
    if len(steps) == 0:
        raise ValueError("steps must be a non-empty sequence of step strings")
    for i, step in enumerate(steps):
        if not isinstance(step, str):
            raise TypeError(f"step {i} must be a str, got {type(step).__name__}")
    forbidden = control_tokens(tokenizer, separator)
    texts = [("problem", problem), *((f"step {i}", step) for i, step in enumerate(steps))]
    for name, text in [*texts, ("system_prompt", system_prompt or "")]:
        why = text_problem(text, forbidden, separator=separator)
        if why is not None:
            raise ValueError(f"{name} {why}")

    messages = [
        {"role": "user", "content": problem},
        {"role": "assistant", "content": separator.join(steps) + separator},
    ]
    text = render_chat(tokenizer, messages, system_prompt=system_prompt)
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
        raise ValueError(f"expected one separator token per step ({len(steps)} steps), but {reason}")
    return PRMInput(input_ids=input_ids, separator_positions=positions)
