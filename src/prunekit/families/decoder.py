"""The model view of decoders with the Llama layout (Llama, Mistral, Qwen2, Qwen3): one base class;
each family is a subclass in its own file stating its classes and its biases.

Blocks are pre-norm (X + f(RMSNorm(X))), RMSNorm everywhere, a gated FFN (down(act(gate(x)) * up(x))),
grouped key/value heads (``num_key_value_heads``), a head size of its own (``head_dim``), no
embedding norm, a final norm, and an output head that may be tied to the input embeddings.

Layout per layer (``model.model.layers[l]``)::

    input_layernorm                    RMSNorm(X), the attention's input
    self_attn.{q,k,v}_proj             d -> H*d_h (q), d -> H_kv*d_h (k, v)
    self_attn.{q,k}_norm               Qwen3 only: RMSNorm over d_h, one weight shared by all heads
    self_attn.o_proj                   H*d_h -> d; the layer adds X
    post_attention_layernorm           RMSNorm(Y), the FFN's input
    mlp.{gate,up}_proj, mlp.down_proj  d -> d_ff, d_ff -> d; the layer adds Y

What the v5 modules read: the attention views q/k/v with ``(..., -1, self.head_dim)`` (so the
head counts follow the weights), applies Qwen3's q/k norms per head over d_h (unchanged by head
pruning: one weight for every head), and hands ``self.num_key_value_groups`` to the attention
function, which repeats each key/value head that many times; nothing reads
``config.num_attention_heads`` or ``config.num_key_value_heads`` per layer. So a layer whose
groups all keep the same number of query heads, in order, needs only its ``num_key_value_groups``
set; any other grouping gets ``MappedKvAttention``, which gathers each query head's key/value head
by index. The MLP takes its width from the weights. ``layer_idx`` (the cache slot) stays each
layer's own, also for emptied and removed attention, which keep a placeholder in the cache.

The modules put in place of pruned sublayers live in ``remote_code/modeling_prunekit_decoder.py``,
which saved folders carry so that they load without prunekit.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from prunekit.core.view import AttentionParts, BlockFacts, FfnParts, ModelAdapter, SublayerKind, removed_error
from prunekit.families.remote_code import modeling_prunekit_decoder as runtime

REMOTE_CODE_FILE = "modeling_prunekit_decoder.py"


class LlamaLayoutAdapter(ModelAdapter):
    """The adapter of every decoder family with the Llama module layout (see the module docstring).
    A subclass states ``family``, ``model_types`` and ``model_classes``; ``facts`` reads the biases
    from the config (``attention_bias``, ``mlp_bias``) unless the family fixes them."""

    grouped_kv = True
    pooled_token = "last"  # the *ForSequenceClassification heads pool the last non-padding token
    remote_code: ClassVar[str | None] = REMOTE_CODE_FILE  # placeholders and pruned classes (io.files)

    @property
    def facts(self) -> BlockFacts:
        biases = set()
        if getattr(self.config, "attention_bias", False):
            biases |= {"query", "key", "value", "out"}
        if getattr(self.config, "mlp_bias", False):
            biases |= {"up", "gate", "down"}
        return BlockFacts("pre", "rmsnorm", frozenset(biases), gated_ffn=True)

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads

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
        if isinstance(sa, runtime.EmptySublayer):
            return None
        d_h = sa.head_dim
        num_heads, num_kv = sa.q_proj.out_features // d_h, sa.k_proj.out_features // d_h
        kv_map = sa.kv_map if isinstance(sa, runtime.MappedKvAttention) else None
        return AttentionParts(query=sa.q_proj, key=sa.k_proj, value=sa.v_proj, out=sa.o_proj,
                              num_heads=num_heads, head_dim=d_h, num_kv_heads=num_kv, kv_map=kv_map)

    def ffn(self, layer: int) -> FfnParts | None:
        mlp = self.layers()[layer].mlp
        if isinstance(mlp, runtime.EmptySublayer):
            return None
        return FfnParts(up=mlp.up_proj, down=mlp.down_proj, gate=mlp.gate_proj)

    def is_removed(self, layer: int, kind: SublayerKind) -> bool:
        block = self.layers()[layer]
        if kind == "attn":
            return isinstance(block.self_attn, runtime.RemovedAttention)
        return isinstance(block.mlp, runtime.RemovedMLP)

    def embedding_layer_norm(self) -> None:
        return None

    def final_norm(self) -> nn.Module:
        return self.model.base_model.norm

    def sublayer_layer_norm(self, layer: int, kind: SublayerKind) -> nn.Module:
        if self.is_removed(layer, kind):
            raise removed_error(layer, kind, "norm")
        if self.sublayer(layer, kind) is None:
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
        try:
            runtime.install_attention(self.layers()[layer], parts.query, parts.key, parts.value, parts.out,
                                      parts.kv_map)
        except ValueError as err:
            raise ValueError(f"layer {layer}: {err}") from err

    def set_empty_attention(self, layer: int, bias: torch.Tensor | None) -> None:
        if self.is_removed(layer, "attn"):
            raise removed_error(layer, "attn", "heads to empty")
        runtime.empty_attention(self.layers()[layer], bias)

    def set_ffn(self, layer: int, parts: FfnParts) -> None:
        try:
            runtime.install_mlp(self.layers()[layer], parts.gate, parts.up, parts.down)
        except ValueError as err:
            raise ValueError(f"layer {layer}: {err}") from err

    def set_empty_ffn(self, layer: int, bias: torch.Tensor | None) -> None:
        if self.is_removed(layer, "ffn"):
            raise removed_error(layer, "ffn", "neurons to empty")
        runtime.empty_mlp(self.layers()[layer], bias)

    def remove_attention(self, layer: int) -> None:
        runtime.remove_attention(self.layers()[layer])

    def remove_ffn(self, layer: int) -> None:
        runtime.remove_mlp(self.layers()[layer])

    # ---- uniform shapes: a stock config ----------------------------------------------------------
    def stock_config_class(self) -> type:
        """The family's own config class (LlamaConfig, ...), also for a pruned model's config."""
        return next(iter(self.model_classes.values())).config_class

    def uniform_heads_allowed(self, num_heads: int, num_kv_heads: int) -> bool:
        """Whether the stock config accepts layers of ``num_heads`` query heads in ``num_kv_heads``
        equal groups (Llama's, for one, wants the hidden size a multiple of the query heads)."""
        if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
            return False
        try:
            self.stock_config_class()(hidden_size=self.full_hidden_size, num_attention_heads=num_heads,
                                      num_key_value_heads=num_kv_heads, head_dim=self.head_dim)
        except Exception:  # noqa: BLE001  (huggingface_hub's strict validation raises its own error class)
            return False
        return True

    def uniform_config_updates(self) -> dict[str, Any] | None:
        """The stock config values of a model whose every layer has the same query heads, key/value
        heads (equal contiguous groups), FFN width, at least one of each and the full residual
        width; None for any other model (it needs prunekit's per-layer config)."""
        shapes = self.layer_shapes()
        first = shapes[0]
        if self.hidden_size != self.full_hidden_size or first.num_heads == 0 or first.intermediate_size == 0:
            return None
        if first.attention_out_bias or first.ffn_out_bias:
            return None  # an output bias the stock config cannot express (attention_bias adds q/k/v ones too)
        if any(shape != first for shape in shapes) or not runtime.contiguous_groups(
                first.num_heads, first.num_kv_heads, first.kv_map):
            return None
        return {"num_attention_heads": first.num_heads, "num_key_value_heads": first.num_kv_heads,
                "intermediate_size": first.intermediate_size, "head_dim": self.head_dim}
