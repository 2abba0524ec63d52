"""OPT pruned by prunekit: the modules in place of pruned sublayers and the builder of the pruned
classes (remote code, copied into every pruned OPT folder).

``config.json`` maps the Auto classes to ``Pruned<Model>`` here (``auto_map``), so that in a
process without prunekit::

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

builds the pruned architecture from ``prunekit_layers`` (heads and FFN width per layer, removed
sublayers) and ``prunekit_hidden_size`` (the narrowed residual width) before the weights load,
with OPT's own module names, so every weight lands where it was. prunekit's adapter
(``prunekit.families.opt``) imports the modules below from here and ``import prunekit`` registers
these same classes. It imports only torch, transformers and ``configuration_prunekit``.

Per layer, pre-norm (``do_layer_norm_before``, X + f(LN(X))): a sublayer with zero heads
(neurons) adds its output bias b (X + b) and its LayerNorm is gone. Post-norm (LN(X + f(X)),
OPT-350m's placement): it computes LN(X + b), its LayerNorm kept. A removed sublayer is the
identity in both, its LayerNorm gone. An attention with zero heads, or removed, still tells the
key/value cache how many tokens it has seen (one placeholder head of width 1), since the model
reads that length from the cache. With ``project_in`` / ``project_out`` (word_embed_proj_dim !=
hidden_size) a narrowed residual stream narrows their rows / columns, not the token table.
"""

from __future__ import annotations

import torch
from torch import nn

from .configuration_prunekit import (
    SkippedNorm,
    added_bias,
    layer_shapes,
    linear_like,
    model_class_named,
    narrow_embedding,
    narrow_input,
    narrow_norm,
    new_param,
    record_length,
    zero_bias,
)


# ---- the modules in place of pruned sublayers -----------------------------------------------------
class EmptyOPTAttention(nn.Module):
    """An attention sublayer with every head removed: contributes b_out (or 0 without a bias)."""

    def __init__(self, bias: torch.Tensor | None, layer_idx: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, cache=None, **kwargs):
        if cache is not None:
            record_length(cache, hidden_states, self.layer_idx)
        if self.bias is None:
            return hidden_states.new_zeros(()), None  # X + 0 = X in the layer's residual add
        return self.bias.expand_as(hidden_states), None


class RemovedOPTAttention(EmptyOPTAttention):
    """A removed attention sublayer (CoFi): no bias, out = X, its LayerNorm skipped."""

    def __init__(self, layer_idx: int) -> None:
        super().__init__(None, layer_idx)


class EmptyFc1(nn.Module):
    """fc1 with no neurons: a zero-width view, so nothing is computed."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states[..., :0]


class EmptyFc2(nn.Module):
    """fc2 with no neurons: contributes b_out (or 0), whatever its zero-width input."""

    def __init__(self, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return hidden_states.new_zeros(())
        return self.bias.expand(*hidden_states.shape[:-1], self.bias.shape[0])


class RemovedFc2(EmptyFc2):
    def __init__(self) -> None:
        super().__init__(None)


# ---- rebuilding a pruned model from its config (placeholders: the saved weights load over them) ----
def _narrow_stream(model: nn.Module, decoder: nn.Module, h: int) -> None:
    """The residual stream at width h: the tables (or project_in's rows), the final norm, and what
    reads the stream (project_out's columns, or the head)."""
    narrow_embedding(decoder.embed_positions, h)
    if decoder.final_layer_norm is not None:
        narrow_norm(decoder.final_layer_norm, h)
    if decoder.project_in is not None:
        new_param(decoder.project_in, "weight", (h, decoder.project_in.in_features))
        decoder.project_in.out_features = h
        narrow_input(decoder.project_out, h)
        return
    narrow_embedding(decoder.embed_tokens, h)
    for name in ("lm_head", "score"):
        linear = getattr(model, name, None)
        if isinstance(linear, nn.Linear):
            narrow_input(linear, h)


def build_opt(model: nn.Module, config) -> None:
    """Allocate every layer at its pruned widths, in OPT's own modules."""
    decoder = model.base_model.decoder
    d_h = config.hidden_size // config.num_attention_heads
    h = getattr(config, "prunekit_hidden_size", None) or config.hidden_size
    pre = config.do_layer_norm_before
    if h != config.hidden_size:
        _narrow_stream(model, decoder, h)
    for index, (block, shape) in enumerate(zip(decoder.layers, layer_shapes(config, len(decoder.layers)),
                                               strict=True)):
        heads = shape["num_heads"] if shape else config.num_attention_heads
        width = shape["intermediate_size"] if shape else config.ffn_dim
        sa = block.self_attn
        if shape and shape.get("attention_removed"):
            block.self_attn, block.self_attn_layer_norm = RemovedOPTAttention(index), SkippedNorm()
        elif heads == 0:
            block.self_attn = EmptyOPTAttention(zero_bias(sa.out_proj, h, added_bias(shape, "attention")), index)
            if pre:
                block.self_attn_layer_norm = SkippedNorm()
            else:
                narrow_norm(block.self_attn_layer_norm, h)
        else:
            sa.q_proj, sa.k_proj, sa.v_proj = (linear_like(sa.q_proj, h, heads * d_h) for _ in range(3))
            sa.out_proj = linear_like(sa.out_proj, heads * d_h, h, added_bias(shape, "attention"))
            sa.num_heads = heads
            narrow_norm(block.self_attn_layer_norm, h)
        if shape and shape.get("ffn_removed"):
            block.fc1, block.fc2, block.final_layer_norm = EmptyFc1(), RemovedFc2(), SkippedNorm()
        elif width == 0:
            block.fc1, block.fc2 = EmptyFc1(), EmptyFc2(zero_bias(block.fc2, h, added_bias(shape, "ffn")))
            if pre:
                block.final_layer_norm = SkippedNorm()
            else:
                narrow_norm(block.final_layer_norm, h)
        else:
            block.fc1, block.fc2 = linear_like(block.fc1, h, width), linear_like(block.fc2, width, h, added_bias(shape, "ffn"))
            narrow_norm(block.final_layer_norm, h)


BUILDERS = {"opt": build_opt}


def __getattr__(name: str) -> type:
    # auto_map names PrunedOPTForCausalLM, PrunedOPTModel, ...: made on first use.
    return model_class_named(name, __name__, BUILDERS)
