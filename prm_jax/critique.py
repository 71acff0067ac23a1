"""The ProcessBench-style critique prompt and its verdict parser (LLM judge and LLM critic).

The critic reads a problem and the numbered steps, wrapped as `<paragraph_i>...</paragraph_i>` and
indexed from 0, and answers with the index of the earliest wrong step, or -1, in `\\boxed{}`. The
wording follows ProcessBench so that judge and critic figures are comparable with published ones.
"""

from __future__ import annotations

from typing import Sequence

CRITIQUE_TEMPLATE = (
    "The following is a math problem and a solution (split into paragraphs, enclosed with tags and "
    "indexed from 0):\n\n"
    "[Math Problem]\n\n{problem}\n\n"
    "[Solution]\n\n{tagged_steps}\n\n"
    "Your task is to review and critique the solution paragraph by paragraph. Once you identify an "
    "error in a paragraph, return the index of the paragraph where the earliest error occurs. "
    "Otherwise, return the index of -1 (which typically denotes \"not found\").\n\n"
    "Please put your final answer (i.e., the index) in \\boxed{{}}."
)


def critique_prompt(problem: str, steps: Sequence[str]) -> str:
    """The user message asking a critic for the earliest erroneous step."""
    tagged = "\n\n".join(f"<paragraph_{i}>\n{step}\n</paragraph_{i}>" for i, step in enumerate(steps))
    return CRITIQUE_TEMPLATE.format(problem=problem, tagged_steps=tagged)


def critique_messages(problem: str, steps: Sequence[str]) -> list[dict[str, str]]:
    return [{"role": "user", "content": critique_prompt(problem, steps)}]


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), with nested braces; None if absent."""
    best = None
    for marker in ("\\boxed", "\\fbox"):
        start = text.rfind(marker)
        if start != -1 and (best is None or start > best[0]):
            best = (start, marker)
    if best is None:
        return None
    index = best[0] + len(best[1])
    while index < len(text) and text[index] == " ":
        index += 1
    if index >= len(text) or text[index] != "{":
        return None
    depth, begin = 0, index
    for position in range(index, len(text)):
        if text[position] == "{":
            depth += 1
        elif text[position] == "}":
            depth -= 1
            if depth == 0:
                return text[begin + 1 : position]
    return None  # unbalanced


def parse_first_error(text: str, num_steps: int) -> int | None:
    """The critic's verdict: an index in [-1, num_steps), or None (no verdict).

    None when there is no box, its content is not an integer (after stripping `$`, spaces and a
    `\\text{}` wrapper), or the index is out of range.
    """
    content = last_boxed(text)
    if content is None:
        return None
    content = content.strip().strip("$").strip()
    if content.startswith("\\text{") and content.endswith("}"):
        content = content[len("\\text{") : -1].strip()
    try:
        index = int(content)
    except ValueError:
        return None
    return index if -1 <= index < num_steps else None
