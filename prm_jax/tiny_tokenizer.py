"""A tiny Qwen-style tokenizer built offline: the embedded default's tokenizer and the tests'.

Nothing may be downloaded at run time, yet the tiny configs, the demo and the tests should go
through exactly the loading code real checkpoints use (`AutoTokenizer.from_pretrained(dir)`).
This module therefore *trains* a miniature Qwen-style byte-level BPE tokenizer with the
`tokenizers` library on a small built-in corpus and saves it as an ordinary Hugging Face
tokenizer directory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

__all__ = [
    "TINY_BPE_SIZE",
    "TINY_CHAT_TEMPLATE",
    "TINY_VOCAB_SIZE",
    "ENDOFTEXT",
    "IM_START",
    "IM_END",
    "build_tiny_tokenizer",
]

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

#: Target size of the trained BPE vocabulary (256 byte symbols + merges), before special tokens.
#: Small enough to keep tiny models tiny, large enough that words merge into multi-byte tokens.
TINY_BPE_SIZE = 400

#: The tiny tokenizer's length with its four added tokens (pad, im_start, im_end, the separator):
#: the embedding rows of every tiny model (configs, the demo's policy, tests).
TINY_VOCAB_SIZE = TINY_BPE_SIZE + 4

#: Qwen2's pre-tokenizer split pattern: digits are isolated one per token, letters grouped with an
#: optional leading non-letter, punctuation runs grouped with trailing newlines. Using the same
#: pattern makes the tiny tokenizer split text (e.g. an un-added `<extra_0>`) the way Qwen does.
_QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: The Qwen2.5 chat layout without the tool-calling branches: every message is rendered as
#: `<|im_start|>{role}\n{content}<|im_end|>\n`; `add_generation_prompt` opens an assistant turn.
#: (Unlike the real Qwen2.5 template it does not insert a default system message.)
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def _training_corpus() -> Iterator[str]:
    """Yield a fixed, math-flavoured corpus.

    The corpus is generated (not random) so training is deterministic; it covers digits, the
    operators `+ - * / =`, LaTeX-ish answer markup (`\\boxed{}`, `\\frac`), the words that PRM
    data is made of ("Step", "answer", ...) and blank-line step breaks, so common words become
    single tokens as they would with a real tokenizer.
    """
    words = (
        "step answer problem solution therefore so we have the is of and to a an in for each total "
        "number numbers first second third next then finally compute calculate find let be sum "
        "difference product quotient equals equal result value values final check correct wrong "
        "apples oranges books students dollars cents hours minutes days per more less than twice "
        "half third times divided multiplied added subtracted remaining left gives get need "
        "question reason please put your within boxed frac sqrt cdot pi x y z n"
    ).split()
    yield " ".join(words)
    yield " ".join(w.capitalize() for w in words)
    ops = ("+", "-", "*", "/")
    for i in range(1, 13):
        for j in range(1, 13):
            op = ops[(i + j) % 4]
            value = {"+": i + j, "-": i - j, "*": i * j, "/": i / j}[op]
            text = f"{value:g}" if op == "/" else str(value)
            yield (
                f"Step {i}: We compute {i} {op} {j} = {text}.\n\nStep {i + 1}: So the answer is $\\boxed{{{text}}}$.\n"
            )
    for k in range(1, 30):
        w = words[k % len(words)]
        yield (
            f"Let {w} be the number of {words[(3 * k) % len(words)]}. "
            f"Then {w} = {k} * 2 = {2 * k}.\n\n"
            f"Therefore the final answer is \\boxed{{\\frac{{{k}}}{{{k + 1}}}}}.\n\n"
            f"Please reason step by step, and put your final answer within \\boxed{{}}.\n"
        )


def build_tiny_tokenizer(
    out_dir: Path, *, chat_template: bool = True, separator_special: bool = True, separator: str = "<extra_0>"
) -> Path:
    """Train and save a tiny Qwen-style byte-level BPE tokenizer; return `out_dir`.

    Layout mirrors Qwen2.5: the trained vocabulary comes first, then the added special tokens
    `<|endoftext|>` (pad), `<|im_start|>`, `<|im_end|>` (eos), and, when
    `separator_special`, the step `separator` as one more special token, exactly as
    `<extra_0>` is a single added token in Qwen2.5-Math-PRM. With `separator_special=False`
    the separator is left out, so it splits into several ordinary tokens; that is the case
    `ensure_step_separator` must repair.
    There is no BOS token (as in Qwen), so `add_special_tokens=True` adds nothing.

    Args:
        out_dir: Directory to write (created if needed); loadable with
            `AutoTokenizer.from_pretrained(out_dir)`.
        chat_template: Whether to store the Qwen2.5-style chat template (`TINY_CHAT_TEMPLATE`);
            `False` exercises the no-template fallbacks.
        separator_special: Whether the separator is registered as an added special token.
        separator: The step separator string.

    Returns:
        `out_dir` as a `Path`.

    Output is deterministic for the same arguments (fixed corpus, deterministic BPE trainer).
    """
    from transformers import PreTrainedTokenizerFast  # heavy import; only when building

    out_dir = Path(out_dir)
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BPE_SIZE,
        min_frequency=1,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)

    specials = [ENDOFTEXT, IM_START, IM_END]
    if separator_special:
        specials.append(separator)
    # normalized=False / no stripping: the tokens must match verbatim and leave neighbouring
    # whitespace (e.g. the "\n" after <|im_start|>role) in the surrounding text, as Qwen's do.
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in specials]
    )

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=ENDOFTEXT,
        eos_token=IM_END,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=specials[1:],
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
        padding_side="right",
        chat_template=TINY_CHAT_TEMPLATE if chat_template else None,
    )
    return save_as_qwen2_tokenizer(hf_tok, out_dir)


def save_as_qwen2_tokenizer(hf_tok, out_dir: str | Path) -> Path:
    """Save a fast tokenizer built from Qwen-style BPE as a "Qwen2Tokenizer" directory.

    Released Qwen2.5 checkpoints name their class "Qwen2Tokenizer"; saying the same makes
    AutoTokenizer take the Qwen2 code path (transformers 5 rebuilds the pipeline from the vocab
    and merges with Qwen's own pre-tokenizer, which _QWEN2_SPLIT_PATTERN reproduces), so such a
    directory loads exactly as a real Qwen tokenizer does.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(str(out_dir))
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "Qwen2Tokenizer"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out_dir
