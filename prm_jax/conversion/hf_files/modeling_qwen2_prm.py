"""Qwen2 process reward model for Hugging Face transformers (remote code shipped with the weights).

transformers has no native class for a Qwen2 backbone with a per-token two-layer classification
head, so an exported PRM carries this file and is loaded with
`AutoModel.from_pretrained(path, trust_remote_code=True)`. It reproduces the layout of the released
Qwen2.5-Math-PRM checkpoints, so their weights and ours are interchangeable and vLLM's native
`Qwen2ForProcessRewardModel` serves both:

* `model.*`: the unchanged `Qwen2Model` backbone (no `lm_head`);
* `score.0` (Linear h->h, bias), `score.1` (ReLU), `score.2` (Linear h->num_labels, bias).

The file only imports names that exist in transformers 4.45+ and 5.x alike, and forwards extra
keyword arguments to the backbone untouched, so version-specific options (`cache_position` in 4.x,
attention kwargs in 5.x, `output_hidden_states` in both) keep working without special-casing.
"""

from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutputWithPast
from transformers.models.qwen2.modeling_qwen2 import Qwen2Model, Qwen2PreTrainedModel

from .configuration_qwen2_prm import Qwen2PRMConfig


class Qwen2ForProcessRewardModel(Qwen2PreTrainedModel):
    """Qwen2 decoder with a step-classification head applied at every token position.

    The step reward of a step is `softmax(logits)[..., 1]` at the step-separator token that ends it;
    the model itself scores every position and leaves picking the separators to the caller, exactly
    like the released Qwen2.5-Math-PRM remote code, so existing scoring scripts work unchanged.
    """

    # Set explicitly: transformers 4.x reads `config_class` and 5.x prefers a class attribute
    # defined on the subclass over the parent's `config: Qwen2Config` annotation.
    config_class = Qwen2PRMConfig

    def __init__(self, config: Qwen2PRMConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = Qwen2Model(config)
        hidden = config.hidden_size
        # nn.Sequential (not named submodules) so the parameter names are score.0.* and score.2.*,
        # the names used by the released checkpoints and by vLLM's weight loader.
        self.score = nn.Sequential(
            nn.Linear(hidden, hidden, bias=True), nn.ReLU(), nn.Linear(hidden, config.num_labels, bias=True)
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """Expose the backbone embedding so resize_token_embeddings and PEFT tooling find it."""
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Counterpart of get_input_embeddings, used when the vocabulary is resized."""
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = False,
        **kwargs: Any,
    ) -> SequenceClassifierOutputWithPast:
        """Run the backbone and the head; returns per-token `logits` of shape [B, T, num_labels].

        The result is a `ModelOutput`: `outputs.logits` and `outputs[0]` are the same tensor
        (`loss` is never set, and unset fields are skipped by integer indexing), matching how
        callers of the released PRM read it. `use_cache` defaults to False because scoring is a
        single forward pass and a KV cache would only cost memory.
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        # Index rather than use .last_hidden_state: works whether the backbone returned a ModelOutput
        # or (when a caller passed return_dict=False) a plain tuple.
        hidden_states = outputs[0]
        logits = self.score(hidden_states)
        return SequenceClassifierOutputWithPast(
            loss=None,
            logits=logits,
            past_key_values=getattr(outputs, "past_key_values", None),
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )


__all__ = ["Qwen2ForProcessRewardModel"]
