"""Solutions as steps, their final answers, and the exact prompts the policy sees.

Prompt layouts (every backend receives the *rendered string*, so the JAX sampler, vLLM and the
scripted test double see identical text; `render_prompt` encodes it with `add_special_tokens=False`):

* Policy prompt: `prm_jax.tokenization.render_chat` of `[system: system_prompt, user: problem]`
  with the assistant turn open (with the default system prompt, the layout policy SFT trains on).
  An empty system prompt adds no system turn (the template's default applies); without a chat
  template the layout is `f"{system_prompt}\\n\\n{problem}\\n\\n"` (or `f"{problem}\\n\\n"`).
* MC continuation prompt for the prefix ending at step `i`:

      policy_prompt + "\\n\\n".join(steps[: i + 1]) + "\\n\\n"

  i.e. the assistant turn is opened by the template and already holds the first `i + 1` steps,
  each followed by the blank line that separates steps, so the policy continues with step
  `i + 1`. Steps are the normalised (stripped) ones the PRM is trained on, which is also why a
  completion's final answer is read from `prefix + completion` (`final_answer`).
"""

from __future__ import annotations

from collections.abc import Sequence

from prm_jax.critique import last_boxed
from prm_jax.tokenization import SYSTEM_PROMPT, render_chat

__all__ = ["split_steps", "final_answer", "policy_prompt", "continuation_prompt", "STEP_BREAK"]

#: What separates steps in a solution (the paper and Qwen2.5-Math-PRM split on blank lines).
STEP_BREAK = "\n\n"


def split_steps(text: str) -> list[str]:
    """Steps of a solution: split on blank lines, each stripped, empty pieces dropped.

    `"a\\n\\n\\n\\nb"` is two steps, not three: runs of blank lines are one break.
    """
    return [piece.strip() for piece in text.split(STEP_BREAK) if piece.strip()]


def final_answer(text: str) -> str | None:
    """The content of the last `\\boxed{}` (stripped), or None when there is none or it is empty."""
    boxed = last_boxed(text)
    if boxed is None:
        return None
    boxed = boxed.strip()
    return boxed or None


def policy_prompt(tokenizer, problem: str, system_prompt: str | None = SYSTEM_PROMPT) -> str:
    """The prompt the policy answers a problem from (see the module doc)."""
    return render_chat(tokenizer, [{"role": "user", "content": problem}], system_prompt=system_prompt)


def continuation_prompt(
    tokenizer,
    problem: str,
    steps: Sequence[str],
    system_prompt: str | None = SYSTEM_PROMPT,
    *,
    rendered_problem: str | None = None,
) -> str:
    """The MC prompt: the policy prompt with the assistant answer started by `steps` (see above).

    `rendered_problem` is `policy_prompt(...)` when the caller already has it (one render per
    response instead of one per step).
    """
    head = rendered_problem if rendered_problem is not None else policy_prompt(tokenizer, problem, system_prompt)
    return head + STEP_BREAK.join(steps) + STEP_BREAK
