"""A TEST-ONLY model adapter for Hugging Face Llama (transformers v5), registered by the tests that
use it (``registered``), never by prunekit itself: the family that checks the model view states
everything the core must not assume. Llama blocks are pre-norm (X + f(RMSNorm(X))), RMSNorm
everywhere, no biases by default (``attention_bias`` / ``mlp_bias`` turn them on), a gated FFN
(down(act(gate(x)) * up(x))), grouped key/value heads (``num_key_value_heads``), a head size of its
own (``head_dim``), no embedding norm, a final norm, and an output head that may be tied to the
input embeddings.

Layout per layer (``model.model.layers[l]``, ``LlamaDecoderLayer``)::

    input_layernorm                    RMSNorm(X), the attention's input
    self_attn.{q,k,v}_proj             d -> H*d_h (q), d -> H_kv*d_h (k, v)
    self_attn.o_proj                   H*d_h -> d; the layer adds X
    post_attention_layernorm           RMSNorm(Y), the FFN's input
    mlp.{gate,up}_proj, mlp.down_proj  d -> d_ff, d_ff -> d; the layer adds Y

What the v5 modules read: ``LlamaAttention`` views q/k/v with ``(..., -1, self.head_dim)`` (so the
head counts follow the weights) and hands ``self.num_key_value_groups`` to the attention function,
which repeats each key/value head that many times (``repeat_kv``); nothing reads
``config.num_attention_heads`` or ``config.num_key_value_heads`` per layer. So a layer whose
groups all keep the same number of query heads, in order, needs only its ``num_key_value_groups``
set; any other grouping (query heads removed unevenly inside groups) gets :class:`MappedKvAttention`,
which gathers each query head's key/value head by index. ``LlamaMLP`` takes its width from the weights.

A sublayer emptied or removed takes its norm with it (a pre-norm sublayer's norm only feeds it):
the layer then computes X + b_out (no bias: X + 0 = X) or X, what the masked model computes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel
from transformers.models.llama.modeling_llama import (
    ALL_ATTENTION_FUNCTIONS,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from prunekit.adapters import ADAPTERS, AttentionParts, BlockFacts, FfnParts, ModelAdapter, SublayerKind
from prunekit.adapters.base import removed_error


class MappedKvAttention(nn.Module):
    """Llama attention whose query head h reads key/value head ``kv_index[h]``, for groups of
    unequal sizes; the same computation as ``LlamaAttention`` otherwise (rotary, cache, kernels)."""

    def __init__(self, source: nn.Module, kv_map: tuple[int, ...]) -> None:
        super().__init__()
        self.config, self.layer_idx = source.config, source.layer_idx
        self.head_dim, self.scaling = source.head_dim, source.scaling
        self.attention_dropout, self.is_causal = source.attention_dropout, source.is_causal
        self.num_key_value_groups = 1  # the gather below gives every query head its own k/v
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = source.q_proj, source.k_proj, source.v_proj, source.o_proj
        # A plain tuple, not a buffer: from_pretrained builds modules on the meta device and would
        # leave a non-persistent buffer there; the index is made on the keys' device per call.
        self.kv_map = tuple(int(k) for k in kv_map)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H, T, d_h)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H_kv, T, d_h)
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
                                    scaling=self.scaling, **kwargs)
        return self.o_proj(output.reshape(*input_shape, -1).contiguous()), weights


class EmptyLlamaSublayer(nn.Module):
    """A sublayer with every unit removed: adds its output bias (or nothing) to X, exactly."""

    def __init__(self, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.bias is not None:
            out = self.bias.expand_as(hidden_states)
        else:
            out = hidden_states.new_zeros(())  # broadcasts in the layer's residual add: X + 0 = X
        return out


class EmptyLlamaAttention(EmptyLlamaSublayer):
    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return super().forward(hidden_states), None  # (output, no attention weights)


class RemovedLlamaAttention(EmptyLlamaAttention):
    """A removed attention sublayer: no bias, out = X."""

    def __init__(self) -> None:
        super().__init__(None)


class RemovedLlamaMLP(EmptyLlamaSublayer):
    def __init__(self) -> None:
        super().__init__(None)


class SkippedNorm(nn.Module):
    """Where an emptied or removed sublayer's norm was: nothing reads its output but the sublayer,
    which ignores it."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states


class LlamaTestAdapter(ModelAdapter):
    family = "llama"
    model_types = ("llama",)
    model_classes = {
        "causal_lm": LlamaForCausalLM,
        "sequence_classification": LlamaForSequenceClassification,
        "base": LlamaModel,
    }
    grouped_kv = True
    pooled_token = "last"  # LlamaForSequenceClassification pools the last non-padding token

    @property
    def facts(self) -> BlockFacts:
        biases = set()
        if self.config.attention_bias:
            biases |= {"query", "key", "value", "out"}
        if self.config.mlp_bias:
            biases |= {"up", "gate", "down"}
        return BlockFacts("pre", "rmsnorm", frozenset(biases), gated_ffn=True)

    @property
    def full_hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads

    @property
    def full_num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def full_num_kv_heads(self) -> int:
        return self.config.num_key_value_heads

    @property
    def full_intermediate_size(self) -> int:
        return self.config.intermediate_size

    @property
    def tied_embeddings(self) -> bool:
        head = getattr(self.model, "lm_head", None)
        return head is not None and head.weight is self._embedding_tables()[0].weight

    def norm_eps(self, norm: nn.Module) -> float:
        return norm.variance_epsilon

    def layers(self) -> nn.ModuleList:
        return self.model.base_model.layers

    def attention(self, layer: int) -> AttentionParts | None:
        sa = self.layers()[layer].self_attn
        if isinstance(sa, EmptyLlamaSublayer):
            return None
        d_h = sa.head_dim
        num_heads, num_kv = sa.q_proj.out_features // d_h, sa.k_proj.out_features // d_h
        kv_map = sa.kv_map if isinstance(sa, MappedKvAttention) else None
        return AttentionParts(query=sa.q_proj, key=sa.k_proj, value=sa.v_proj, out=sa.o_proj,
                              num_heads=num_heads, head_dim=d_h, num_kv_heads=num_kv, kv_map=kv_map)

    def ffn(self, layer: int) -> FfnParts | None:
        mlp = self.layers()[layer].mlp
        if isinstance(mlp, EmptyLlamaSublayer):
            return None
        return FfnParts(up=mlp.up_proj, down=mlp.down_proj, gate=mlp.gate_proj)

    def is_removed(self, layer: int, kind: SublayerKind) -> bool:
        block = self.layers()[layer]
        return isinstance(block.self_attn, RemovedLlamaAttention) if kind == "attn" else isinstance(block.mlp, RemovedLlamaMLP)

    def embedding_layer_norm(self) -> None:
        return None

    def final_norm(self) -> nn.Module:
        return self.model.base_model.norm

    def sublayer_layer_norm(self, layer: int, kind: SublayerKind) -> nn.Module:
        if self.is_removed(layer, kind):
            raise removed_error(layer, kind, "norm")
        if (self.attention(layer) if kind == "attn" else self.ffn(layer)) is None:
            raise ValueError(f"layer {layer}: an emptied pre-norm sublayer has no norm")
        block = self.layers()[layer]
        return block.input_layernorm if kind == "attn" else block.post_attention_layernorm

    def _embedding_tables(self) -> list[nn.Embedding]:
        return [self.model.base_model.embed_tokens]

    def _head_input_linears(self) -> list[nn.Linear]:
        for name in ("lm_head", "score"):
            if isinstance(getattr(self.model, name, None), nn.Linear):
                return [getattr(self.model, name)]
        return []

    def call_layer(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]  # (1, T)
        cos_sin = self.model.base_model.rotary_emb(hidden, position_ids=positions)
        return block(hidden, position_embeddings=cos_sin, position_ids=positions)  # causal, unpadded

    def sublayer_module(self, layer: int, kind: SublayerKind) -> nn.Module:
        # The layer calls input_layernorm(X) and post_attention_layernorm(Y) positionally: their
        # inputs are the sublayers' residual inputs.
        block = self.layers()[layer]
        return block.input_layernorm if kind == "attn" else block.post_attention_layernorm

    def _empty_module(self, layer: int, kind: SublayerKind) -> nn.Module:
        block = self.layers()[layer]
        return block.self_attn if kind == "attn" else block.mlp

    def set_attention(self, layer: int, parts: AttentionParts) -> None:
        block = self.layers()[layer]
        if isinstance(block.self_attn, EmptyLlamaSublayer):
            raise ValueError(f"layer {layer}: the attention has no heads left (or was removed); it cannot be given heads")
        sa = block.self_attn
        size = parts.num_heads // parts.num_kv_heads
        contiguous = parts.num_heads % parts.num_kv_heads == 0 and parts.kv_map == tuple(
            h // size for h in range(parts.num_heads))
        sa.q_proj, sa.k_proj, sa.v_proj, sa.o_proj = parts.query, parts.key, parts.value, parts.out
        if contiguous and not isinstance(sa, MappedKvAttention):
            sa.num_key_value_groups = size  # what repeat_kv / SDPA's enable_gqa read
        else:
            block.self_attn = MappedKvAttention(sa, parts.kv_map)

    def set_empty_attention(self, layer: int, bias: torch.Tensor | None) -> None:
        if self.is_removed(layer, "attn"):
            raise removed_error(layer, "attn", "heads to empty")
        block = self.layers()[layer]
        block.self_attn, block.input_layernorm = EmptyLlamaAttention(bias), SkippedNorm()

    def set_ffn(self, layer: int, parts: FfnParts) -> None:
        mlp = self.layers()[layer].mlp
        if isinstance(mlp, EmptyLlamaSublayer):
            raise ValueError(f"layer {layer}: the FFN has no neurons left (or was removed); it cannot be given neurons")
        mlp.gate_proj, mlp.up_proj, mlp.down_proj = parts.gate, parts.up, parts.down
        mlp.intermediate_size = parts.width

    def set_empty_ffn(self, layer: int, bias: torch.Tensor | None) -> None:
        if self.is_removed(layer, "ffn"):
            raise removed_error(layer, "ffn", "neurons to empty")
        block = self.layers()[layer]
        block.mlp, block.post_attention_layernorm = EmptyLlamaSublayer(bias), SkippedNorm()

    def remove_attention(self, layer: int) -> None:
        block = self.layers()[layer]
        block.self_attn, block.input_layernorm = RemovedLlamaAttention(), SkippedNorm()

    def remove_ffn(self, layer: int) -> None:
        block = self.layers()[layer]
        block.mlp, block.post_attention_layernorm = RemovedLlamaMLP(), SkippedNorm()


@contextmanager
def registered() -> Iterator[type[LlamaTestAdapter]]:
    """prunekit sees Llama models through :class:`LlamaTestAdapter` inside the block only."""
    previous = ADAPTERS.get("llama")
    ADAPTERS["llama"] = LlamaTestAdapter
    try:
        yield LlamaTestAdapter
    finally:
        if previous is None:
            del ADAPTERS["llama"]
        else:
            ADAPTERS["llama"] = previous
