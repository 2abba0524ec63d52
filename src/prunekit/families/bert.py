"""BERT adapter: where heads and neurons live in Hugging Face ``modeling_bert`` (transformers v5).

Layout per layer (``model.base_model.encoder.layer[l]``)::

    attention.self.{query,key,value}   d -> H*d_h
    attention.output.dense             H*d_h -> d, then LayerNorm(X + .)   (post-LN)
    intermediate.dense                 d -> d_ff, then the activation
    output.dense                       d_ff -> d, then LayerNorm(X + .)

The v5 attention reshapes with ``view(..., -1, d_h)``, so the head count follows the weights and a
narrowed q/k/v runs unchanged; only the bookkeeping attributes are updated here. Nothing in the v5
forward reads ``config.hidden_size`` either (embeddings, attention, pooler and heads all take the
width from their weights), so a narrowed residual stream needs no attribute changes.

The LayerNorms sit inside the sublayer modules (``attention.output.LayerNorm``,
``output.LayerNorm``), so a removed sublayer is one module that returns its residual input. The
modules put in place of pruned sublayers live in ``remote_code/modeling_prunekit.py`` (BERT,
RoBERTa and DistilBERT), which saved folders carry so that they load without prunekit.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertForQuestionAnswering, BertForSequenceClassification, BertModel

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
    EmptyBertAttention,
    EmptyBertIntermediate,
    EmptyBertOutput,
    RemovedBertAttention,
    RemovedBertOutput,
)


class BertAdapter(ModelAdapter):
    family = "bert"
    model_types = ("bert",)
    model_classes = {
        "sequence_classification": BertForSequenceClassification,
        "question_answering": BertForQuestionAnswering,
        "base": BertModel,
    }
    remote_code = "modeling_prunekit.py"

    @property
    def facts(self) -> BlockFacts:
        # LN(X + f(X)) with nn.LayerNorm, a bias on every linear, a plain GELU FFN; the
        # embeddings are not tied to any head prunekit accepts.
        return POST_LAYERNORM_ALL_BIASES

    @property
    def full_intermediate_size(self) -> int:
        return self.config.intermediate_size

    def layers(self) -> nn.ModuleList:
        return self.model.base_model.encoder.layer

    def attention(self, layer: int) -> AttentionParts | None:
        block = self.layers()[layer].attention
        if isinstance(block, (EmptyBertAttention, RemovedBertAttention)):
            return None
        sa = block.self
        return AttentionParts(
            query=sa.query,
            key=sa.key,
            value=sa.value,
            out=block.output.dense,
            num_heads=sa.query.out_features // sa.attention_head_size,
            head_dim=sa.attention_head_size,
        )

    def ffn(self, layer: int) -> FfnParts | None:
        block = self.layers()[layer]
        if isinstance(block.output, (EmptyBertOutput, RemovedBertOutput)):
            return None
        return FfnParts(up=block.intermediate.dense, down=block.output.dense)

    def is_removed(self, layer: int, kind: SublayerKind) -> bool:
        block = self.layers()[layer]
        if kind == "attn":
            return isinstance(block.attention, RemovedBertAttention)
        return isinstance(block.output, RemovedBertOutput)

    def embedding_layer_norm(self) -> nn.LayerNorm:
        return self.model.base_model.embeddings.LayerNorm

    def sublayer_layer_norm(self, layer: int, kind: SublayerKind) -> nn.LayerNorm:
        if self.is_removed(layer, kind):
            raise removed_error(layer, kind, "LayerNorm")
        if kind == "attn":
            return self._attention_layer_norm(layer)
        return self.layers()[layer].output.LayerNorm  # BertOutput or EmptyBertOutput

    def _embedding_tables(self) -> list[nn.Embedding]:
        embeddings = self.model.base_model.embeddings
        return [embeddings.word_embeddings, embeddings.position_embeddings, embeddings.token_type_embeddings]

    def _head_input_linears(self) -> list[nn.Linear]:
        # The pooler reads the residual stream; its output (and BERT's classifier after it) keeps
        # the full width. RoBERTa's task models have no pooler (add_pooling_layer=False).
        pooler = self.model.base_model.pooler
        linears = [pooler.dense] if pooler is not None else []
        if isinstance(self.model, self.model_classes["question_answering"]):
            linears.append(self.model.qa_outputs)
        return linears
    def sublayer_module(self, layer: int, kind: SublayerKind) -> nn.Module:
        block = self.layers()[layer]
        # BertLayer calls attention(hidden_states, ...) and intermediate(attention_output):
        # the first positional input of each is that sublayer's residual input.
        return block.attention if kind == "attn" else block.intermediate

    def _empty_module(self, layer: int, kind: SublayerKind) -> nn.Module:
        block = self.layers()[layer]
        return block.attention if kind == "attn" else block.output

    def set_attention(self, layer: int, parts: AttentionParts) -> None:
        if self.is_removed(layer, "attn"):
            raise removed_error(layer, "attn", "heads to set")
        block = self.layers()[layer].attention
        if isinstance(block, EmptyBertAttention):
            raise ValueError(f"layer {layer} has no attention heads left; it cannot be given new heads")
        require_own_kv_heads(layer, parts)
        sa = block.self
        sa.query, sa.key, sa.value = parts.query, parts.key, parts.value
        block.output.dense = parts.out
        sa.num_attention_heads = parts.num_heads
        sa.all_head_size = parts.num_heads * parts.head_dim

    def set_empty_attention(self, layer: int, bias: torch.Tensor) -> None:
        if self.is_removed(layer, "attn"):
            raise removed_error(layer, "attn", "LayerNorm to keep")
        block = self.layers()[layer]
        block.attention = EmptyBertAttention(bias, self._attention_layer_norm(layer))

    def _attention_layer_norm(self, layer: int) -> nn.LayerNorm:
        attention = self.layers()[layer].attention
        return attention.LayerNorm if isinstance(attention, EmptyBertAttention) else attention.output.LayerNorm

    def set_ffn(self, layer: int, parts: FfnParts) -> None:
        if self.is_removed(layer, "ffn"):
            raise removed_error(layer, "ffn", "neurons to set")
        block = self.layers()[layer]
        if isinstance(block.output, EmptyBertOutput):
            raise ValueError(f"layer {layer} has no FFN neurons left; it cannot be given new neurons")
        block.intermediate.dense = parts.up
        block.output.dense = parts.down

    def set_empty_ffn(self, layer: int, bias: torch.Tensor) -> None:
        if self.is_removed(layer, "ffn"):
            raise removed_error(layer, "ffn", "LayerNorm to keep")
        block = self.layers()[layer]
        block.output = EmptyBertOutput(bias, block.output.LayerNorm)
        block.intermediate = EmptyBertIntermediate()

    def remove_attention(self, layer: int) -> None:
        # The whole BertAttention goes: q/k/v, out-proj, bias and LayerNorm.
        self.layers()[layer].attention = RemovedBertAttention()

    def remove_ffn(self, layer: int) -> None:
        block = self.layers()[layer]
        block.intermediate = EmptyBertIntermediate()
        block.output = RemovedBertOutput()
