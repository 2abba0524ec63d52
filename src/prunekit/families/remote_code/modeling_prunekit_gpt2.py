"""GPT-2 models pruned by prunekit, rebuilt by plain transformers without prunekit (remote code).

Copied into every pruned GPT-2 folder; ``config.json`` maps the Auto classes to the classes here
(``auto_map``), so that in a process without prunekit::

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

builds the pruned architecture from ``prunekit_layers`` (heads and FFN width per layer, removed
sublayers) and ``prunekit_hidden_size`` (the narrowed residual width) before the weights load.
The modules are GPT-2's own (``Conv1D``: ``c_attn`` (d, 3w) with q, k and v side by side,
``c_proj`` (w, d), ``c_fc`` (d, d_ff), ``mlp.c_proj`` (d_ff, d)), at the saved widths, so every
weight lands where it was. It must not import prunekit; with prunekit installed, ``import
prunekit`` (no remote code runs then) and ``prunekit.load_pruned(folder)`` are preferred.

Per layer (pre-norm, X + f(LN(X))):

- a sublayer with zero heads (neurons) adds its output bias b: X + b; its LayerNorm is gone;
- a removed sublayer is the identity: X, its LayerNorm is gone too;
- an attention with zero heads, or removed, still tells the key/value cache how many tokens it
  has seen (one placeholder head of width 1), since the model reads that length from the cache.
"""

import torch
from torch import nn
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel, GPT2Model
from transformers.pytorch_utils import Conv1D

from .configuration_prunekit_gpt2 import PrunekitGPT2Config


# ---- the modules prunekit puts in place of pruned sublayers ----------------------------------------
def _record_length(cache, hidden_states, layer_idx):
    placeholder = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
    cache.update(placeholder, placeholder, layer_idx)


class EmptyGPT2Attention(nn.Module):
    def __init__(self, width: int, layer_idx: int, removed: bool = False) -> None:
        super().__init__()
        self.bias = None if removed else nn.Parameter(torch.zeros(width))
        self.layer_idx = layer_idx

    def forward(self, hidden_states, cache=None, *args, **kwargs):
        if cache is not None:
            _record_length(cache, hidden_states, self.layer_idx)
        if self.bias is None:
            return hidden_states.new_zeros(()), None
        return self.bias.expand_as(hidden_states), None


class EmptyGPT2MLP(nn.Module):
    def __init__(self, width: int, removed: bool = False) -> None:
        super().__init__()
        self.bias = None if removed else nn.Parameter(torch.zeros(width))

    def forward(self, hidden_states):
        if self.bias is None:
            return hidden_states.new_zeros(())
        return self.bias.expand_as(hidden_states)


# ---- reshaping (placeholders: the saved weights are loaded over them) ------------------------------
def _param(module: nn.Module, name: str, shape: tuple) -> None:
    old = getattr(module, name, None)
    if old is not None:
        setattr(module, name, nn.Parameter(torch.empty(shape, device=old.device, dtype=old.dtype)))


def _conv(in_features: int, out_features: int) -> Conv1D:
    return Conv1D(out_features, in_features)


def _narrow_norm(norm: nn.LayerNorm, width: int) -> None:
    _param(norm, "weight", (width,))
    _param(norm, "bias", (width,))
    norm.normalized_shape = (width,)


def _build(model, config) -> None:
    layers = getattr(config, "prunekit_layers", None) or []
    if not isinstance(layers, list):
        raise ValueError("prunekit_layers in config.json must be a list with one entry per layer")
    base = model.base_model
    d_h = config.n_embd // config.n_head
    h = getattr(config, "prunekit_hidden_size", None) or config.n_embd
    if h != config.n_embd:
        for table in (base.wte, base.wpe):
            _param(table, "weight", (table.num_embeddings, h))
            table.embedding_dim = h
        _narrow_norm(base.ln_f, h)
        for name in ("lm_head", "score"):
            linear = getattr(model, name, None)
            if isinstance(linear, nn.Linear):
                _param(linear, "weight", (linear.out_features, h))
                linear.in_features = h
    if layers and len(layers) != len(base.h):
        raise ValueError(f"prunekit_layers lists {len(layers)} layers but the model has {len(base.h)}")
    for index, (block, shape) in enumerate(zip(base.h, layers or [None] * len(base.h), strict=True)):
        heads = shape["num_heads"] if shape else config.n_head
        width = shape["intermediate_size"] if shape else block.mlp.c_fc.nf
        if shape and shape.get("attention_removed"):
            block.attn, block.ln_1 = EmptyGPT2Attention(h, index, removed=True), nn.Identity()
        elif heads == 0:
            block.attn, block.ln_1 = EmptyGPT2Attention(h, index), nn.Identity()
        else:
            attn = block.attn
            attn.c_attn, attn.c_proj = _conv(h, 3 * heads * d_h), _conv(heads * d_h, h)
            attn.split_size, attn.num_heads = heads * d_h, heads
            _narrow_norm(block.ln_1, h)
        if shape and shape.get("ffn_removed"):
            block.mlp, block.ln_2 = EmptyGPT2MLP(h, removed=True), nn.Identity()
        elif width == 0:
            block.mlp, block.ln_2 = EmptyGPT2MLP(h), nn.Identity()
        else:
            block.mlp.c_fc, block.mlp.c_proj = _conv(h, width), _conv(width, h)
            _narrow_norm(block.ln_2, h)


def _pruned(base_class):
    def __init__(self, config, *args, **kwargs):
        base_class.__init__(self, config, *args, **kwargs)
        _build(self, config)

    return type(f"Pruned{base_class.__name__}", (base_class,),
                {"__init__": __init__, "config_class": PrunekitGPT2Config, "__module__": __name__,
                 "__doc__": f"{base_class.__name__} at the widths prunekit pruned it to."})


PrunedGPT2LMHeadModel = _pruned(GPT2LMHeadModel)
PrunedGPT2ForSequenceClassification = _pruned(GPT2ForSequenceClassification)
PrunedGPT2Model = _pruned(GPT2Model)
