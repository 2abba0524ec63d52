"""The model view of decoders with the Llama layout (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3,
Phi-3): one base class; each family is a subclass in its own file stating its classes, its biases
and whatever else of its block differs (``BlockFacts``), and its module names are its ``Layout``
in ``remote_code/modeling_prunekit_decoder.py`` (norm names, fused projections), which the pruned
classes read too.

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

Fused projections (Phi-3's ``qkv_proj`` and ``gate_up_proj``) are presented as separate q, k, v and
gate, up linears: :meth:`LlamaLayoutAdapter.to_working_form` splits each into a ``FusedLinear`` of
parts (exact row copies), whose state dict is the fused one, so a saved folder has the family's
own names and shapes; a folder loads into plain fused linears, split again when prunekit views it.

The modules put in place of pruned sublayers live in ``remote_code/modeling_prunekit_decoder.py``,
which saved folders carry so that they load without prunekit.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from prunekit.core.view import AttentionParts, BlockFacts, FfnParts, ModelAdapter, SublayerKind, removed_error
from prunekit.families.remote_code import modeling_prunekit_decoder as runtime
from prunekit.families.remote_code.configuration_prunekit import SkippedNorm

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
        return BlockFacts("pre", "rmsnorm", frozenset(biases), gated_ffn=True,
                          output_norm=self.layout.attn_output_norm is not None)

    @property
    def layout(self) -> runtime.Layout:
        """The family's module names (norms, fused projections), shared with its pruned classes."""
        return runtime.layout_of(self.config)

    @classmethod
    def to_working_form(cls, model: nn.Module) -> None:
        """Fused q/k/v and gate/up linears (Phi-3) as ``FusedLinear`` parts; others unchanged."""
        layout = runtime.layout_of(model.config)
        if not (layout.fused_qkv or layout.fused_gate_up):
            return
        config = model.config
        for block in model.base_model.layers:
            sa, mlp = block.self_attn, block.mlp
            fused = getattr(sa, layout.fused_qkv, None) if layout.fused_qkv else None
            if isinstance(fused, nn.Linear):
                # Query heads: the module's own map once pruned, else the config's count.
                num_heads = len(sa.kv_map) if isinstance(sa, runtime.MappedKvAttention) else config.num_attention_heads
                width = num_heads * sa.head_dim
                kv_width = (fused.out_features - width) // 2
                setattr(sa, layout.fused_qkv, runtime.split_linear(fused, [width, kv_width, kv_width]))
            fused = getattr(mlp, layout.fused_gate_up, None) if layout.fused_gate_up else None
            if isinstance(fused, nn.Linear):  # rows gate;up, as the family's MLP chunks them
                setattr(mlp, layout.fused_gate_up, runtime.split_linear(fused, [fused.out_features // 2] * 2))

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
        return norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps  # Gemma: eps

    def layers(self) -> nn.ModuleList:
        return self.model.base_model.layers

    def attention(self, layer: int) -> AttentionParts | None:
        sa = self.layers()[layer].self_attn
        if isinstance(sa, runtime.EmptySublayer):
            return None
        d_h, fused = sa.head_dim, self.layout.fused_qkv
        q, k, v = getattr(sa, fused).parts if fused else (sa.q_proj, sa.k_proj, sa.v_proj)
        num_heads, num_kv = q.out_features // d_h, k.out_features // d_h
        kv_map = sa.kv_map if isinstance(sa, runtime.MappedKvAttention) else None
        return AttentionParts(query=q, key=k, value=v, out=sa.o_proj,
                              num_heads=num_heads, head_dim=d_h, num_kv_heads=num_kv, kv_map=kv_map)

    def ffn(self, layer: int) -> FfnParts | None:
        mlp = self.layers()[layer].mlp
        if isinstance(mlp, runtime.EmptySublayer):
            return None
        fused = self.layout.fused_gate_up
        gate, up = getattr(mlp, fused).parts if fused else (mlp.gate_proj, mlp.up_proj)
        return FfnParts(up=up, down=mlp.down_proj, gate=gate)

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
        return self.sublayer_module(layer, kind)

    def sublayer_output_norm(self, layer: int, kind: SublayerKind) -> nn.Module | None:
        name = self.layout.attn_output_norm if kind == "attn" else self.layout.ffn_output_norm
        if name is None or self.is_removed(layer, kind):
            return None
        norm = getattr(self.layers()[layer], name)
        return None if isinstance(norm, SkippedNorm) else norm

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
        # The layer calls its input norms (input_layernorm(X), and post_attention_layernorm(Y) or
        # Gemma's pre_feedforward_layernorm(Y)) positionally: their inputs are the residual inputs.
        return getattr(self.layers()[layer], self.layout.attn_norm if kind == "attn" else self.layout.ffn_norm)

    def _empty_module(self, layer: int, kind: SublayerKind) -> nn.Module:
        block = self.layers()[layer]
        return block.self_attn if kind == "attn" else block.mlp

    def set_attention(self, layer: int, parts: AttentionParts) -> None:
        fused = self.layout.fused_qkv
        projections = ({fused: runtime.FusedLinear([parts.query, parts.key, parts.value])} if fused else
                       {"q_proj": parts.query, "k_proj": parts.key, "v_proj": parts.value})
        try:
            runtime.install_attention(self.layers()[layer], projections, parts.out, parts.kv_map, self.layout)
        except ValueError as err:
            raise ValueError(f"layer {layer}: {err}") from err

    def set_empty_attention(self, layer: int, bias: torch.Tensor | None) -> None:
        if self.is_removed(layer, "attn"):
            raise removed_error(layer, "attn", "heads to empty")
        runtime.empty_attention(self.layers()[layer], bias, self.layout)

    def set_ffn(self, layer: int, parts: FfnParts) -> None:
        fused = self.layout.fused_gate_up
        projections = ({fused: runtime.FusedLinear([parts.gate, parts.up])} if fused else
                       {"gate_proj": parts.gate, "up_proj": parts.up})
        try:
            runtime.install_mlp(self.layers()[layer], projections, parts.down)
        except ValueError as err:
            raise ValueError(f"layer {layer}: {err}") from err

    def set_empty_ffn(self, layer: int, bias: torch.Tensor | None) -> None:
        if self.is_removed(layer, "ffn"):
            raise removed_error(layer, "ffn", "neurons to empty")
        runtime.empty_mlp(self.layers()[layer], bias, self.layout)

    def remove_attention(self, layer: int) -> None:
        runtime.remove_attention(self.layers()[layer], self.layout)

    def remove_ffn(self, layer: int) -> None:
        runtime.remove_mlp(self.layers()[layer], self.layout)

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
