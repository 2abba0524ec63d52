"""GPT-2 pruned by prunekit: the modules in place of pruned sublayers and the builder of the
pruned classes (remote code, copied into every pruned GPT-2 folder).

``config.json`` maps the Auto classes to ``Pruned<Model>`` here (``auto_map``), so that in a
process without prunekit::

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

builds the pruned architecture from ``prunekit_layers`` (heads and FFN width per layer, removed
sublayers) and ``prunekit_hidden_size`` (the narrowed residual width) before the weights load.
The modules are GPT-2's own (``Conv1D``: ``c_attn`` (d, 3w) with q, k and v side by side,
``c_proj`` (w, d), ``c_fc`` (d, d_ff), ``mlp.c_proj`` (d_ff, d)), at the saved widths, so every
weight lands where it was. prunekit's adapter (``prunekit.families.gpt2``) imports the modules
below from here and ``import prunekit`` registers these same classes. It imports only torch,
transformers and ``configuration_prunekit``.

Per layer (pre-norm, X + f(LN(X))):

- a sublayer with zero heads (neurons) adds its output bias b: X + b; its LayerNorm is gone;
- a removed sublayer is the identity: X, its LayerNorm is gone too;
- an attention with zero heads, or removed, still tells the key/value cache how many tokens it
  has seen (one placeholder head of width 1), since the model reads that length from the cache.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .configuration_prunekit import (
    SkippedNorm,
    layer_shapes,
    model_class_named,
    narrow_embedding,
    narrow_input,
    narrow_norm,
    record_length,
    zero_bias,
)


# ---- the modules in place of pruned sublayers -----------------------------------------------------
class EmptyGPT2Attention(nn.Module):
    """An attention sublayer with every head removed: the block computes X + b_out (spec P4). The
    key/value cache still learns the sequence length (the model reads it from layer 0)."""

    def __init__(self, bias: torch.Tensor | None, layer_idx: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, cache=None, *args, **kwargs):
        if cache is not None:
            record_length(cache, hidden_states, self.layer_idx)
        if self.bias is None:
            return hidden_states.new_zeros(()), None  # X + 0 = X in the block's residual add
        return self.bias.expand_as(hidden_states), None


class RemovedGPT2Attention(EmptyGPT2Attention):
    """A removed attention sublayer (CoFi): no bias, out = X."""

    def __init__(self, layer_idx: int) -> None:
        super().__init__(None, layer_idx)


class EmptyGPT2MLP(nn.Module):
    """An FFN with no neurons: adds b_out (no matmul)."""

    def __init__(self, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return hidden_states.new_zeros(())
        return self.bias.expand_as(hidden_states)


class RemovedGPT2MLP(EmptyGPT2MLP):
    def __init__(self) -> None:
        super().__init__(None)


# ---- rebuilding a pruned model from its config (placeholders: the saved weights load over them) ----
def _conv(in_features: int, out_features: int) -> Conv1D:
    return Conv1D(out_features, in_features)


def build_gpt2(model: nn.Module, config) -> None:
    """Allocate every layer at its pruned widths, in GPT-2's own (Conv1D) modules."""
    base = model.base_model
    d_h = config.n_embd // config.n_head
    h = getattr(config, "prunekit_hidden_size", None) or config.n_embd
    if h != config.n_embd:
        for table in (base.wte, base.wpe):
            narrow_embedding(table, h)
        narrow_norm(base.ln_f, h)
        for name in ("lm_head", "score"):
            linear = getattr(model, name, None)
            if isinstance(linear, nn.Linear):
                narrow_input(linear, h)
    for index, (block, shape) in enumerate(zip(base.h, layer_shapes(config, len(base.h)), strict=True)):
        heads = shape["num_heads"] if shape else config.n_head
        width = shape["intermediate_size"] if shape else block.mlp.c_fc.nf
        if shape and shape.get("attention_removed"):
            block.attn, block.ln_1 = RemovedGPT2Attention(index), SkippedNorm()
        elif heads == 0:
            block.attn, block.ln_1 = EmptyGPT2Attention(zero_bias(block.attn.c_proj, h), index), SkippedNorm()
        else:
            attn = block.attn
            attn.c_attn, attn.c_proj = _conv(h, 3 * heads * d_h), _conv(heads * d_h, h)
            attn.split_size, attn.num_heads = heads * d_h, heads
            narrow_norm(block.ln_1, h)
        if shape and shape.get("ffn_removed"):
            block.mlp, block.ln_2 = RemovedGPT2MLP(), SkippedNorm()
        elif width == 0:
            block.mlp, block.ln_2 = EmptyGPT2MLP(zero_bias(block.mlp.c_proj, h)), SkippedNorm()
        else:
            block.mlp.c_fc, block.mlp.c_proj = _conv(h, width), _conv(width, h)
            narrow_norm(block.ln_2, h)


BUILDERS = {"gpt2": build_gpt2}


def __getattr__(name: str) -> type:
    # auto_map names PrunedGPT2LMHeadModel, PrunedGPT2Model, ...: made on first use.
    return model_class_named(name, __name__, BUILDERS)
