"""DistilBERT adapter: Hugging Face ``modeling_distilbert`` (transformers v5).

Layout per layer (``model.base_model.transformer.layer[l]``)::

    attention.{q_lin,k_lin,v_lin}      d -> H*d_h
    attention.out_lin                  H*d_h -> d;  the block then applies sa_layer_norm(. + X)
    ffn.lin1                           d -> d_ff, then the activation
    ffn.lin2                           d_ff -> d;   the block then applies output_layer_norm(. + X)

Unlike BERT, the LayerNorms sit in the block, outside the sublayer modules, so an emptied
sublayer only has to return its bias: the block adds X and normalises.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    DistilBertForQuestionAnswering,
    DistilBertForSequenceClassification,
    DistilBertModel,
)

from .base import AttentionParts, FfnParts, ModelAdapter, SublayerKind


class EmptyDistilBertAttention(nn.Module):
    """Attention with every head removed: returns b_out; the block computes LN(X + b_out)."""

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return self.bias.expand_as(hidden_states), None


class EmptyDistilBertFFN(nn.Module):
    """FFN with every neuron removed: returns b_out; the block computes LN(X + b_out)."""

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.bias.expand_as(hidden_states)


class DistilBertAdapter(ModelAdapter):
    family = "distilbert"
    model_types = ("distilbert",)
    model_classes = {
        "sequence_classification": DistilBertForSequenceClassification,
        "question_answering": DistilBertForQuestionAnswering,
        "base": DistilBertModel,
    }

    @property
    def hidden_size(self) -> int:
        return self.config.dim

    @property
    def head_dim(self) -> int:
        return self.config.dim // self.config.n_heads

    @property
    def full_num_heads(self) -> int:
        return self.config.n_heads

    @property
    def full_intermediate_size(self) -> int:
        return self.config.hidden_dim

    def layers(self) -> nn.ModuleList:
        return self.model.base_model.transformer.layer

    def attention(self, layer: int) -> AttentionParts | None:
        sa = self.layers()[layer].attention
        if isinstance(sa, EmptyDistilBertAttention):
            return None
        return AttentionParts(
            query=sa.q_lin,
            key=sa.k_lin,
            value=sa.v_lin,
            out=sa.out_lin,
            num_heads=sa.q_lin.out_features // sa.attention_head_size,
            head_dim=sa.attention_head_size,
        )

    def ffn(self, layer: int) -> FfnParts | None:
        ffn = self.layers()[layer].ffn
        if isinstance(ffn, EmptyDistilBertFFN):
            return None
        return FfnParts(up=ffn.lin1, down=ffn.lin2)

    def sublayer_module(self, layer: int, kind: SublayerKind) -> nn.Module:
        block = self.layers()[layer]
        return block.attention if kind == "attn" else block.ffn

    def _empty_module(self, layer: int, kind: SublayerKind) -> nn.Module:
        return self.sublayer_module(layer, kind)

    def set_attention(self, layer: int, parts: AttentionParts) -> None:
        sa = self.layers()[layer].attention
        if isinstance(sa, EmptyDistilBertAttention):
            raise ValueError(f"layer {layer} has no attention heads left; it cannot be given new heads")
        sa.q_lin, sa.k_lin, sa.v_lin, sa.out_lin = parts.query, parts.key, parts.value, parts.out
        sa.n_heads = parts.num_heads

    def set_empty_attention(self, layer: int, bias: torch.Tensor) -> None:
        self.layers()[layer].attention = EmptyDistilBertAttention(bias)

    def set_ffn(self, layer: int, parts: FfnParts) -> None:
        ffn = self.layers()[layer].ffn
        if isinstance(ffn, EmptyDistilBertFFN):
            raise ValueError(f"layer {layer} has no FFN neurons left; it cannot be given new neurons")
        ffn.lin1, ffn.lin2 = parts.up, parts.down

    def set_empty_ffn(self, layer: int, bias: torch.Tensor) -> None:
        self.layers()[layer].ffn = EmptyDistilBertFFN(bias)
