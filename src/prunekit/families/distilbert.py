"""DistilBERT adapter: Hugging Face ``modeling_distilbert`` (transformers v5).

Layout per layer (``model.base_model.transformer.layer[l]``)::

    attention.{q_lin,k_lin,v_lin}      d -> H*d_h
    attention.out_lin                  H*d_h -> d;  the block then applies sa_layer_norm(. + X)
    ffn.lin1                           d -> d_ff, then the activation
    ffn.lin2                           d_ff -> d;   the block then applies output_layer_norm(. + X)

Unlike BERT, the LayerNorms sit in the block, outside the sublayer modules, so an emptied
sublayer only has to return its bias: the block adds X and normalises. A *removed* sublayer must
also skip that LayerNorm; ``TransformerBlock.forward`` (v5) always computes
``sa_layer_norm(attention(X)[0] + X)`` and ``output_layer_norm(ffn(Y) + Y)``, so removal puts a
zero-output module in place of the sublayer and ``nn.Identity`` in place of its LayerNorm:
0 + X = X exactly. Nothing in the v5 forward reads ``config.dim`` or the attention's ``dim``
(the attention reshapes with ``view(..., -1, d_h)``), so a narrowed residual stream needs no
attribute changes. The modules put in place of pruned sublayers live in
``remote_code/modeling_prunekit.py``, which saved folders carry so that they load without prunekit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (
    DistilBertForQuestionAnswering,
    DistilBertForSequenceClassification,
    DistilBertModel,
)

from prunekit.core.view import (
    POST_LAYERNORM_ALL_BIASES,
    AttentionParts,
    BlockFacts,
    FfnParts,
    ModelAdapter,
    SublayerKind,
    removed_error,
    require_own_kv_heads,
)
from prunekit.families.remote_code.modeling_prunekit import (
    EmptyDistilBertAttention,
    EmptyDistilBertFFN,
    RemovedDistilBertAttention,
    RemovedDistilBertFFN,
)


class DistilBertAdapter(ModelAdapter):
    family = "distilbert"
    model_types = ("distilbert",)
    model_classes = {
        "sequence_classification": DistilBertForSequenceClassification,
        "question_answering": DistilBertForQuestionAnswering,
        "base": DistilBertModel,
    }
    remote_code = "modeling_prunekit.py"

    @property
    def facts(self) -> BlockFacts:
        # LN(X + f(X)) with nn.LayerNorm, a bias on every linear, a plain GELU FFN; the
        # embeddings are not tied to any head prunekit accepts.
        return POST_LAYERNORM_ALL_BIASES

    @property
    def full_intermediate_size(self) -> int:
        return self.config.hidden_dim

    def layers(self) -> nn.ModuleList:
        return self.model.base_model.transformer.layer

    def attention(self, layer: int) -> AttentionParts | None:
        sa = self.layers()[layer].attention
        if isinstance(sa, (EmptyDistilBertAttention, RemovedDistilBertAttention)):
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
        if isinstance(ffn, (EmptyDistilBertFFN, RemovedDistilBertFFN)):
            return None
        return FfnParts(up=ffn.lin1, down=ffn.lin2)

    def is_removed(self, layer: int, kind: SublayerKind) -> bool:
        removed = RemovedDistilBertAttention if kind == "attn" else RemovedDistilBertFFN
        return isinstance(self.sublayer_module(layer, kind), removed)

    def embedding_layer_norm(self) -> nn.LayerNorm:
        return self.model.base_model.embeddings.LayerNorm

    def sublayer_layer_norm(self, layer: int, kind: SublayerKind) -> nn.LayerNorm:
        if self.is_removed(layer, kind):
            raise removed_error(layer, kind, "LayerNorm")
        block = self.layers()[layer]
        return block.sa_layer_norm if kind == "attn" else block.output_layer_norm

    def _embedding_tables(self) -> list[nn.Embedding]:
        # No token-type table; the position table may hold sinusoids, sliced like any other.
        embeddings = self.model.base_model.embeddings
        return [embeddings.word_embeddings, embeddings.position_embeddings]

    def _head_input_linears(self) -> list[nn.Linear]:
        # pre_classifier reads the [CLS] row of the residual stream; classifier sees its full-width output.
        if isinstance(self.model, self.model_classes["sequence_classification"]):
            return [self.model.pre_classifier]
        if isinstance(self.model, self.model_classes["question_answering"]):
            return [self.model.qa_outputs]
        return []
    def sublayer_module(self, layer: int, kind: SublayerKind) -> nn.Module:
        block = self.layers()[layer]
        return block.attention if kind == "attn" else block.ffn

    def _empty_module(self, layer: int, kind: SublayerKind) -> nn.Module:
        return self.sublayer_module(layer, kind)

    def pruned_config_updates(self) -> dict[str, Any]:
        # from_pretrained runs the v5 _init_weights, after loading, on every module holding a
        # buffer the checkpoint lacks (Embeddings has position_ids); with sinusoidal_pos_embds it
        # rebuilds the position table at config.dim, which a narrowed table no longer has. The
        # flag only drives that init (the saved table is loaded over it), so a narrowed model is
        # saved with it off.
        if self.hidden_size != self.full_hidden_size and self.config.sinusoidal_pos_embds:
            return {"sinusoidal_pos_embds": False}
        return {}

    def set_attention(self, layer: int, parts: AttentionParts) -> None:
        if self.is_removed(layer, "attn"):
            raise removed_error(layer, "attn", "heads to set")
        sa = self.layers()[layer].attention
        if isinstance(sa, EmptyDistilBertAttention):
            raise ValueError(f"layer {layer} has no attention heads left; it cannot be given new heads")
        require_own_kv_heads(layer, parts)
        sa.q_lin, sa.k_lin, sa.v_lin, sa.out_lin = parts.query, parts.key, parts.value, parts.out
        sa.n_heads = parts.num_heads

    def set_empty_attention(self, layer: int, bias: torch.Tensor) -> None:
        if self.is_removed(layer, "attn"):
            raise removed_error(layer, "attn", "LayerNorm to keep")
        self.layers()[layer].attention = EmptyDistilBertAttention(bias)

    def set_ffn(self, layer: int, parts: FfnParts) -> None:
        if self.is_removed(layer, "ffn"):
            raise removed_error(layer, "ffn", "neurons to set")
        ffn = self.layers()[layer].ffn
        if isinstance(ffn, EmptyDistilBertFFN):
            raise ValueError(f"layer {layer} has no FFN neurons left; it cannot be given new neurons")
        ffn.lin1, ffn.lin2 = parts.up, parts.down

    def set_empty_ffn(self, layer: int, bias: torch.Tensor) -> None:
        if self.is_removed(layer, "ffn"):
            raise removed_error(layer, "ffn", "LayerNorm to keep")
        self.layers()[layer].ffn = EmptyDistilBertFFN(bias)

    def remove_attention(self, layer: int) -> None:
        block = self.layers()[layer]
        block.attention = RemovedDistilBertAttention()
        block.sa_layer_norm = nn.Identity()

    def remove_ffn(self, layer: int) -> None:
        block = self.layers()[layer]
        block.ffn = RemovedDistilBertFFN()
        block.output_layer_norm = nn.Identity()
