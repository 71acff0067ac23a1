"""Records -> fixed-field token examples for PRM and causal-LM (SFT) training.

Every example, whatever its task, carries the same per-token arrays so that one packing and
batching pipeline and one batch layout serve both trainers:

* `loss_mask` marks the supervised positions;
* `labels` is the PRM target there (probability that the step is correct);
* `targets` is the causal-LM target there (the next token id);
* `step_index` says which step a PRM separator position closes (for per-step metrics).

PRM examples follow Qwen2.5-Math-PRM exactly (`prm_jax.tokenization.build_prm_input`): the
chat layout with the separator after each step, supervision at exactly the separator positions,
and, by default, no steps after the first erroneous one (the paper discards them: once a step is
wrong, whether later steps are "correct" is ill-defined, and keeping them teaches the model to
score outcomes instead of process).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Literal

import numpy as np

from prm_jax.data.records import DataError, PRMRecord, SFTRecord
from prm_jax.tokenization import (
    STEP_SEPARATOR,
    SYSTEM_PROMPT,
    build_prm_input,
    control_tokens,
    render_chat,
    separator_token_id,
    text_problem,
)

if TYPE_CHECKING:  # transformers is heavy to import; only type checkers need it here.
    from transformers import PreTrainedTokenizerBase

__all__ = ["TokenizeConfig", "TokenizeStats", "Example", "tokenize_prm", "tokenize_sft", "check_separator", "char_cap"]


@dataclass(frozen=True)
class TokenizeConfig:
    """How records become token examples.

    Attributes:
        max_length: Longest example in tokens; it must not exceed the training `seq_len` (an
            example is never split across packed rows).
        soft_labels: Train PRMs on the records' soft labels (the target is a probability; the
            loss is the training config's `train.loss`, MSE in the paper). When `False` the labels must already be hard 0/1; a soft value is an
            error rather than silently binarised, because the right binarisation depends on how
            the labels were made (the paper's Monte Carlo rule is "at least one correct
            completion", i.e. `> 0`, not `>= 0.5`) and only the producer knows that.
        drop_after_first_error: Remove every step after the first negative one from the input
            (the paper's recipe), so the model never sees or scores them.
        negative_threshold: A step is negative when its label is `<= negative_threshold`. The
            default 0.0 is the paper's rule for hard and soft labels alike: the first error is the
            first step labelled 0 (no correct completion), so the soft `[1, 0.25, 0.5, 0]` keeps
            all four steps. Raise it (below 1) only to binarise soft labels differently.
        overlong: What to do with an example longer than `max_length`: `"truncate"` keeps
            the longest prefix of complete steps (PRM) or of the completion (SFT);
            `"drop"` skips the example.
        separator: The step separator; must be a single token of the tokenizer.
        max_chars: Text longer than this many characters cannot fit `max_length` tokens (see
            `char_cap`); such text is cut (steps, completion) or dropped *before* it is
            tokenized, so refusing a huge record costs no more than a normal one. `None`: no
            pre-check (the file loaders fill it in from the tokenizer).
    """

    max_length: int
    soft_labels: bool = False
    drop_after_first_error: bool = True
    negative_threshold: float = 0.0
    overlong: Literal["truncate", "drop"] = "truncate"
    separator: str = STEP_SEPARATOR
    max_chars: int | None = None

    def __post_init__(self) -> None:
        """Reject settings that would silently produce no or wrong supervision."""
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, got {self.max_length!r}")
        if not 0.0 <= self.negative_threshold < 1.0:
            raise ValueError(
                f"negative_threshold must be in [0, 1) (a step is negative when its label is <= it), "
                f"got {self.negative_threshold!r}"
            )
        if self.overlong not in ("truncate", "drop"):
            raise ValueError(f"overlong must be 'truncate' or 'drop', got {self.overlong!r}")
        if not self.separator:
            raise ValueError("separator must be a non-empty string")


@dataclass
class TokenizeStats:
    """Counts of what tokenization kept and removed, for the trainer to log.

    Silent data loss (overlong examples dropped, steps removed) changes what a run trains on, so
    every removal is counted. Pass one instance to many `tokenize_*` calls; `merge` combines
    the stats of several files or processes.

    Attributes:
        seen: Records offered to a `tokenize_*` function.
        kept: Examples returned (not `None`).
        truncated: Kept examples that lost steps (PRM) or completion tokens (SFT) to
            `max_length`.
        dropped_overlong: Records returned as `None` because they did not fit `max_length`
            (`overlong="drop"`, or not even one step / one completion token fits).
        steps_dropped_after_error: PRM steps removed because they follow the first negative step.
        steps_dropped_overlong: PRM steps removed by truncation (including those of dropped
            records).
        supervised_positions: Total positions with `loss_mask == 1` in the kept examples.
        tokens: Total tokens in the kept examples (for padding/packing efficiency).
    """

    seen: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    steps_dropped_after_error: int = 0
    steps_dropped_overlong: int = 0
    supervised_positions: int = 0
    tokens: int = 0

    def merge(self, other: TokenizeStats) -> TokenizeStats:
        """Add `other`'s counts into this one (in place) and return `self`."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def as_dict(self) -> dict[str, int]:
        """Plain dict for logging."""
        return asdict(self)


@dataclass
class Example:
    """One tokenized example: equal-length 1-D arrays (length `L <= max_length`).

    Attributes:
        input_ids: int32 token ids.
        loss_mask: float32, 1.0 at supervised positions, 0.0 elsewhere.
        labels: float32 PRM target at supervised positions: the probability that the step is
            correct (0/1 for hard labels); 0.0 elsewhere and for SFT.
        targets: int32 causal-LM target at supervised positions: the next token id; 0 elsewhere
            and for PRM.
        step_index: int32 index of the step whose separator is at that position; -1 elsewhere
            and for SFT.
        example_index: Which example this is (the loaders use its index in their returned list),
            carried into batches so outputs can be traced back to records.
        record_id: The source record's `id`, when known.
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    labels: np.ndarray
    targets: np.ndarray
    step_index: np.ndarray
    example_index: int
    record_id: str | None = None

    def __post_init__(self) -> None:
        """Enforce dtypes and equal lengths: packing copies these arrays into shared rows."""
        spec = {
            "input_ids": np.int32,
            "loss_mask": np.float32,
            "labels": np.float32,
            "targets": np.int32,
            "step_index": np.int32,
        }
        length = None
        for name, dtype in spec.items():
            value = np.asarray(getattr(self, name))
            if value.ndim != 1:
                raise ValueError(f"Example.{name} must be 1-D, got shape {value.shape}")
            if value.dtype != dtype:
                raise ValueError(f"Example.{name} must be {np.dtype(dtype)}, got {value.dtype}")
            if length is None:
                length = value.shape[0]
            elif value.shape[0] != length:
                raise ValueError(f"Example.{name} has length {value.shape[0]}, input_ids has {length}")
            setattr(self, name, value)
        if length == 0:
            raise ValueError("Example must hold at least one token")
        if not 0 <= int(self.example_index) < 2**31:
            raise ValueError(f"example_index must fit int32 and be >= 0, got {self.example_index}")

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_supervised(self) -> int:
        """Number of positions that carry a loss."""
        return int(np.count_nonzero(self.loss_mask))


def check_separator(tokenizer: PreTrainedTokenizerBase, separator: str = STEP_SEPARATOR) -> int:
    """Return the separator's id; raise if it is not one token (no position to supervise)."""
    sep_id = separator_token_id(tokenizer, separator)
    if sep_id is None:
        raise ValueError(
            f"The step separator {separator!r} is not a single token for this tokenizer (true of "
            "the Qwen2.5 base/Instruct tokenizers); call "
            "prm_jax.tokenization.prepare_step_separator(tokenizer) before tokenizing PRM data "
            "(training does): it gives a Qwen2.5 vocabulary the separator at id 151651 and adds it "
            "as a special token to any other."
        )
    return sep_id


#: Safety factor on the longest-token bound: normalizers (NFKC, lower-casing) may shorten text.
_CHAR_CAP_SAFETY = 2


def char_cap(tokenizer: PreTrainedTokenizerBase, max_length: int) -> int:
    """Characters beyond which a text is certainly longer than `max_length` tokens.

    No token of the vocabulary (added tokens included) spells more than `L` characters, so a
    text of `n` characters needs at least `n / L` tokens; with a safety factor for
    normalizers the cap is `max_length * L * 2`: generous, and still microseconds to apply.
    """
    longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
    return max_length * max(longest, 1) * _CHAR_CAP_SAFETY


def _steps_within_chars(problem: str, steps: tuple[str, ...], cap: int) -> int:
    """How many leading steps fit `cap` characters together with the problem."""
    used = len(problem)
    for i, step in enumerate(steps):
        used += len(step) + 1  # the separator counts at least one character
        if used > cap:
            return i
    return len(steps)


def _prm_arrays(
    input_ids: list[int], positions: list[int], labels: tuple[float, ...], example_index: int, record_id: str
) -> Example:
    length = len(input_ids)
    loss_mask = np.zeros(length, np.float32)
    label_arr = np.zeros(length, np.float32)
    step_index = np.full(length, -1, np.int32)
    pos = np.asarray(positions, dtype=np.int64)
    loss_mask[pos] = 1.0
    # Hard labels were checked to be exactly 0/1 by the caller, so both cases copy the value.
    label_arr[pos] = np.asarray(labels[: len(positions)], dtype=np.float32)
    step_index[pos] = np.arange(len(positions), dtype=np.int32)
    return Example(
        input_ids=np.asarray(input_ids, dtype=np.int32),
        loss_mask=loss_mask,
        labels=label_arr,
        targets=np.zeros(length, np.int32),
        step_index=step_index,
        example_index=example_index,
        record_id=record_id,
    )


def tokenize_prm(
    record: PRMRecord,
    tokenizer: PreTrainedTokenizerBase,
    cfg: TokenizeConfig,
    example_index: int,
    stats: TokenizeStats | None = None,
) -> Example | None:
    """Tokenize a PRM record in the Qwen2.5-Math-PRM layout; supervise the separator positions.

    Steps after the first negative one are removed first (`cfg.drop_after_first_error`). Then,
    if the last kept separator lies beyond `max_length`: `"truncate"` rebuilds the input with
    the longest prefix of complete steps whose separators fit (each kept step keeps its label;
    a step cut in the middle would have no separator and no label), `"drop"` returns `None`.
    Tokens *after* the last separator (the template's end-of-turn) carry no supervision and,
    under causal attention, cannot change the separators' outputs; they are clipped to
    `max_length` in both modes without counting as truncation.

    Args:
        record: The record.
        tokenizer: A tokenizer in which `cfg.separator` is a single token.
        cfg: Tokenization settings.
        example_index: Stored in the example (see `Example`).
        stats: Updated in place when given.

    Returns:
        The example, or `None` when it does not fit (counted in `stats`).

    Raises:
        DataError: Soft labels with `cfg.soft_labels=False`; the separator occurs inside the
            problem or a step; the tokenizer/template does not yield one separator per step.
    """
    stats = stats if stats is not None else TokenizeStats()
    stats.seen += 1
    labels = record.labels
    if not cfg.soft_labels and any(v not in (0.0, 1.0) for v in labels):
        bad = next(v for v in labels if v not in (0.0, 1.0))
        raise DataError(
            f"record {record.id!r} has soft label {bad!r} but TokenizeConfig.soft_labels is "
            "False; set soft_labels=True to train on soft labels, or binarise the labels "
            "upstream (the right rule depends on how they were produced)",
            field="labels",
        )
    steps = record.steps
    if cfg.drop_after_first_error:
        first_bad = next((i for i, v in enumerate(labels) if v <= cfg.negative_threshold), None)
        if first_bad is not None and first_bad + 1 < len(steps):
            stats.steps_dropped_after_error += len(steps) - (first_bad + 1)
            steps = steps[: first_bad + 1]
    original_steps = len(steps)
    if cfg.max_chars is not None:
        fitting_chars = _steps_within_chars(record.problem, steps, cfg.max_chars)
        if fitting_chars < len(steps):
            # Steps past the cap cannot fit: cut or drop before tokenizing the whole record.
            if cfg.overlong == "drop" or fitting_chars == 0:
                stats.dropped_overlong += 1
                stats.steps_dropped_overlong += len(steps)
                return None
            steps = steps[:fitting_chars]
    try:
        built = build_prm_input(tokenizer, record.problem, steps, separator=cfg.separator)
    except (TypeError, ValueError) as e:
        raise DataError(f"record {record.id!r}: {e}") from e
    input_ids, positions = built.input_ids, built.separator_positions

    fitting = sum(1 for p in positions if p < cfg.max_length)
    if fitting == len(positions) and len(steps) < original_steps:
        stats.truncated += 1
        stats.steps_dropped_overlong += original_steps - len(steps)
    if fitting < len(positions):
        if cfg.overlong == "drop" or fitting == 0:
            stats.dropped_overlong += 1
            stats.steps_dropped_overlong += original_steps
            return None
        stats.truncated += 1
        stats.steps_dropped_overlong += original_steps - fitting
        steps = steps[:fitting]
        rebuilt = build_prm_input(tokenizer, record.problem, steps, separator=cfg.separator)
        # The prefix up to the last kept separator is the same text, and the separator is a
        # special token that BPE never merges across, so the ids there must be identical.
        if rebuilt.separator_positions != positions[:fitting]:
            raise DataError(
                f"record {record.id!r}: rebuilding with {fitting} steps moved the separators "
                f"({rebuilt.separator_positions} vs {positions[:fitting]}); the tokenizer merges "
                "tokens across the separator, which it must not"
            )
        input_ids, positions = rebuilt.input_ids, rebuilt.separator_positions
    input_ids = input_ids[: cfg.max_length]

    example = _prm_arrays(input_ids, positions, labels, example_index, record.id)
    stats.kept += 1
    stats.supervised_positions += len(positions)
    stats.tokens += len(input_ids)
    return example


def tokenize_sft(
    record: SFTRecord,
    tokenizer: PreTrainedTokenizerBase,
    cfg: TokenizeConfig,
    example_index: int,
    stats: TokenizeStats | None = None,
) -> Example | None:
    """Tokenize a prompt/completion pair for next-token training on the completion only.

    `input_ids = prompt_ids + completion_ids + [eos]`, prompt and completion encoded
    separately (`add_special_tokens=False`) exactly as generation sees them: the model is fed
    the rendered prompt (`render_chat` of system `SYSTEM_PROMPT` and user `prompt`, the
    assistant turn open; synthesis's default policy prompt) and produces completion tokens after it. Position `t` is supervised
    when `input_ids[t + 1]` is a completion token or the EOS, with `targets[t] =
    input_ids[t + 1]`: so the last prompt token predicts the first completion token and the EOS
    is learnt as the end.

    Over-long pairs: `"truncate"` keeps the prompt and cuts the completion (the EOS goes
    first); `"drop"` returns `None`. A prompt leaving no room for one completion token
    returns `None` in both modes.

    Raises:
        DataError: The tokenizer has no EOS token (the model could never learn to stop); the
            prompt or completion holds one of the tokenizer's control tokens (`text_problem`).
    """
    stats = stats if stats is not None else TokenizeStats()
    stats.seen += 1
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError("the tokenizer has no eos_token; SFT needs one to teach the model to stop")
    forbidden = control_tokens(tokenizer, separator=None)  # this tokenizer's own special tokens too
    for name in ("prompt", "completion"):
        why = text_problem(getattr(record, name), forbidden)
        if why is not None:
            raise DataError(f"record {record.id!r}: {why}", field=name)
    completion = record.completion
    if cfg.max_chars is not None:
        # Text past the cap cannot fit: drop or cut it before tokenizing it all.
        too_long = len(record.prompt) + len(completion) > cfg.max_chars
        if len(record.prompt) >= cfg.max_chars or (too_long and cfg.overlong == "drop"):
            stats.dropped_overlong += 1
            return None
        completion = completion[: cfg.max_chars - len(record.prompt)]
    prompt_text = render_chat(tokenizer, [{"role": "user", "content": record.prompt}], system_prompt=SYSTEM_PROMPT)
    prompt_ids = list(tokenizer.encode(prompt_text, add_special_tokens=False))
    completion_ids = list(tokenizer.encode(completion, add_special_tokens=False))
    completion_ids.append(int(eos_id))
    input_ids = prompt_ids + completion_ids
    if len(input_ids) > cfg.max_length:
        if cfg.overlong == "drop" or len(prompt_ids) + 1 > cfg.max_length:
            stats.dropped_overlong += 1
            return None
        stats.truncated += 1
        input_ids = input_ids[: cfg.max_length]
    # The last prompt token predicts the first completion token. (With an empty prompt nothing
    # precedes the first completion token, so supervision starts at the second.)
    first = max(len(prompt_ids) - 1, 0)
    length = len(input_ids)
    ids = np.asarray(input_ids, dtype=np.int32)
    loss_mask = np.zeros(length, np.float32)
    targets = np.zeros(length, np.int32)
    loss_mask[first : length - 1] = 1.0
    targets[first : length - 1] = ids[first + 1 :]
    example = Example(
        input_ids=ids,
        loss_mask=loss_mask,
        labels=np.zeros(length, np.float32),
        targets=targets,
        step_index=np.full(length, -1, np.int32),
        example_index=example_index,
        record_id=record.id,
    )
    if example.num_supervised == 0:
        stats.dropped_overlong += 1
        return None
    stats.kept += 1
    stats.supervised_positions += example.num_supervised
    stats.tokens += length
    return example
