"""Decoders of the Llama layout pruned by prunekit (Llama, Mistral, Qwen2, Qwen3), rebuilt by
plain transformers without prunekit (remote code), and the modules prunekit itself puts in place
of pruned attention and FFN sublayers (``prunekit.families.decoder`` imports them from here, and
``import prunekit`` registers these same classes, so a folder's weights land in the same modules on
every path).

This file is copied into every folder prunekit writes for these families, and ``config.json``
maps the Auto classes to names in it (``auto_map``), so that in a process without prunekit::

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

builds the pruned architecture from ``prunekit_layers`` (query heads, key/value heads and which
key/value head each query head reads, FFN width per layer, removed sublayers) and
``prunekit_hidden_size`` before the weights load. It imports only torch, transformers and
``configuration_prunekit``.

The classes are made on first use from the family's own transformers classes by the factory
in ``configuration_prunekit`` (module-level ``__getattr__``): ``PrunedLlamaForCausalLM`` is
``LlamaForCausalLM`` at the pruned widths and ``PrunekitLlamaConfig`` is ``LlamaConfig`` plus the
per-layer widths, and so for every family in ``BUILDERS`` (the Llama layout)::

    model.layers[l].input_layernorm            RMSNorm(X), the attention's input
    model.layers[l].self_attn.{q,k,v,o}_proj   (Qwen3: also q_norm, k_norm over d_h, per head)
    model.layers[l].post_attention_layernorm   RMSNorm(Y), the FFN's input
    model.layers[l].mlp.{gate,up,down}_proj

An ``attention_out_bias`` / ``ffn_out_bias`` entry gives o_proj / down_proj (or the emptied
sublayer) an output bias the family lacks (FLAP's bias compensation). A sublayer emptied (zero heads or neurons) computes X + b_out (X without an output bias) and a
removed one X; either way its norm is skipped. An emptied or removed attention still records a
one-number placeholder per token in the key/value cache, because transformers reads the number of
cached tokens from the cache (layer 0's, for positions and masks): without it, generation with the
cache would restart positions when layer 0's attention is gone.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

from .configuration_prunekit import (
    SkippedNorm,
    added_bias,
    layer_shapes,
    linear_like,
    model_class_named,
    narrow_embedding,
    narrow_norm,
    record_length,
    zero_bias,
)


# ---- the modules in place of pruned sublayers -----------------------------------------------------
class MappedKvAttention(nn.Module):
    """The family's attention with query head h reading key/value head ``kv_map[h]``, for groups
    of unequal sizes (or out of order); otherwise the same computation (rotary, per-head q/k norms
    where the family has them, sliding window, cache, attention kernels)."""

    def __init__(self, source: nn.Module, kv_map: tuple[int, ...]) -> None:
        super().__init__()
        self.config, self.layer_idx = source.config, source.layer_idx
        self.head_dim, self.scaling = source.head_dim, source.scaling
        self.attention_dropout, self.is_causal = source.attention_dropout, source.is_causal
        self.layer_type = getattr(source, "layer_type", None)
        # Qwen2/3 keep it per layer, Mistral reads it from the config in its forward, Llama has none.
        self.sliding_window = getattr(source, "sliding_window", getattr(source.config, "sliding_window", None))
        self.num_key_value_groups = 1  # the gather below gives every query head its own k/v
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = source.q_proj, source.k_proj, source.v_proj, source.o_proj
        for name in ("q_norm", "k_norm"):  # Qwen3: one RMSNorm over d_h shared by all heads
            if hasattr(source, name):
                setattr(self, name, getattr(source, name))
        # A plain tuple, not a buffer: from_pretrained builds modules on the meta device and would
        # leave a non-persistent buffer there; the index is made on the keys' device per call.
        self.kv_map = tuple(int(k) for k in kv_map)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape)  # (B, T, H, d_h)
        key = self.k_proj(hidden_states).view(hidden_shape)  # (B, T, H_kv, d_h)
        if hasattr(self, "q_norm"):
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:  # the cache holds the H_kv heads; the gather happens after it
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        index = torch.as_tensor(self.kv_map, dtype=torch.long, device=key.device)
        key, value = key.index_select(1, index), value.index_select(1, index)  # (B, H, S, d_h)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        output, weights = attention(self, query, key, value, attention_mask,
                                    dropout=0.0 if not self.training else self.attention_dropout,
                                    scaling=self.scaling, sliding_window=self.sliding_window, **kwargs)
        return self.o_proj(output.reshape(*input_shape, -1).contiguous()), weights


class EmptySublayer(nn.Module):
    """A sublayer with every unit removed: adds its output bias (or nothing) to X, exactly."""

    def __init__(self, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.bias is not None:
            return self.bias.expand_as(hidden_states)
        return hidden_states.new_zeros(())  # broadcasts in the layer's residual add: X + 0 = X


class EmptyAttention(EmptySublayer):
    """An attention sublayer with no heads left: X + b_out, and a placeholder in the cache."""

    def __init__(self, bias: torch.Tensor | None, layer_idx: int) -> None:
        super().__init__(bias)
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, cache=None, **kwargs):
        if cache is not None:  # one number per token: the cache counts tokens from its layers' keys
            record_length(cache, hidden_states, self.layer_idx)
        return super().forward(hidden_states), None  # (output, no attention weights)


class RemovedAttention(EmptyAttention):
    """A removed attention sublayer: no bias, out = X."""

    def __init__(self, layer_idx: int) -> None:
        super().__init__(None, layer_idx)


class RemovedMLP(EmptySublayer):
    def __init__(self) -> None:
        super().__init__(None)


# ---- putting narrower sublayers in place (shared with prunekit's adapter) --------------------------
def contiguous_groups(num_heads: int, num_kv_heads: int, kv_map: tuple[int, ...]) -> bool:
    """Whether the query heads form equal contiguous groups in order, as ``repeat_kv`` builds them."""
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        return False
    size = num_heads // num_kv_heads
    return tuple(kv_map) == tuple(h // size for h in range(num_heads))


def install_attention(block: nn.Module, q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear,
                      kv_map: tuple[int, ...]) -> None:
    """Give ``block``'s attention these linears; even groups keep the family's own attention (only
    its per-layer ``num_key_value_groups`` changes), any other grouping becomes MappedKvAttention."""
    sa = block.self_attn
    if isinstance(sa, EmptySublayer):
        raise ValueError("the attention has no heads left (or was removed); it cannot be given heads")
    num_heads, num_kv = q.out_features // sa.head_dim, k.out_features // sa.head_dim
    sa.q_proj, sa.k_proj, sa.v_proj, sa.o_proj = q, k, v, o
    if contiguous_groups(num_heads, num_kv, kv_map) and not isinstance(sa, MappedKvAttention):
        sa.num_key_value_groups = num_heads // num_kv  # what repeat_kv / SDPA's enable_gqa read
    elif isinstance(sa, MappedKvAttention):
        sa.kv_map = tuple(int(h) for h in kv_map)
    else:
        block.self_attn = MappedKvAttention(sa, tuple(kv_map))


def empty_attention(block: nn.Module, bias: torch.Tensor | None) -> None:
    block.self_attn, block.input_layernorm = EmptyAttention(bias, block.self_attn.layer_idx), SkippedNorm()


def remove_attention(block: nn.Module) -> None:
    block.self_attn, block.input_layernorm = RemovedAttention(block.self_attn.layer_idx), SkippedNorm()


def install_mlp(block: nn.Module, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> None:
    mlp = block.mlp
    if isinstance(mlp, EmptySublayer):
        raise ValueError("the FFN has no neurons left (or was removed); it cannot be given neurons")
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = gate, up, down
    mlp.intermediate_size = down.in_features


def empty_mlp(block: nn.Module, bias: torch.Tensor | None) -> None:
    block.mlp, block.post_attention_layernorm = EmptySublayer(bias), SkippedNorm()


def remove_mlp(block: nn.Module) -> None:
    block.mlp, block.post_attention_layernorm = RemovedMLP(), SkippedNorm()


# ---- rebuilding a pruned model from its config (placeholders: the saved weights load over them) ----
def _narrow_hidden(base: nn.Module, width: int) -> None:
    """The residual stream at ``width`` dimensions everywhere the base model reads or writes it."""
    narrow_embedding(base.embed_tokens, width)
    for norm in [base.norm, *(n for b in base.layers for n in (b.input_layernorm, b.post_attention_layernorm))]:
        narrow_norm(norm, width)
    for block in base.layers:
        sa, mlp = block.self_attn, block.mlp
        for parent, name, is_input in ((sa, "q_proj", 1), (sa, "k_proj", 1), (sa, "v_proj", 1), (sa, "o_proj", 0),
                                       (mlp, "gate_proj", 1), (mlp, "up_proj", 1), (mlp, "down_proj", 0)):
            old = getattr(parent, name)
            setattr(parent, name, linear_like(old, width, old.out_features) if is_input else
                    linear_like(old, old.in_features, width))


def _narrow_heads(model: nn.Module, width: int) -> None:
    """The task head's input at ``width``; a tied output head shares the embedding table."""
    embed = model.base_model.embed_tokens
    for name in ("lm_head", "score"):
        head = getattr(model, name, None)
        if not isinstance(head, nn.Linear) or head.in_features == width:
            continue
        if name == "lm_head" and getattr(model.config, "tie_word_embeddings", False):
            head.weight, head.in_features = embed.weight, width
        else:
            setattr(model, name, linear_like(head, width, head.out_features))


def build_pruned(model: nn.Module, config) -> None:
    """Allocate every layer of ``model`` (built at the config's full widths) at its pruned widths.
    A base model built already (the generic task heads build theirs through AutoModel, whose
    pruned class the factory registers) is left as it is; only the head then follows."""
    width = getattr(config, "prunekit_hidden_size", None)
    if not getattr(model.base_model, "_prunekit_built", False):
        _build_base(model.base_model, config)
    if width is not None:
        _narrow_heads(model, width)


def _build_base(base: nn.Module, config) -> None:
    blocks = base.layers
    shapes = layer_shapes(config, len(blocks))
    width = getattr(config, "prunekit_hidden_size", None)
    if width is not None and width != config.hidden_size:
        _narrow_hidden(base, width)
    for block, shape in zip(blocks, shapes, strict=True):
        if shape is None:  # no prunekit_layers: every layer at the config's widths
            continue
        sa, mlp = block.self_attn, block.mlp
        d, d_h = sa.q_proj.in_features, sa.head_dim
        if shape.get("attention_removed"):
            remove_attention(block)
        elif shape["num_heads"] == 0:
            empty_attention(block, zero_bias(sa.o_proj, d, added_bias(shape, "attention")))
        else:
            heads, kv_heads = shape["num_heads"], shape.get("num_kv_heads", shape["num_heads"])
            kv_map = tuple(shape.get("kv_map") or range(heads))
            install_attention(block, linear_like(sa.q_proj, d, heads * d_h), linear_like(sa.k_proj, d, kv_heads * d_h),
                              linear_like(sa.v_proj, d, kv_heads * d_h), linear_like(sa.o_proj, heads * d_h, d, added_bias(shape, "attention")),
                              kv_map)
        n = shape["intermediate_size"]
        if shape.get("ffn_removed"):
            remove_mlp(block)
        elif n == 0:
            empty_mlp(block, zero_bias(mlp.down_proj, d, added_bias(shape, "ffn")))
        else:
            install_mlp(block, linear_like(mlp.gate_proj, d, n), linear_like(mlp.up_proj, d, n),
                        linear_like(mlp.down_proj, n, d, added_bias(shape, "ffn")))
    base._prunekit_built = True


BUILDERS = {family: build_pruned for family in ("llama", "mistral", "qwen2", "qwen3")}


def __getattr__(name: str) -> type:
    # auto_map names PrunedLlamaForCausalLM, PrunedQwen3Model, ...: made on first use.
    return model_class_named(name, __name__, BUILDERS)
