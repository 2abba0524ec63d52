"""BERT, RoBERTa and DistilBERT pruned by prunekit: the modules in place of pruned sublayers and
the builders of the pruned classes (remote code, copied into every folder of these families).

``config.json`` maps the Auto classes to ``Pruned<Model>`` here (``auto_map``), so that in a
process without prunekit::

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)

builds the pruned architecture from ``prunekit_layers`` (heads and FFN width per layer, removed
sublayers) and ``prunekit_hidden_size`` (the narrowed residual width) before the weights load.
prunekit's adapters (``prunekit.families.bert``, ``.distilbert``) import the modules below from
here and ``import prunekit`` registers these same classes, so a folder's weights land in the same
modules on every path. It imports only torch, transformers and ``configuration_prunekit``.

Per layer, for BERT and RoBERTa (post-LN, the LayerNorms inside the sublayer modules):

- a sublayer with zero heads (neurons) computes LayerNorm(X + b), its output bias b;
- a removed sublayer is the identity: X passes through, its LayerNorm is skipped.

DistilBERT keeps its LayerNorms in the block: an empty sublayer returns b, a removed one returns
0 and its LayerNorm becomes the identity.
"""

from __future__ import annotations

import torch
from torch import nn

from .configuration_prunekit import (
    layer_shapes,
    linear_like,
    model_class_named,
    narrow_embedding,
    narrow_input,
    narrow_norm,
    zero_bias,
)


# ---- BERT and RoBERTa: the modules in place of pruned sublayers --------------------------------
class EmptyBertAttention(nn.Module):
    """An attention sublayer with every head removed: computes LN(X + b_out) exactly (spec P4)."""

    def __init__(self, bias: torch.Tensor, layer_norm: nn.LayerNorm) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())
        self.LayerNorm = layer_norm

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return self.LayerNorm(hidden_states + self.bias), None


class EmptyBertIntermediate(nn.Module):
    """FFN-in with no neurons: a zero-width view, so nothing is computed."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states[..., :0]  # (B, T, 0)


class EmptyBertOutput(nn.Module):
    """FFN-out with no neurons: LN(X + b_out), the masked model's value (spec P4)."""

    def __init__(self, bias: torch.Tensor, layer_norm: nn.LayerNorm) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())
        self.LayerNorm = layer_norm

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(input_tensor + self.bias)


class RemovedBertAttention(nn.Module):
    """A removed attention sublayer (CoFi): returns X itself, no bias, no LayerNorm (cofi.md §8.1)."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return hidden_states, None  # (B, T, d), no attention weights


class RemovedBertOutput(nn.Module):
    """FFN-out of a removed FFN sublayer: returns the residual input X, skipping the LayerNorm.
    Its FFN-in is an :class:`EmptyBertIntermediate`, so nothing is computed."""

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return input_tensor  # (B, T, d)


# ---- DistilBERT: the modules in place of pruned sublayers --------------------------------------
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


class RemovedDistilBertAttention(nn.Module):
    """A removed attention sublayer (CoFi): adds nothing. The block's ``sa_layer_norm`` is an
    ``nn.Identity`` once the sublayer is removed, so the block's attention step gives 0 + X = X."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        # A 0-d zero broadcasts against X without allocating a (B, T, d) tensor of zeros.
        return hidden_states.new_zeros(()), None


class RemovedDistilBertFFN(nn.Module):
    """A removed FFN sublayer (CoFi): adds nothing; ``output_layer_norm`` is an ``nn.Identity``."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states.new_zeros(())  # broadcasts to (B, T, d) in the block's residual add


# ---- rebuilding a pruned model from its config (placeholders: the saved weights load over them) ----
def build_bert(model: nn.Module, config) -> None:
    """BERT and RoBERTa: allocate every layer at its pruned widths."""
    base = model.base_model
    h = getattr(config, "prunekit_hidden_size", None) or config.hidden_size
    d_h = config.hidden_size // config.num_attention_heads
    if h != config.hidden_size:
        emb = base.embeddings
        for table in (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings):
            narrow_embedding(table, h)
        narrow_norm(emb.LayerNorm, h)
        if getattr(base, "pooler", None) is not None:
            narrow_input(base.pooler.dense, h)
        if hasattr(model, "qa_outputs"):
            narrow_input(model.qa_outputs, h)
        classifier = getattr(model, "classifier", None)
        if classifier is not None and hasattr(classifier, "dense"):  # RoBERTa's classification head
            narrow_input(classifier.dense, h)
    for block, shape in zip(base.encoder.layer, layer_shapes(config, len(base.encoder.layer)), strict=True):
        heads = shape["num_heads"] if shape else config.num_attention_heads
        width = shape["intermediate_size"] if shape else config.intermediate_size
        attention = block.attention
        if shape and shape.get("attention_removed"):
            block.attention = RemovedBertAttention()
        elif heads == 0:
            norm = attention.output.LayerNorm
            narrow_norm(norm, h)
            block.attention = EmptyBertAttention(zero_bias(attention.output.dense, h), norm)
        else:
            sa = attention.self
            sa.query, sa.key, sa.value = (linear_like(sa.query, h, heads * d_h) for _ in range(3))
            sa.num_attention_heads, sa.all_head_size = heads, heads * d_h
            attention.output.dense = linear_like(attention.output.dense, heads * d_h, h)
            narrow_norm(attention.output.LayerNorm, h)
        if shape and shape.get("ffn_removed"):
            block.intermediate, block.output = EmptyBertIntermediate(), RemovedBertOutput()
        elif width == 0:
            norm = block.output.LayerNorm
            narrow_norm(norm, h)
            block.output = EmptyBertOutput(zero_bias(block.output.dense, h), norm)
            block.intermediate = EmptyBertIntermediate()
        else:
            block.intermediate.dense = linear_like(block.intermediate.dense, h, width)
            block.output.dense = linear_like(block.output.dense, width, h)
            narrow_norm(block.output.LayerNorm, h)


def build_distilbert(model: nn.Module, config) -> None:
    """DistilBERT: allocate every layer at its pruned widths."""
    base = model.base_model
    h = getattr(config, "prunekit_hidden_size", None) or config.dim
    d_h = config.dim // config.n_heads
    if h != config.dim:
        emb = base.embeddings
        for table in (emb.word_embeddings, emb.position_embeddings):
            narrow_embedding(table, h)
        narrow_norm(emb.LayerNorm, h)
        for name in ("pre_classifier", "qa_outputs"):
            if hasattr(model, name):
                narrow_input(getattr(model, name), h)
    blocks = base.transformer.layer
    for block, shape in zip(blocks, layer_shapes(config, len(blocks)), strict=True):
        heads = shape["num_heads"] if shape else config.n_heads
        width = shape["intermediate_size"] if shape else config.hidden_dim
        sa = block.attention
        if shape and shape.get("attention_removed"):
            block.attention, block.sa_layer_norm = RemovedDistilBertAttention(), nn.Identity()
        else:
            if heads == 0:
                block.attention = EmptyDistilBertAttention(zero_bias(sa.out_lin, h))
            else:
                sa.q_lin, sa.k_lin, sa.v_lin = (linear_like(sa.q_lin, h, heads * d_h) for _ in range(3))
                sa.out_lin = linear_like(sa.out_lin, heads * d_h, h)
                sa.n_heads = heads
            narrow_norm(block.sa_layer_norm, h)
        ffn = block.ffn
        if shape and shape.get("ffn_removed"):
            block.ffn, block.output_layer_norm = RemovedDistilBertFFN(), nn.Identity()
        else:
            if width == 0:
                block.ffn = EmptyDistilBertFFN(zero_bias(ffn.lin2, h))
            else:
                ffn.lin1 = linear_like(ffn.lin1, h, width)
                ffn.lin2 = linear_like(ffn.lin2, width, h)
            narrow_norm(block.output_layer_norm, h)


BUILDERS = {"bert": build_bert, "roberta": build_bert, "distilbert": build_distilbert}


def __getattr__(name: str) -> type:
    # auto_map names PrunedBertForSequenceClassification, PrunedDistilBertModel, ...: made on first use.
    return model_class_named(name, __name__, BUILDERS)
