"""The real Qwen2.5 tokenizer, built offline from the BPE ranks the `dashscope` wheel ships.

Nothing can be downloaded from the Hugging Face hub in tests, yet the tests that stand for a real
Qwen checkpoint (conversion, training from a base, export, scoring) must see the real vocabulary:
where `<extra_0>` splits, which id 151651 holds, how digits and ChatML markers tokenize. The
`dashscope` package carries Qwen's 151,643 byte-level BPE ranks (`resources/qwen.tiktoken`,
the same ranks as Qwen2/2.5's `vocab.json`), so this module rebuilds the tokenizer from them:

* the byte-level BPE model, one merge per multi-byte token derived from the ranks (the pair that
  BPE restricted to lower ranks ends with, as tiktoken itself would split the token);
* Qwen2's NFC normaliser and pre-tokenizer pattern (digits one per token);
* the 22 added tokens at ids 151643-151664 in Qwen2.5's order;
* a ChatML chat template that, like Qwen2.5-Math-Instruct's, supplies the math system prompt when
  the conversation has none.

Two variants: the base/Instruct tokenizer (id 151651 is `<|quad_end|>`; `<extra_0>` splits into
five tokens) and the released Qwen2.5-Math-PRM's (id 151651 is `<extra_0>`).
"""

from __future__ import annotations

import base64
from pathlib import Path

from prm_jax.tiny_tokenizer import _QWEN2_SPLIT_PATTERN, save_as_qwen2_tokenizer

__all__ = [
    "QWEN2_5_SPECIAL_TOKENS",
    "QWEN2_5_MODEL_VOCAB_SIZE",
    "QWEN_CHAT_TEMPLATE",
    "qwen_ranks_path",
    "build_qwen2_5_tokenizer",
]

#: Qwen2.5's added tokens, ids 151643.. in order, with their `special` flag as released
#: (the tool-call and FIM markers are added but not special, so decode keeps them).
QWEN2_5_SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),  # 151643
    ("<|im_start|>", True),  # 151644
    ("<|im_end|>", True),  # 151645
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),  # 151651: <extra_0> in the released PRM's tokenizer
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),  # 151657
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),  # 151664
)
NUM_BPE_RANKS = 151_643
PRM_SEPARATOR_ID = 151_651
#: Embedding rows of every Qwen2.5 checkpoint up to 14B (the tokenizer has 151,665 entries).
QWEN2_5_MODEL_VOCAB_SIZE = 151_936

#: ChatML, with Qwen2.5-Math-Instruct's default system prompt when none is given (no tool calls).
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nPlease reason step by step, and put your final answer within "
    "\\\\boxed{}.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def qwen_ranks_path() -> Path:
    """`qwen.tiktoken` inside the installed `dashscope` package (ImportError without it)."""
    import dashscope

    path = Path(dashscope.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: this dashscope wheel does not ship Qwen's BPE ranks")
    return path


def _load_ranks(path: Path) -> dict[bytes, int]:
    """tiktoken's file format: one `base64(token) rank` pair per line."""
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != NUM_BPE_RANKS or sorted(ranks.values()) != list(range(NUM_BPE_RANKS)):
        raise ValueError(f"{path}: expected ranks 0..{NUM_BPE_RANKS - 1}, got {len(ranks)} entries")
    return ranks


def _merge_of(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair BPE merges last to build `token`: BPE over its bytes using only lower ranks."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_rank = -1, rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best < 0:
            raise ValueError(f"rank {rank} ({token!r}) is not reachable by merging lower ranks")
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts[0], parts[1]


def _vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_to_char = bytes_to_unicode()

    def as_text(b: bytes) -> str:
        return "".join(byte_to_char[x] for x in b)

    vocab = {as_text(token): rank for token, rank in ranks.items()}
    merges = [
        tuple(as_text(p) for p in _merge_of(token, rank, ranks))
        for token, rank in sorted(ranks.items(), key=lambda item: item[1])
        if len(token) > 1
    ]
    return vocab, merges  # type: ignore[return-value]


def build_qwen2_5_tokenizer(out_dir: Path, *, prm: bool = False) -> Path:
    """Write the Qwen2.5 tokenizer to `out_dir` (base/Instruct, or the released PRM's with
    `prm`); loadable with `AutoTokenizer.from_pretrained(out_dir)`. Takes a few seconds."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _vocab_and_merges(_load_ranks(qwen_ranks_path()))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    specials = [
        ("<extra_0>", True) if prm and NUM_BPE_RANKS + i == PRM_SEPARATOR_ID else entry
        for i, entry in enumerate(QWEN2_5_SPECIAL_TOKENS)
    ]
    # Added one by one so each takes the next id (151643, 151644, ...) in Qwen's order.
    for content, special in specials:
        tok.add_tokens([AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False)])
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        bos_token=None,
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    return save_as_qwen2_tokenizer(hf_tok, out_dir)
