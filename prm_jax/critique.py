"""Critique prompts for an LLM judge or critic, and their verdict parsers.

Two prompts, each with its own parser (`prompt="processbench" | "paper"`):

* `processbench`: ProcessBench's critique prompt. Steps are wrapped as
  `<paragraph_i>...</paragraph_i>` and indexed from 0; the answer is the index of the earliest
  wrong step, or -1, in `\\boxed{}`. The wording follows ProcessBench so that judge and critic
  figures are comparable with published ones. Two parsers: the default one reads the last box with
  nested braces and tolerates `$...$` and `\\text{...}` around the index; `official=True` is
  exactly ProcessBench's `extract_answer` (the last match of `\\boxed{([^}]*)}`, stripped,
  through `int()`), so figures can be reproduced to the record.
* `paper`: the judge prompt described in App. C of the Qwen PRM paper (arXiv 2501.07301).
  Paragraphs are numbered from 1 as `<paragraph_k>`; the judge writes an analysis of every
  paragraph (`<analysis_k>`) followed by a `Correct`/`Incorrect` conclusion for it
  (`<conclusion_k>`). The earliest Incorrect paragraph is the first error (returned 0-based,
  like every index in this project); every paragraph concluded Correct means -1.

Every parser returns `(index, "ok")` or `(None, reason)` (`classify_verdict`); no
verdict is never guessed: an unparseable answer is counted, not scored as a step. Several
sampled critiques of one solution are reduced to one verdict by `critic_vote`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Literal

PromptKind = Literal["processbench", "paper"]
PROMPTS: tuple[str, ...] = ("processbench", "paper")
#: Why a sample gave no verdict (`"ok"` = it did); the `paper` parser uses the last three.
VERDICT_REASONS = ("ok", "no_box", "not_integer", "out_of_range", "no_conclusion", "incomplete", "conflicting")

CRITIQUE_TEMPLATE = (
    "The following is a math problem and a solution (split into paragraphs, enclosed with tags and "
    "indexed from 0):\n\n"
    "[Math Problem]\n\n{problem}\n\n"
    "[Solution]\n\n{tagged_steps}\n\n"
    "Your task is to review and critique the solution paragraph by paragraph. Once you identify an "
    "error in a paragraph, return the index of the paragraph where the earliest error occurs. "
    'Otherwise, return the index of -1 (which typically denotes "not found").\n\n'
    "Please put your final answer (i.e., the index) in \\boxed{{}}."
)

# Our wording of the paper's judge prompt (App. C describes its structure: 1-based paragraphs, an
# analysis per paragraph, a Correct/Incorrect conclusion), not a copy of its text.
PAPER_JUDGE_TEMPLATE = (
    "You will review a math problem and a step-by-step solution to it. The solution is split into "
    "{n} paragraphs, numbered from 1 and enclosed in tags.\n\n"
    "[Math Problem]\n\n{problem}\n\n"
    "[Solution]\n\n{tagged_steps}\n\n"
    "Check the paragraphs in order. For each paragraph k, first write a careful analysis inside "
    "<analysis_k></analysis_k>: verify every claim, recompute every calculation and check that the "
    "reasoning follows from the problem and the previous paragraphs. Then give your conclusion for "
    "that paragraph inside <conclusion_k></conclusion_k>: exactly Correct if the paragraph is "
    "logically and mathematically valid, or exactly Incorrect if it contains any error.\n\n"
    "Format, for paragraph 1:\n<analysis_1>\n...\n</analysis_1>\n<conclusion_1>Correct</conclusion_1>\n"
    "and so on up to paragraph {n}. Once a paragraph is Incorrect you may stop after its conclusion."
)


def _tagged(steps: Sequence[str], start: int) -> str:
    return "\n\n".join(f"<paragraph_{i}>\n{step}\n</paragraph_{i}>" for i, step in enumerate(steps, start))


def _check_prompt(prompt: str) -> None:
    if prompt not in PROMPTS:
        raise ValueError(f"unknown critique prompt {prompt!r}; choose one of {list(PROMPTS)}")


def critique_prompt(problem: str, steps: Sequence[str], prompt: PromptKind = "processbench") -> str:
    """The user message asking a critic for the earliest erroneous step."""
    _check_prompt(prompt)
    if prompt == "paper":
        return PAPER_JUDGE_TEMPLATE.format(problem=problem, tagged_steps=_tagged(steps, 1), n=len(steps))
    return CRITIQUE_TEMPLATE.format(problem=problem, tagged_steps=_tagged(steps, 0))


def critique_messages(problem: str, steps: Sequence[str], prompt: PromptKind = "processbench") -> list[dict[str, str]]:
    return [{"role": "user", "content": critique_prompt(problem, steps, prompt)}]


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


_OFFICIAL_BOX = re.compile(r"\\boxed\{([^}]*)\}")  # ProcessBench's extract_answer pattern
_CONCLUSION = re.compile(
    r"<conclusion_(\d+)>\s*(?:\*\*)?\s*(Correct|Incorrect)\s*(?:\*\*)?\s*</conclusion_\1>", re.IGNORECASE
)


def _boxed_index(text: str, official: bool) -> tuple[int | None, str]:
    if official:
        matches = _OFFICIAL_BOX.findall(text)
        if not matches:
            return None, "no_box"
        content = matches[-1].strip()
    else:
        content = last_boxed(text)
        if content is None:
            return None, "no_box"
        content = content.strip().strip("$").strip()
        if content.startswith("\\text{") and content.endswith("}"):
            content = content[len("\\text{") : -1].strip()
    try:
        return int(content), "ok"
    except ValueError:
        return None, "not_integer"


def _paper_index(text: str, num_steps: int) -> tuple[int | None, str]:
    conclusions: dict[int, bool] = {}  # 1-based paragraph -> correct
    for number, word in _CONCLUSION.findall(text):
        k, correct = int(number), word.lower() == "correct"
        if not 1 <= k <= num_steps:
            return None, "out_of_range"
        if conclusions.setdefault(k, correct) != correct:
            return None, "conflicting"
    if not conclusions:
        return None, "no_conclusion"
    wrong = [k for k, correct in conclusions.items() if not correct]
    if wrong:
        first = min(wrong)
        # Every paragraph before the first Incorrect one must have been concluded Correct:
        # otherwise an unexamined earlier paragraph could hold the real first error.
        if any(k not in conclusions for k in range(1, first)):
            return None, "incomplete"
        return first - 1, "ok"
    if len(conclusions) < num_steps:
        return None, "incomplete"
    return -1, "ok"


def classify_verdict(
    text: str, num_steps: int, *, prompt: PromptKind = "processbench", official: bool = False
) -> tuple[int | None, str]:
    """`(index, "ok")` with an index in `[-1, num_steps)` (0-based), or `(None, reason)`
    with a reason from `VERDICT_REASONS`.

    `processbench`: the last `\\boxed{}` as an integer; `official=True` parses exactly as
    ProcessBench's `extract_answer` + `int()`. An integer outside `[-1, num_steps)` is no
    verdict (`out_of_range`); ProcessBench scores it wrong, and so does a missing verdict.
    `paper`: the earliest `<conclusion_k>Incorrect` (1-based k), or -1 when all paragraphs are
    concluded Correct; missing conclusions before it (or anywhere, with no Incorrect one) give
    `incomplete`, two different conclusions for one paragraph `conflicting`.
    """
    _check_prompt(prompt)
    if prompt == "paper":
        if official:
            raise ValueError("official=True is ProcessBench's parser; it applies to prompt='processbench' only")
        return _paper_index(text, num_steps)
    index, reason = _boxed_index(text, official)
    if index is None:
        return None, reason
    return (index, "ok") if -1 <= index < num_steps else (None, "out_of_range")


def parse_first_error(
    text: str, num_steps: int, *, prompt: PromptKind = "processbench", official: bool = False
) -> int | None:
    """The critic's verdict: an index in [-1, num_steps), or None (no verdict); see
    `classify_verdict`."""
    return classify_verdict(text, num_steps, prompt=prompt, official=official)[0]


def critic_vote(verdicts: Sequence[int | None]) -> int | None:
    """The critic's verdict from its sampled verdicts: a plurality vote, ties to the first sampled.

    The one vote rule, used by synthesis's judge and by ProcessBench evaluation, so one critic on
    the same samples gives one verdict in both. It is ProcessBench's (`run_eval.py --use_voting`:
    `Counter(preds).most_common(1)` over the samples with a box): the most common verdict wins
    without needing a majority, and a tie goes to the verdict sampled first (sample order is seed
    order, so this is deterministic). That keeps critic figures comparable with published ones;
    synthesis needs no quorum on top, since consensus filtering keeps a judge verdict only where
    Monte Carlo agrees. Unparseable samples (`None`) do not vote (ProcessBench drops samples
    without a box; here each sample is parsed by `classify_verdict` before it votes).

    Args:
        verdicts: One parsed verdict per sample, in sample order; `None` = no verdict.

    Returns:
        The winning index, or `None` when no sample gave a verdict.
    """
    counts = Counter(v for v in verdicts if v is not None)
    # most_common orders equal counts as first encountered: a tie goes to the first sampled.
    return counts.most_common(1)[0][0] if counts else None
