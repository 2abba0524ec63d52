"""Models pruned by prunekit, rebuilt by plain transformers without prunekit (remote code).

This file is copied into every folder prunekit writes; ``config.json`` maps the Auto classes to
the classes here (``auto_map``), so that in a process without prunekit::

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)

builds the pruned architecture from ``prunekit_layers`` (heads and FFN width per layer, removed
sublayers) and ``prunekit_hidden_size`` (the narrowed residual width) before the weights load.
The module layout and names are exactly those prunekit saves, so every weight lands where it
was. It must not import prunekit; with prunekit installed, ``import prunekit`` (no remote code
runs then) and ``prunekit.load_pruned(folder)`` are preferred.

Per layer, for BERT and RoBERTa (post-LN, the LayerNorms inside the sublayer modules):

- a sublayer with zero heads (neurons) computes LayerNorm(X + b), its output bias b;
- a removed sublayer is the identity: X passes through, its LayerNorm is skipped.

DistilBERT keeps its LayerNorms in the block: an empty sublayer returns b, a removed one returns
0 and its LayerNorm becomes the identity.
"""

import torch
from torch import nn
from transformers import (
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertModel,
    DistilBertForQuestionAnswering,
    DistilBertForSequenceClassification,
    DistilBertModel,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
    RobertaModel,
)

from .configuration_prunekit import PrunekitBertConfig, PrunekitDistilBertConfig, PrunekitRobertaConfig


# ---- the modules prunekit puts in place of pruned sublayers ----------------------------------------
class EmptyBertAttention(nn.Module):
    def __init__(self, bias: torch.Tensor, layer_norm: nn.LayerNorm) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias)
        self.LayerNorm = layer_norm

    def forward(self, hidden_states, *args, **kwargs):
        return self.LayerNorm(hidden_states + self.bias), None


class EmptyBertIntermediate(nn.Module):
    def forward(self, hidden_states):
        return hidden_states[..., :0]


class EmptyBertOutput(nn.Module):
    def __init__(self, bias: torch.Tensor, layer_norm: nn.LayerNorm) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias)
        self.LayerNorm = layer_norm

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(input_tensor + self.bias)


class RemovedBertAttention(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states, None


class RemovedBertOutput(nn.Module):
    def forward(self, hidden_states, input_tensor):
        return input_tensor


class EmptyDistilBertAttention(nn.Module):
    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias)

    def forward(self, hidden_states, *args, **kwargs):
        return self.bias.expand_as(hidden_states), None


class EmptyDistilBertFFN(nn.Module):
    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias)

    def forward(self, hidden_states):
        return self.bias.expand_as(hidden_states)


class RemovedDistilBertAttention(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states.new_zeros(()), None


class RemovedDistilBertFFN(nn.Module):
    def forward(self, hidden_states):
        return hidden_states.new_zeros(())


# ---- reshaping (placeholders: the saved weights are loaded over them) ------------------------------
def _param(module: nn.Module, name: str, shape: tuple) -> None:
    old = getattr(module, name, None)
    if old is not None:
        setattr(module, name, nn.Parameter(torch.empty(shape, device=old.device, dtype=old.dtype)))


def _linear(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    new = nn.Linear(in_features, out_features, bias=old.bias is not None, device=old.weight.device,
                    dtype=old.weight.dtype)
    return new


def _narrow_in(linear: nn.Linear, width: int) -> None:
    _param(linear, "weight", (linear.out_features, width))
    linear.in_features = width


def _narrow_norm(norm: nn.LayerNorm, width: int) -> None:
    _param(norm, "weight", (width,))
    _param(norm, "bias", (width,))
    norm.normalized_shape = (width,)


def _narrow_embedding(table: nn.Embedding, width: int) -> None:
    _param(table, "weight", (table.num_embeddings, width))
    table.embedding_dim = width


def _zeros_like_bias(linear: nn.Linear, width: int) -> torch.Tensor:
    return torch.zeros(width, device=linear.weight.device, dtype=linear.weight.dtype)


def _shapes(config) -> tuple[list[dict], int | None]:
    layers = getattr(config, "prunekit_layers", None)
    if layers is not None and not isinstance(layers, list):
        raise ValueError("prunekit_layers in config.json must be a list with one entry per layer")
    return layers or [], getattr(config, "prunekit_hidden_size", None)


def _build_bert(model, config) -> None:
    """BERT and RoBERTa: allocate every layer at its pruned widths."""
    layers, narrowed = _shapes(config)
    base = model.base_model
    d = config.hidden_size
    h = narrowed or d
    d_h = d // config.num_attention_heads
    if h != d:
        emb = base.embeddings
        for table in (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings):
            _narrow_embedding(table, h)
        _narrow_norm(emb.LayerNorm, h)
        if getattr(base, "pooler", None) is not None:
            _narrow_in(base.pooler.dense, h)
        if hasattr(model, "qa_outputs"):
            _narrow_in(model.qa_outputs, h)
        classifier = getattr(model, "classifier", None)
        if classifier is not None and hasattr(classifier, "dense"):  # RoBERTa's classification head
            _narrow_in(classifier.dense, h)
    if layers and len(layers) != len(base.encoder.layer):
        raise ValueError(f"prunekit_layers lists {len(layers)} layers but the model has {len(base.encoder.layer)}")
    for block, shape in zip(base.encoder.layer, layers or [None] * len(base.encoder.layer), strict=True):
        heads = shape["num_heads"] if shape else config.num_attention_heads
        width = shape["intermediate_size"] if shape else config.intermediate_size
        attention = block.attention
        if shape and shape.get("attention_removed"):
            block.attention = RemovedBertAttention()
        elif heads == 0:
            norm = attention.output.LayerNorm
            _narrow_norm(norm, h)
            block.attention = EmptyBertAttention(_zeros_like_bias(attention.output.dense, h), norm)
        else:
            sa = attention.self
            sa.query, sa.key, sa.value = (_linear(sa.query, h, heads * d_h) for _ in range(3))
            sa.num_attention_heads, sa.all_head_size = heads, heads * d_h
            attention.output.dense = _linear(attention.output.dense, heads * d_h, h)
            _narrow_norm(attention.output.LayerNorm, h)
        if shape and shape.get("ffn_removed"):
            block.intermediate, block.output = EmptyBertIntermediate(), RemovedBertOutput()
        elif width == 0:
            norm = block.output.LayerNorm
            _narrow_norm(norm, h)
            block.output = EmptyBertOutput(_zeros_like_bias(block.output.dense, h), norm)
            block.intermediate = EmptyBertIntermediate()
        else:
            block.intermediate.dense = _linear(block.intermediate.dense, h, width)
            block.output.dense = _linear(block.output.dense, width, h)
            _narrow_norm(block.output.LayerNorm, h)


def _build_distilbert(model, config) -> None:
    """DistilBERT: allocate every layer at its pruned widths."""
    layers, narrowed = _shapes(config)
    base = model.base_model
    d = config.dim
    h = narrowed or d
    d_h = d // config.n_heads
    if h != d:
        emb = base.embeddings
        for table in (emb.word_embeddings, emb.position_embeddings):
            _narrow_embedding(table, h)
        _narrow_norm(emb.LayerNorm, h)
        for name in ("pre_classifier", "qa_outputs"):
            if hasattr(model, name):
                _narrow_in(getattr(model, name), h)
    blocks = base.transformer.layer
    if layers and len(layers) != len(blocks):
        raise ValueError(f"prunekit_layers lists {len(layers)} layers but the model has {len(blocks)}")
    for block, shape in zip(blocks, layers or [None] * len(blocks), strict=True):
        heads = shape["num_heads"] if shape else config.n_heads
        width = shape["intermediate_size"] if shape else config.hidden_dim
        sa = block.attention
        if shape and shape.get("attention_removed"):
            block.attention, block.sa_layer_norm = RemovedDistilBertAttention(), nn.Identity()
        else:
            if heads == 0:
                block.attention = EmptyDistilBertAttention(_zeros_like_bias(sa.out_lin, h))
            else:
                sa.q_lin, sa.k_lin, sa.v_lin = (_linear(sa.q_lin, h, heads * d_h) for _ in range(3))
                sa.out_lin = _linear(sa.out_lin, heads * d_h, h)
                sa.n_heads = heads
            _narrow_norm(block.sa_layer_norm, h)
        ffn = block.ffn
        if shape and shape.get("ffn_removed"):
            block.ffn, block.output_layer_norm = RemovedDistilBertFFN(), nn.Identity()
        else:
            if width == 0:
                block.ffn = EmptyDistilBertFFN(_zeros_like_bias(ffn.lin2, h))
            else:
                ffn.lin1 = _linear(ffn.lin1, h, width)
                ffn.lin2 = _linear(ffn.lin2, width, h)
            _narrow_norm(block.output_layer_norm, h)


def _pruned(base_class, config_class, build):
    def __init__(self, config, *args, **kwargs):
        base_class.__init__(self, config, *args, **kwargs)
        build(self, config)

    return type(f"Pruned{base_class.__name__}", (base_class,),
                {"__init__": __init__, "config_class": config_class, "__module__": __name__,
                 "__doc__": f"{base_class.__name__} at the widths prunekit pruned it to."})


PrunedBertForSequenceClassification = _pruned(BertForSequenceClassification, PrunekitBertConfig, _build_bert)
PrunedBertForQuestionAnswering = _pruned(BertForQuestionAnswering, PrunekitBertConfig, _build_bert)
PrunedBertModel = _pruned(BertModel, PrunekitBertConfig, _build_bert)
PrunedRobertaForSequenceClassification = _pruned(RobertaForSequenceClassification, PrunekitRobertaConfig,
                                                 _build_bert)
PrunedRobertaForQuestionAnswering = _pruned(RobertaForQuestionAnswering, PrunekitRobertaConfig, _build_bert)
PrunedRobertaModel = _pruned(RobertaModel, PrunekitRobertaConfig, _build_bert)
PrunedDistilBertForSequenceClassification = _pruned(DistilBertForSequenceClassification, PrunekitDistilBertConfig,
                                                    _build_distilbert)
PrunedDistilBertForQuestionAnswering = _pruned(DistilBertForQuestionAnswering, PrunekitDistilBertConfig,
                                               _build_distilbert)
PrunedDistilBertModel = _pruned(DistilBertModel, PrunekitDistilBertConfig, _build_distilbert)
