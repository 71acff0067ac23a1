"""Qwen3 process reward model for Hugging Face transformers (remote code shipped with the weights).

The Qwen3 counterpart of `modeling_qwen2_prm.py` (the Qwen2.5-Math-PRM layout), for a PRM trained
from a Qwen3 base: the same head on the unchanged `Qwen3Model` backbone, so the weight names are the
Qwen2 PRM's plus Qwen3's `self_attn.q_norm`/`k_norm`, and no q/k/v biases:

* `model.*`: the unchanged `Qwen3Model` backbone (no `lm_head`);
* `score.0` (Linear h->h, bias), `score.1` (ReLU), `score.2` (Linear h->num_labels, bias).

Loaded with `AutoModel.from_pretrained(path, trust_remote_code=True)` on transformers 4.51+ (the
first with Qwen3) and 5.x. vLLM has a native `Qwen2ForProcessRewardModel` but no Qwen3 one.
"""

from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutputWithPast
from transformers.models.qwen3.modeling_qwen3 import Qwen3Model, Qwen3PreTrainedModel

from .configuration_qwen3_prm import Qwen3PRMConfig


class Qwen3ForProcessRewardModel(Qwen3PreTrainedModel):
    """Qwen3 decoder with a step-classification head applied at every token position.

    The step reward of a step is `softmax(logits)[..., 1]` at the step-separator token that ends it;
    the model scores every position and leaves picking the separators to the caller, as the
    released Qwen2.5-Math-PRM remote code does.
    """

    # Set explicitly: transformers 4.x reads `config_class` and 5.x prefers a class attribute
    # defined on the subclass over the parent's `config: Qwen3Config` annotation.
    config_class = Qwen3PRMConfig

    def __init__(self, config: Qwen3PRMConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = Qwen3Model(config)
        hidden = config.hidden_size
        # nn.Sequential so the parameter names are score.0.* and score.2.*, as in the Qwen2 PRM.
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
        """Run the backbone and the head; returns per-token `logits` of shape [B, T, num_labels]."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs[0]
        logits = self.score(hidden_states)
        return SequenceClassifierOutputWithPast(
            loss=None,
            logits=logits,
            past_key_values=getattr(outputs, "past_key_values", None),
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )


__all__ = ["Qwen3ForProcessRewardModel"]
