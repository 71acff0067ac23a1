"""Solutions as steps, their final answers, and the exact prompts the policy sees.

Prompt layouts (every backend receives the *rendered string*, so the JAX sampler, vLLM and the
scripted test double see identical text; ``render_prompt`` encodes it with
``add_special_tokens=False``):

* Policy prompt: the chat ``[system: system_prompt, user: problem]`` through the tokenizer's chat
  template with the generation prompt (``add_generation_prompt=True``); the empty system prompt
  leaves the system turn out. Without a chat template: the message contents joined by blank
  lines, plus a blank line (``render_prompt``'s fallback).
* MC continuation prompt for the prefix ending at step ``i``::

      policy_prompt + "\\n\\n".join(steps[: i + 1]) + "\\n\\n"

  i.e. the assistant turn is opened by the template and already holds the first ``i + 1`` steps,
  each followed by the blank line that separates steps, so the policy continues with step
  ``i + 1``. Steps are the normalised (stripped) ones the PRM is trained on, which is also why a
  completion's final answer is read from ``prefix + completion`` (:func:`final_answer`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from prm_jax.critique import last_boxed
from prm_jax.tokenization import SYSTEM_PROMPT

__all__ = ["SYSTEM_PROMPT", "split_steps", "final_answer", "render_chat", "policy_prompt",
           "continuation_prompt", "STEP_BREAK"]

#: What separates steps in a solution (the paper and Qwen2.5-Math-PRM split on blank lines).
STEP_BREAK = "\n\n"


def split_steps(text: str) -> list[str]:
    """Steps of a solution: split on blank lines, each stripped, empty pieces dropped.

    ``"a\\n\\n\\n\\nb"`` is two steps, not three: runs of blank lines are one break.
    """
    return [piece.strip() for piece in text.split(STEP_BREAK) if piece.strip()]


def final_answer(text: str) -> str | None:
    """The content of the last ``\\boxed{}`` (stripped), or None when there is none or it is empty."""
    boxed = last_boxed(text)
    if boxed is None:
        return None
    boxed = boxed.strip()
    return boxed or None


def render_chat(tokenizer, messages: Sequence[Mapping[str, str]]) -> str:
    """The chat rendered as text with the assistant turn opened (the same rules as ``render_prompt``)."""
    messages = [dict(m) for m in messages]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return STEP_BREAK.join(m["content"] for m in messages) + STEP_BREAK


def policy_messages(problem: str, system_prompt: str = SYSTEM_PROMPT) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": problem}]


def policy_prompt(tokenizer, problem: str, system_prompt: str = SYSTEM_PROMPT) -> str:
    """The prompt the policy answers a problem from."""
    return render_chat(tokenizer, policy_messages(problem, system_prompt))


def continuation_prompt(tokenizer, problem: str, steps: Sequence[str], system_prompt: str = SYSTEM_PROMPT,
                        *, rendered_problem: str | None = None) -> str:
    """The MC prompt: the policy prompt with the assistant answer started by ``steps`` (see above).

    ``rendered_problem`` is ``policy_prompt(...)`` when the caller already has it (one render per
    response instead of one per step).
    """
    head = rendered_problem if rendered_problem is not None else policy_prompt(tokenizer, problem, system_prompt)
    return head + STEP_BREAK.join(steps) + STEP_BREAK
