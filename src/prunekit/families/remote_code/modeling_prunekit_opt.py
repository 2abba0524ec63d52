"""OPT models pruned by prunekit, rebuilt by plain transformers without prunekit (remote code).

Copied into every pruned OPT folder; ``config.json`` maps the Auto classes to the classes here
(``auto_map``), so that in a process without prunekit::

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

builds the pruned architecture from ``prunekit_layers`` (heads and FFN width per layer, removed
sublayers) and ``prunekit_hidden_size`` (the narrowed residual width) before the weights load,
with OPT's own module names, so every weight lands where it was. It must not import prunekit;
with prunekit installed, ``import prunekit`` (no remote code runs then) and
``prunekit.load_pruned(folder)`` are preferred.

Per layer, pre-norm (``do_layer_norm_before``, X + f(LN(X))): a sublayer with zero heads
(neurons) adds its output bias b (X + b) and its LayerNorm is gone. Post-norm (LN(X + f(X)),
OPT-350m's placement): it computes LN(X + b), its LayerNorm kept. A removed sublayer is the
identity in both, its LayerNorm gone. An attention with zero heads, or removed, still tells the
key/value cache how many tokens it has seen (one placeholder head of width 1), since the model
reads that length from the cache. With ``project_in`` / ``project_out`` (word_embed_proj_dim !=
hidden_size) a narrowed residual stream narrows their rows / columns, not the token table.
"""

import torch
from torch import nn
from transformers import OPTForCausalLM, OPTForSequenceClassification, OPTModel

from .configuration_prunekit_opt import PrunekitOPTConfig


# ---- the modules prunekit puts in place of pruned sublayers ----------------------------------------
def _record_length(cache, hidden_states, layer_idx):
    placeholder = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
    cache.update(placeholder, placeholder, layer_idx)


class EmptyOPTAttention(nn.Module):
    def __init__(self, width: int | None, layer_idx: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(width)) if width else None  # None: removed, or no biases
        self.layer_idx = layer_idx

    def forward(self, hidden_states, *args, cache=None, **kwargs):
        if cache is not None:
            _record_length(cache, hidden_states, self.layer_idx)
        if self.bias is None:
            return hidden_states.new_zeros(()), None
        return self.bias.expand_as(hidden_states), None


class EmptyFc1(nn.Module):
    def forward(self, hidden_states):
        return hidden_states[..., :0]


class EmptyFc2(nn.Module):
    def __init__(self, width: int | None) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(width)) if width else None  # None: removed, or no biases

    def forward(self, hidden_states):
        if self.bias is None:
            return hidden_states.new_zeros(())
        return self.bias.expand(*hidden_states.shape[:-1], self.bias.shape[0])


# ---- reshaping (placeholders: the saved weights are loaded over them) ------------------------------
def _param(module: nn.Module, name: str, shape: tuple) -> None:
    old = getattr(module, name, None)
    if old is not None:
        setattr(module, name, nn.Parameter(torch.empty(shape, device=old.device, dtype=old.dtype)))


def _linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias)


def _narrow_norm(norm, width: int) -> None:
    if norm is None:
        return
    _param(norm, "weight", (width,))
    _param(norm, "bias", (width,))
    norm.normalized_shape = (width,)


def _narrow_stream(model, decoder, h: int) -> None:
    """The residual stream at width h: the tables (or project_in's rows), the final norm, and what
    reads the stream (project_out's columns, or the head)."""
    positions = decoder.embed_positions
    _param(positions, "weight", (positions.num_embeddings, h))
    positions.embedding_dim = h
    _narrow_norm(decoder.final_layer_norm, h)
    if decoder.project_in is not None:
        _param(decoder.project_in, "weight", (h, decoder.project_in.in_features))
        decoder.project_in.out_features = h
        _param(decoder.project_out, "weight", (decoder.project_out.out_features, h))
        decoder.project_out.in_features = h
        return
    tokens = decoder.embed_tokens
    _param(tokens, "weight", (tokens.num_embeddings, h))
    tokens.embedding_dim = h
    for name in ("lm_head", "score"):
        linear = getattr(model, name, None)
        if isinstance(linear, nn.Linear):
            _param(linear, "weight", (linear.out_features, h))
            linear.in_features = h


def _build(model, config) -> None:
    layers = getattr(config, "prunekit_layers", None) or []
    if not isinstance(layers, list):
        raise ValueError("prunekit_layers in config.json must be a list with one entry per layer")
    decoder = model.base_model.decoder
    d_h = config.hidden_size // config.num_attention_heads
    h = getattr(config, "prunekit_hidden_size", None) or config.hidden_size
    bias, pre = config.enable_bias, config.do_layer_norm_before
    if h != config.hidden_size:
        _narrow_stream(model, decoder, h)
    if layers and len(layers) != len(decoder.layers):
        raise ValueError(f"prunekit_layers lists {len(layers)} layers but the model has {len(decoder.layers)}")
    for index, (block, shape) in enumerate(zip(decoder.layers, layers or [None] * len(decoder.layers), strict=True)):
        heads = shape["num_heads"] if shape else config.num_attention_heads
        width = shape["intermediate_size"] if shape else config.ffn_dim
        if shape and shape.get("attention_removed"):
            block.self_attn, block.self_attn_layer_norm = EmptyOPTAttention(None, index), nn.Identity()
        elif heads == 0:
            block.self_attn = EmptyOPTAttention(h if bias else None, index)
            if pre:
                block.self_attn_layer_norm = nn.Identity()
            else:
                _narrow_norm(block.self_attn_layer_norm, h)
        else:
            sa = block.self_attn
            sa.q_proj, sa.k_proj, sa.v_proj = (_linear(h, heads * d_h, bias) for _ in range(3))
            sa.out_proj = _linear(heads * d_h, h, bias)
            sa.num_heads = heads
            _narrow_norm(block.self_attn_layer_norm, h)
        if shape and shape.get("ffn_removed"):
            block.fc1, block.fc2, block.final_layer_norm = EmptyFc1(), EmptyFc2(None), nn.Identity()
        elif width == 0:
            block.fc1, block.fc2 = EmptyFc1(), EmptyFc2(h if bias else None)
            if pre:
                block.final_layer_norm = nn.Identity()
            else:
                _narrow_norm(block.final_layer_norm, h)
        else:
            block.fc1, block.fc2 = _linear(h, width, bias), _linear(width, h, bias)
            _narrow_norm(block.final_layer_norm, h)


def _pruned(base_class):
    def __init__(self, config, *args, **kwargs):
        base_class.__init__(self, config, *args, **kwargs)
        _build(self, config)

    return type(f"Pruned{base_class.__name__}", (base_class,),
                {"__init__": __init__, "config_class": PrunekitOPTConfig, "__module__": __name__,
                 "__doc__": f"{base_class.__name__} at the widths prunekit pruned it to."})


PrunedOPTForCausalLM = _pruned(OPTForCausalLM)
PrunedOPTForSequenceClassification = _pruned(OPTForSequenceClassification)
PrunedOPTModel = _pruned(OPTModel)
