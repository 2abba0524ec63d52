"""OPT adapter: ``OPTForCausalLM`` and ``OPTForSequenceClassification`` (transformers v5).

Layout (``model.base_model.decoder``, ``OPTDecoder``)::

    embed_tokens (vocab, e), project_in e -> d (only when e = word_embed_proj_dim != d)
    embed_positions (positions + 2, d)  learned, indexed from an offset of 2 (OPT's padding hack)
    layers[l]                           OPTDecoderLayer:
        self_attn_layer_norm            LayerNorm
        self_attn.{q,k,v}_proj          d -> H*d_h
        self_attn.out_proj              H*d_h -> d; the layer adds X
        final_layer_norm                LayerNorm
        fc1, fc2                        d -> d_ff, ReLU, d_ff -> d; the layer adds Y
    final_layer_norm                    after the last layer (pre-norm configs only)
    project_out d -> e                  (only with project_in)

``do_layer_norm_before`` (True for OPT-125m, 1.3b and up) puts each LayerNorm before its sublayer
(X + f(LN(X))); False (OPT-350m) after the residual sum (LN(X + f(X))), with no final norm. Both
are supported. ``enable_bias`` (default True) gives every projection a bias; the FFN is not gated.
The output head is tied to ``embed_tokens``; with ``project_out`` it reads e, not the residual
stream, so a narrowed residual stream (CoFi's hidden dims) slices ``project_in``'s rows and
``project_out``'s columns instead of the token table and the head.

What the v5 modules read per layer: ``OPTAttention`` views q/k/v as
``(B, -1, self.num_heads, self.head_dim)``, so ``num_heads`` is set per layer; its ``scaling``
(1/sqrt(d_h)) never changes, since d_h does not. The layer runs fc1 -> act -> fc2 inline.

The layer's own forward flattens the FFN's input to (B*T, d), which prunekit's hooks (that read
(B, T, d) residual inputs and drop padding rows by a (B, T) mask) cannot use, so the adapter
re-classes each layer, in place, as :class:`OPTBlock`: the same computation and parameters, the
FFN kept at (B, T, d) and the attention called with its input as a positional argument (hooks see
it). The state dict is OPT's own; saved folders and reloads use stock modules.

A pre-norm sublayer emptied or removed takes its LayerNorm with it: X + b_out (emptied) or X
(removed). Post-norm: LN(X + b_out) (emptied, the norm stays) or X (removed, the norm goes). An
emptied or removed attention still records the sequence length in the key/value cache (one
placeholder head of width 1): the model reads the past length from the cache's first layer. Those
modules live in ``remote_code/modeling_prunekit_opt.py``, which saved folders carry so that they
load without prunekit.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import OPTForCausalLM, OPTForSequenceClassification, OPTModel
from transformers.models.opt.modeling_opt import OPTDecoderLayer

from prunekit.core.view import (
    AttentionParts,
    BlockFacts,
    FfnParts,
    ModelAdapter,
    SublayerKind,
    _narrow_linear_output,
    removed_error,
    require_own_kv_heads,
)
from prunekit.families.remote_code.configuration_prunekit import SkippedNorm
from prunekit.families.remote_code.modeling_prunekit_opt import (
    EmptyFc1,
    EmptyFc2,
    EmptyOPTAttention,
    RemovedFc2,
    RemovedOPTAttention,
)

ALL_BIASES = frozenset({"query", "key", "value", "out", "up", "down"})


class OPTBlock(OPTDecoderLayer):
    """``OPTDecoderLayer`` with its FFN at (B, T, d) and its attention's input passed positionally;
    otherwise the same computation (parameters, norms, dropout, cache)."""

    def forward(self, hidden_states, attention_mask=None, cache=None, use_cache=False, position_ids=None,
                **kwargs):
        kwargs.pop("past_key_values", None)
        pre = self.do_layer_norm_before
        residual = hidden_states
        if pre:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states, cache=cache, position_ids=position_ids,
                                          attention_mask=attention_mask, **kwargs)
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        hidden_states = residual + hidden_states
        if not pre:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        residual = hidden_states
        if pre:
            hidden_states = self.final_layer_norm(hidden_states)
        hidden_states = self.fc2(self.activation_fn(self.fc1(hidden_states)))
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        hidden_states = residual + hidden_states
        if not pre:
            hidden_states = self.final_layer_norm(hidden_states)
        return hidden_states


def to_block_form(model: nn.Module) -> None:
    """Re-class every ``OPTDecoderLayer`` of ``model`` as :class:`OPTBlock`, in place (idempotent)."""
    for layer in model.base_model.decoder.layers:
        if type(layer) is OPTDecoderLayer:
            layer.__class__ = OPTBlock


class OPTAdapter(ModelAdapter):
    family = "opt"
    model_types = ("opt",)
    model_classes = {
        "causal_lm": OPTForCausalLM,
        "sequence_classification": OPTForSequenceClassification,
        "base": OPTModel,
    }
    pooled_token = "last"  # OPTForSequenceClassification pools the last non-padding token
    remote_code = "modeling_prunekit_opt.py"

    changes_modules = True  # OPTDecoderLayer -> OPTBlock

    @classmethod
    def to_working_form(cls, model: nn.Module) -> None:
        to_block_form(model)

    @property
    def _decoder(self) -> nn.Module:
        return self.model.base_model.decoder

    @property
    def _projected(self) -> bool:
        """Whether the token embeddings have their own width (project_in / project_out, OPT-350m)."""
        return self._decoder.project_in is not None

    @property
    def facts(self) -> BlockFacts:
        placement = "pre" if self.config.do_layer_norm_before else "post"
        return BlockFacts(placement, "layernorm", ALL_BIASES if self.config.enable_bias else frozenset())

    @property
    def full_intermediate_size(self) -> int:
        return self.config.ffn_dim

    @property
    def tied_embeddings(self) -> bool:
        head = getattr(self.model, "lm_head", None)
        return head is not None and head.weight is self._decoder.embed_tokens.weight

    def layers(self) -> nn.ModuleList:
        return self._decoder.layers

    def attention(self, layer: int) -> AttentionParts | None:
        sa = self.layers()[layer].self_attn
        if isinstance(sa, EmptyOPTAttention):
            return None
        return AttentionParts(query=sa.q_proj, key=sa.k_proj, value=sa.v_proj, out=sa.out_proj,
                              num_heads=sa.q_proj.out_features // sa.head_dim, head_dim=sa.head_dim)

    def ffn(self, layer: int) -> FfnParts | None:
        block = self.layers()[layer]
        if isinstance(block.fc2, EmptyFc2):
            return None
        return FfnParts(up=block.fc1, down=block.fc2)

    def is_removed(self, layer: int, kind: SublayerKind) -> bool:
        block = self.layers()[layer]
        return isinstance(block.self_attn, RemovedOPTAttention) if kind == "attn" else isinstance(block.fc2, RemovedFc2)

    def embedding_layer_norm(self) -> None:
        return None

    def final_norm(self) -> nn.Module | None:
        return self._decoder.final_layer_norm  # None for post-norm configs

    def sublayer_layer_norm(self, layer: int, kind: SublayerKind) -> nn.Module:
        if self.is_removed(layer, kind):
            raise removed_error(layer, kind, "norm")
        emptied = self.sublayer(layer, kind) is None
        if emptied and self.facts.norm_placement == "pre":
            raise ValueError(f"layer {layer}: an emptied pre-norm sublayer has no norm")
        block = self.layers()[layer]
        return block.self_attn_layer_norm if kind == "attn" else block.final_layer_norm

    def _embedding_tables(self) -> list[nn.Embedding]:
        # The tables whose width is the residual stream's; with project_in the token table has
        # its own width (word_embed_proj_dim) and only the positions are summed in directly.
        if self._projected:
            return [self._decoder.embed_positions]
        return [self._decoder.embed_tokens, self._decoder.embed_positions]

    def embedding_tables(self) -> list[nn.Module]:
        """What is summed into the residual stream: the tables, or project_in's output and the
        positions when the token embeddings have their own width (the hidden gates scale outputs)."""
        if self._projected:
            return [self._decoder.project_in, self._decoder.embed_positions]
        return self._embedding_tables()

    def embedding_parameters(self) -> list[nn.Parameter]:
        modules = [self._decoder.embed_tokens, self._decoder.embed_positions]
        if self._projected:
            modules += [self._decoder.project_in, self._decoder.project_out]
        return [p for module in modules for p in module.parameters()]

    def _head_input_linears(self) -> list[nn.Linear]:
        if self._projected:
            return [self._decoder.project_out]  # the head reads its output (width e), not the stream
        for name in ("lm_head", "score"):
            if isinstance(getattr(self.model, name, None), nn.Linear):
                return [getattr(self.model, name)]
        return []

    def narrow_hidden(self, keep: torch.Tensor) -> None:
        super().narrow_hidden(keep)
        if self._projected:  # project_in writes the stream: its output rows (no bias)
            _narrow_linear_output(self._decoder.project_in, keep)

    def call_layer(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return block(hidden)  # causal by default, unpadded; positions were added before the layers

    def sublayer_module(self, layer: int, kind: SublayerKind) -> nn.Module:
        # OPTBlock calls these with the sublayer's residual input X as first positional argument:
        # pre-norm the sublayer's LayerNorm (a SkippedNorm once emptied or removed), post-norm the
        # attention module (X itself) and fc1.
        block = self.layers()[layer]
        if self.facts.norm_placement == "pre":
            return block.self_attn_layer_norm if kind == "attn" else block.final_layer_norm
        return block.self_attn if kind == "attn" else block.fc1

    def _empty_module(self, layer: int, kind: SublayerKind) -> nn.Module:
        block = self.layers()[layer]
        return block.self_attn if kind == "attn" else block.fc2

    def set_attention(self, layer: int, parts: AttentionParts) -> None:
        require_own_kv_heads(layer, parts)
        sa = self.layers()[layer].self_attn
        if isinstance(sa, EmptyOPTAttention):
            raise ValueError(f"layer {layer}: the attention has no heads left (or was removed); it cannot be given heads")
        sa.q_proj, sa.k_proj, sa.v_proj, sa.out_proj = parts.query, parts.key, parts.value, parts.out
        sa.num_heads = parts.num_heads  # the forward views q/k/v with it

    def set_empty_attention(self, layer: int, bias: torch.Tensor | None) -> None:
        if self.is_removed(layer, "attn"):
            raise removed_error(layer, "attn", "heads to empty")
        block = self.layers()[layer]
        block.self_attn = EmptyOPTAttention(bias, layer)
        if self.facts.norm_placement == "pre":  # post-norm: LN(X + b) keeps its norm
            block.self_attn_layer_norm = SkippedNorm()

    def set_ffn(self, layer: int, parts: FfnParts) -> None:
        block = self.layers()[layer]
        if isinstance(block.fc2, EmptyFc2):
            raise ValueError(f"layer {layer}: the FFN has no neurons left (or was removed); it cannot be given neurons")
        block.fc1, block.fc2 = parts.up, parts.down

    def set_empty_ffn(self, layer: int, bias: torch.Tensor | None) -> None:
        if self.is_removed(layer, "ffn"):
            raise removed_error(layer, "ffn", "neurons to empty")
        block = self.layers()[layer]
        block.fc1, block.fc2 = EmptyFc1(), EmptyFc2(bias)
        if self.facts.norm_placement == "pre":
            block.final_layer_norm = SkippedNorm()

    def remove_attention(self, layer: int) -> None:
        block = self.layers()[layer]
        block.self_attn, block.self_attn_layer_norm = RemovedOPTAttention(layer), SkippedNorm()

    def remove_ffn(self, layer: int) -> None:
        block = self.layers()[layer]
        block.fc1, block.fc2, block.final_layer_norm = EmptyFc1(), RemovedFc2(), SkippedNorm()
