"""Gemma 2 (``Gemma2ForCausalLM``, ``Gemma2ForSequenceClassification``) and Gemma 3's language model
(``Gemma3ForCausalLM``, ``Gemma3TextForSequenceClassification``: the 270M and 1B checkpoints, and the
text part of the larger ones): the Llama layout (``prunekit.families.decoder``) with

- "sandwich" norms: each sublayer's input *and output* are normalised (``input_layernorm`` and
  ``post_attention_layernorm`` around the attention, ``pre_feedforward_layernorm`` and
  ``post_feedforward_layernorm`` around the FFN; ``BlockFacts.output_norm``), so a block computes
  X + norm_out(f(norm_in(X))). An emptied sublayer (no biases) then adds norm_out(0) = 0: X exactly;
- RMSNorms that scale by (1 + w), their weights stored centred on 0 (``BlockFacts.norm_offset``);
- a GeGLU FFN (``gelu_pytorch_tanh``), embeddings scaled by sqrt(hidden) inside the embedding
  module (a fixed number: narrowing nothing changes it), query scaling by query_pre_attn_scalar;
- sliding-window layers interleaved with global ones (``layer_types``; Gemma 3 gives each kind its
  own rotary base), which every attention module keeps reading from its own attributes;
- Gemma 2 soft-caps the attention logits (``attn_logit_softcapping``, passed to the kernel by its
  attention) and both may soft-cap the final logits (``final_logit_softcapping``, in the head);
- Gemma 3: per-head RMSNorms of queries and keys over d_h, as Qwen3 (unchanged by head pruning).

Head pruning leaves all of this alone: norms, scales and soft-caps act over d or d_h, never over
the head count. Most of a small Gemma's parameters are its 262,144-entry vocabulary, which the
parameter budget (``count_non_embedding_params``) leaves out.

Refused, with the feature named: Gemma 3's multimodal model (``Gemma3ForConditionalGeneration``,
model_type "gemma3"; prune its language model) and bidirectional attention
(``use_bidirectional_attention``, the embedding variant).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers import (
    Gemma2ForCausalLM,
    Gemma2ForSequenceClassification,
    Gemma2Model,
    Gemma3ForCausalLM,
    Gemma3TextForSequenceClassification,
    Gemma3TextModel,
)

from prunekit.core.errors import ModelError
from prunekit.core.view import BlockFacts, CausalLmParts
from prunekit.families.decoder import LlamaLayoutAdapter


class _GemmaAdapter(LlamaLayoutAdapter):
    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if getattr(self.config, "use_bidirectional_attention", False):
            raise ModelError(f"{type(model).__name__} with bidirectional attention (use_bidirectional_attention=True, "
                             "an embedding model) is not supported by prunekit: it prunes causal decoders")

    @property
    def facts(self) -> BlockFacts:
        biases = {"query", "key", "value", "out"} if getattr(self.config, "attention_bias", False) else set()
        return BlockFacts("pre", "rmsnorm", frozenset(biases), gated_ffn=True, output_norm=True, norm_offset=1.0)

    @classmethod
    def causal_lm_parts(cls, model: nn.Module) -> CausalLmParts:
        """Gemma's head soft-caps its logits, cap · tanh(logits / cap), where the config sets
        ``final_logit_softcapping`` (Gemma 2: 30): chunked logits must be capped the same way."""
        parts = super().causal_lm_parts(model)
        cap = getattr(model.config, "final_logit_softcapping", None)
        return parts if not cap else CausalLmParts(parts.body, _SoftCappedHead(parts.head, float(cap)))


class _SoftCappedHead(nn.Module):
    """An output head whose logits are soft-capped: cap · tanh(head(h) / cap)."""

    def __init__(self, head: nn.Module, cap: float) -> None:
        super().__init__()
        self.head, self.cap = head, cap

    @property
    def weight(self) -> torch.Tensor:  # (V, d): callers size their chunks of positions by V
        return self.head.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(hidden) / self.cap) * self.cap


class Gemma2Adapter(_GemmaAdapter):
    family = "gemma2"
    model_types = ("gemma2",)
    model_classes = {
        "causal_lm": Gemma2ForCausalLM,
        "sequence_classification": Gemma2ForSequenceClassification,
        "base": Gemma2Model,
    }


class Gemma3Adapter(_GemmaAdapter):
    family = "gemma3"
    model_types = ("gemma3_text",)
    model_classes = {
        "causal_lm": Gemma3ForCausalLM,
        "sequence_classification": Gemma3TextForSequenceClassification,
        "base": Gemma3TextModel,
    }
    refused_model_types: ClassVar[dict[str, str]] = {
        "gemma3": "Gemma 3's multimodal model (vision tower and projector); prune its language model: "
                  "Gemma3ForCausalLM.from_pretrained(...) loads it alone",
    }

    def call_layer(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        # Each layer kind (sliding, full) has its own rotary base: the model computes both.
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]  # (1, T)
        layer_type = self.config.layer_types[block.layer_idx]
        cos_sin = self.model.base_model.rotary_emb(hidden, positions, layer_type)
        return block(hidden, position_embeddings=cos_sin, position_ids=positions)  # causal, unpadded
