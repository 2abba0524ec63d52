"""Llama (Llama 2, Llama 3.x: ``LlamaForCausalLM``, ``LlamaForSequenceClassification``) and Mistral
(``MistralForCausalLM``, ``MistralForSequenceClassification``: Llama's blocks with an optional
sliding attention window, which the attention modules keep reading from the config).

Both have the Llama layout (``prunekit.families.decoder``): pre-norm RMSNorm blocks, a gated FFN,
grouped key/value heads, rotary positions, an output head that may be tied to the embeddings.
Llama's biases follow ``attention_bias`` (q, k, v and o) and ``mlp_bias`` (gate, up, down); Mistral
has none.
"""

from __future__ import annotations

from transformers import (
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    MistralForCausalLM,
    MistralForSequenceClassification,
    MistralModel,
)

from prunekit.families.decoder import LlamaLayoutAdapter


class LlamaAdapter(LlamaLayoutAdapter):
    family = "llama"
    model_types = ("llama",)
    model_classes = {
        "causal_lm": LlamaForCausalLM,
        "sequence_classification": LlamaForSequenceClassification,
        "base": LlamaModel,
    }


class MistralAdapter(LlamaLayoutAdapter):
    family = "mistral"
    model_types = ("mistral",)
    model_classes = {
        "causal_lm": MistralForCausalLM,
        "sequence_classification": MistralForSequenceClassification,
        "base": MistralModel,
    }
