"""A scripted generation backend: completions chosen by a function of the prompt.

It implements `GenerationBackend` without a model, for tests of
the labelling logic (which completions are correct decides every label, so a test can state the
exact expected labels), for the MC cost benchmark (realistic lengths at no model cost) and for
dry runs of a pipeline configuration. Every request is recorded, so a test can also check *how*
the pipeline generates (one `n = k` request per step prefix, seeds, max_tokens).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from prm_jax.generation.types import Completion, Prompt, RequestOutput, SamplingParams, is_messages, per_prompt_params
from prm_jax.tokenization import render_chat

#: What a script returns for completion `index` of a request: the text, or (text, token count),
#: or a full Completion (to script finish reasons).
ScriptResult = str | tuple[str, int] | Completion
Script = Callable[[str, int, SamplingParams], ScriptResult]


class CharTokenizer:
    """A stand-in tokenizer: one token per character, no chat template (plain prompt layout)."""

    chat_template = None
    eos_token_id = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


@dataclasses.dataclass
class Request:
    prompt: str
    params: SamplingParams


def approx_tokens(text: str) -> int:
    """A token count for scripted text: ~4 characters per token, as for English/LaTeX with BPE."""
    return max(1, (len(text) + 3) // 4)


class ScriptedBackend:
    """Generation backend whose completions come from `script(prompt, index, params)`.

    Args:
        script: Returns completion `index` (0..n-1) of a request for the rendered `prompt`.
        tokenizer: Used to render chat prompts and to measure prompt lengths; defaults to
            `CharTokenizer`.
        context_length: Reported to the pipeline (prompt-length checks); None = unlimited.
    """

    def __init__(self, script: Script, *, tokenizer=None, context_length: int | None = None) -> None:
        self.script = script
        self.tokenizer = tokenizer if tokenizer is not None else CharTokenizer()
        self.context_length = context_length
        self.requests: list[Request] = []

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[RequestOutput]:
        all_params = per_prompt_params(params, len(prompts))
        outputs = []
        for prompt, p in zip(prompts, all_params):
            if not isinstance(prompt, str):
                if not is_messages(prompt):
                    raise TypeError("ScriptedBackend takes rendered strings or chat messages, not token ids")
                prompt = render_chat(self.tokenizer, prompt)  # the text every backend renders
            self.requests.append(Request(prompt, p))
            completions = []
            for index in range(p.n):
                result = self.script(prompt, index, p)
                if isinstance(result, Completion):
                    completions.append(result)
                    continue
                text, count = (result, approx_tokens(result)) if isinstance(result, str) else result
                finish = "stop"
                if count > p.max_tokens:  # cut like a real sampler would
                    text, count, finish = text[: 4 * p.max_tokens], p.max_tokens, "length"

                completions.append(Completion(text, tuple(range(count)), finish))
            outputs.append(RequestOutput(tuple(self.tokenizer.encode(prompt)), tuple(completions)))
        return outputs
