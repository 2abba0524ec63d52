"""Decoders of the Llama layout pruned by prunekit (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3,
Phi-3), rebuilt by plain transformers without prunekit (remote code), and the modules prunekit itself puts in place
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
per-layer widths, and so for every family in ``LAYOUTS`` (the Llama layout)::

    model.layers[l].input_layernorm            RMSNorm(X), the attention's input
    model.layers[l].self_attn.{q,k,v,o}_proj   (Qwen3: also q_norm, k_norm over d_h, per head)
    model.layers[l].post_attention_layernorm   RMSNorm(Y), the FFN's input
    model.layers[l].mlp.{gate,up,down}_proj

The families differ in a few names and steps, which each states in its ``Layout`` (``LAYOUTS``, by
model_type): where the norms sit (Gemma 2/3 also normalise each sublayer's *output*, before the
residual add: ``post_attention_layernorm`` and ``post_feedforward_layernorm``, and read the FFN's
input from ``pre_feedforward_layernorm``), whether q/k/v and gate/up are fused into one matrix
(Phi-3's ``qkv_proj`` and ``gate_up_proj``, rows q;k;v and gate;up), the family's own rotary and
eager-attention functions (Phi-3's rotary rotates only the first part of each head where the rotary
factor is partial; Gemma 2's eager kernel soft-caps the attention logits) and whether the family's
attention passes ``attn_logit_softcapping`` to the kernel (Gemma 2 does, Gemma 3 does not).

An ``attention_out_bias`` / ``ffn_out_bias`` entry gives o_proj / down_proj (or the emptied
sublayer) an output bias the family lacks (FLAP's bias compensation). A sublayer emptied (zero heads or neurons) computes X + b_out (X without an output bias; with an
output norm, X + norm(b_out)) and a removed one X; either way its input norm is skipped. An
emptied or removed attention still records a one-number placeholder per token in the key/value cache, because transformers reads the number of
cached tokens from the cache (layer 0's, for positions and masks): without it, generation with the
cache would restart positions when layer 0's attention is gone.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

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


# ---- what differs between the families of the Llama layout -----------------------------------------
@dataclass(frozen=True)
class Layout:
    """One family's module names and attention steps (the module docstring lists what differs)."""

    modeling: str  # the family's transformers modeling module: its rotary and eager attention
    attn_norm: str = "input_layernorm"  # normalises X, the attention's input
    ffn_norm: str = "post_attention_layernorm"  # normalises Y, the FFN's input
    attn_output_norm: str | None = None  # normalises the attention's output before X + ... (Gemma)
    ffn_output_norm: str | None = None  # normalises the FFN's output before Y + ... (Gemma)
    fused_qkv: str | None = None  # one linear whose rows are q, k, v (Phi-3's qkv_proj)
    fused_gate_up: str | None = None  # one linear whose rows are gate, up (Phi-3's gate_up_proj)
    softcap: bool = False  # the attention passes attn_logit_softcapping to its kernel (Gemma 2)

    def norms(self) -> tuple[str, ...]:
        """Every per-layer norm's name."""
        return tuple(n for n in (self.attn_norm, self.attn_output_norm, self.ffn_norm, self.ffn_output_norm) if n)



_GEMMA = {"attn_output_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
          "ffn_output_norm": "post_feedforward_layernorm"}
LAYOUTS = {
    "llama": Layout("transformers.models.llama.modeling_llama"),
    "mistral": Layout("transformers.models.mistral.modeling_mistral"),
    "qwen2": Layout("transformers.models.qwen2.modeling_qwen2"),
    "qwen3": Layout("transformers.models.qwen3.modeling_qwen3"),
    "gemma2": Layout("transformers.models.gemma2.modeling_gemma2", softcap=True, **_GEMMA),
    "gemma3_text": Layout("transformers.models.gemma3.modeling_gemma3", **_GEMMA),
    "phi3": Layout("transformers.models.phi3.modeling_phi3", fused_qkv="qkv_proj", fused_gate_up="gate_up_proj"),
}


def layout_of(config) -> Layout:
    """The layout of a (stock or prunekit) config's family."""
    family = getattr(config, "prunekit_base_model_type", None) or config.model_type
    return LAYOUTS[family]


class FusedLinear(nn.Module):
    """Linears side by side (``parts``, d -> w_i each), their outputs concatenated as one fused
    linear gives them (Phi-3's ``qkv_proj``: q, k, v; ``gate_up_proj``: gate, up). prunekit prunes
    the parts as separate projections; the state dict is the fused one, ``weight`` (sum w_i, d) and
    ``bias``, names and shapes as the family's checkpoints have them."""

    def __init__(self, parts: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        # A plain function (no reference to this module), so that deep copies save correctly.
        self._register_state_dict_hook(_fused_state_dict)

    @property
    def in_features(self) -> int:
        return self.parts[0].in_features

    @property
    def out_features(self) -> int:
        return sum(part.out_features for part in self.parts)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "weight" in state_dict:  # the fused form: split it over the parts
            weight, bias = state_dict.pop(prefix + "weight"), state_dict.pop(prefix + "bias", None)
            start = 0
            for i, part in enumerate(self.parts):
                rows = slice(start, start + part.out_features)
                state_dict[f"{prefix}parts.{i}.weight"] = weight[rows]
                if bias is not None:
                    state_dict[f"{prefix}parts.{i}.bias"] = bias[rows]
                start = rows.stop
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # One matmul with the parts' rows stacked, as the fused linear computes it: the same values
        # to the bit as the family's own module (and a folder loaded without prunekit), where one
        # matmul per part would differ in the last bits. Costs a copy of the weight per call.
        weight = torch.cat([part.weight for part in self.parts], 0)  # (sum w_i, d)
        biases = [part.bias for part in self.parts]
        bias = torch.cat(biases, 0) if all(b is not None for b in biases) else None
        return nn.functional.linear(hidden_states, weight, bias)  # (..., sum w_i)


def _fused_state_dict(module: FusedLinear, state_dict, prefix: str, local_metadata) -> None:
    for name in ("weight", "bias"):
        keys = [f"{prefix}parts.{i}.{name}" for i in range(len(module.parts))]
        if all(key in state_dict for key in keys):
            state_dict[prefix + name] = torch.cat([state_dict.pop(key) for key in keys], 0)


def split_linear(linear: nn.Linear, widths: Sequence[int]) -> FusedLinear:
    """A fused ``linear`` as a :class:`FusedLinear` of parts ``widths`` rows each (exact copies)."""
    if sum(widths) != linear.out_features:
        raise ValueError(f"a fused linear of {linear.out_features} rows cannot be split into {list(widths)}")
    parts, start = [], 0
    for width in widths:
        part = nn.Linear(linear.in_features, width, bias=linear.bias is not None, device=linear.weight.device,
                         dtype=linear.weight.dtype)
        part.weight = nn.Parameter(linear.weight.detach()[start:start + width].clone(),
                                   requires_grad=linear.weight.requires_grad)
        if linear.bias is not None:
            part.bias = nn.Parameter(linear.bias.detach()[start:start + width].clone(),
                                     requires_grad=linear.bias.requires_grad)
        parts.append(part)
        start += width
    return FusedLinear(parts)


# ---- the modules in place of pruned sublayers -----------------------------------------------------
class MappedKvAttention(nn.Module):
    """The family's attention with query head h reading key/value head ``kv_map[h]``, for groups
    of unequal sizes (or out of order), and for any pruned attention of a family whose own module
    reads its head counts from the config (Phi-3); otherwise the same computation (rotary, per-head
    q/k norms where the family has them, sliding window, soft-cap, cache, attention kernels)."""

    def __init__(self, source: nn.Module, kv_map: tuple[int, ...], layout: Layout) -> None:
        super().__init__()
        self.config, self.layer_idx = source.config, source.layer_idx
        self.head_dim, self.scaling = source.head_dim, source.scaling
        self.attention_dropout, self.is_causal = source.attention_dropout, source.is_causal
        self.layer_type = getattr(source, "layer_type", None)
        # Qwen2/3 and Gemma keep it per layer, Mistral and Phi-3 read it from the config, Llama has none.
        self.sliding_window = getattr(source, "sliding_window", getattr(source.config, "sliding_window", None))
        self.softcap = getattr(source, "attn_logit_softcapping", None) if layout.softcap else None
        self.num_key_value_groups = 1  # the gather below gives every query head its own k/v
        self.fused = layout.fused_qkv
        for name in ([layout.fused_qkv] if layout.fused_qkv else ["q_proj", "k_proj", "v_proj"]) + ["o_proj"]:
            setattr(self, name, getattr(source, name))
        for name in ("q_norm", "k_norm"):  # Qwen3, Gemma 3: one RMSNorm over d_h shared by all heads
            if hasattr(source, name):
                setattr(self, name, getattr(source, name))
        self.modeling = layout.modeling  # a name: the functions are looked up per call, never pickled
        # A plain tuple, not a buffer: from_pretrained builds modules on the meta device and would
        # leave a non-persistent buffer there; the index is made on the keys' device per call.
        self.kv_map = tuple(int(k) for k in kv_map)

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (..., H*d_h), keys and values (..., H_kv*d_h)."""
        if self.fused is None:
            return self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        qkv = getattr(self, self.fused)(hidden_states)  # (..., (H + 2*H_kv)*d_h), rows q;k;v
        width = len(self.kv_map) * self.head_dim
        kv_width = (qkv.shape[-1] - width) // 2
        return qkv.split([width, kv_width, kv_width], dim=-1)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        rotary = importlib.import_module(self.modeling).apply_rotary_pos_emb
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query, key, value = self.project(hidden_states)
        query, key = query.view(hidden_shape), key.view(hidden_shape)  # (B, T, H, d_h), (B, T, H_kv, d_h)
        if hasattr(self, "q_norm"):
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        value = value.view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = rotary(query, key, cos, sin)
        if cache is not None:  # the cache holds the H_kv heads; the gather happens after it
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        index = torch.as_tensor(self.kv_map, dtype=torch.long, device=key.device)
        key, value = key.index_select(1, index), value.index_select(1, index)  # (B, H, S, d_h)
        eager = importlib.import_module(self.modeling).eager_attention_forward
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)
        if self.softcap is not None:
            kwargs["softcap"] = self.softcap
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


def install_attention(block: nn.Module, projections: dict[str, nn.Module], o: nn.Linear,
                      kv_map: tuple[int, ...], layout: Layout) -> None:
    """Give ``block``'s attention these linears: ``projections`` maps q_proj, k_proj, v_proj (or the
    family's fused name) to their modules. Even groups keep the family's own attention (only its
    per-layer ``num_key_value_groups`` changes) where that module takes its head counts from the
    weights; any other grouping, and any pruned attention of a family whose module reads them from
    the config (fused q/k/v, Phi-3), becomes MappedKvAttention."""
    sa = block.self_attn
    if isinstance(sa, EmptySublayer):
        raise ValueError("the attention has no heads left (or was removed); it cannot be given heads")
    kv_map = tuple(int(h) for h in kv_map)
    num_heads, num_kv = len(kv_map), max(kv_map) + 1
    for name, module in projections.items():
        setattr(sa, name, module)
    sa.o_proj = o
    if isinstance(sa, MappedKvAttention):
        sa.kv_map = kv_map
    elif contiguous_groups(num_heads, num_kv, kv_map) and not layout.fused_qkv:
        sa.num_key_value_groups = num_heads // num_kv  # what repeat_kv / SDPA's enable_gqa read
    elif layout.fused_qkv and kv_map == _full_map(sa.config):
        pass  # the unpruned geometry: the family's own module splits q/k/v as its config says
    else:
        block.self_attn = MappedKvAttention(sa, kv_map, layout)


def _full_map(config) -> tuple[int, ...]:
    size = config.num_attention_heads // config.num_key_value_heads
    return tuple(h // size for h in range(config.num_attention_heads))


def _skip_norms(block: nn.Module, names: Sequence[str | None]) -> None:
    for name in names:
        if name is not None:
            setattr(block, name, SkippedNorm())


def empty_attention(block: nn.Module, bias: torch.Tensor | None, layout: Layout) -> None:
    # An output norm stays only over a bias (X + norm(b)); over nothing it would give norm(0) = 0.
    block.self_attn = EmptyAttention(bias, block.self_attn.layer_idx)
    _skip_norms(block, [layout.attn_norm, layout.attn_output_norm if bias is None else None])


def remove_attention(block: nn.Module, layout: Layout) -> None:
    block.self_attn = RemovedAttention(block.self_attn.layer_idx)
    _skip_norms(block, [layout.attn_norm, layout.attn_output_norm])


def install_mlp(block: nn.Module, projections: dict[str, nn.Module], down: nn.Linear) -> None:
    """Give ``block``'s FFN these linears: gate_proj and up_proj (or the family's fused name)."""
    mlp = block.mlp
    if isinstance(mlp, EmptySublayer):
        raise ValueError("the FFN has no neurons left (or was removed); it cannot be given neurons")
    for name, module in projections.items():
        setattr(mlp, name, module)
    mlp.down_proj = down
    mlp.intermediate_size = down.in_features


def empty_mlp(block: nn.Module, bias: torch.Tensor | None, layout: Layout) -> None:
    block.mlp = EmptySublayer(bias)
    _skip_norms(block, [layout.ffn_norm, layout.ffn_output_norm if bias is None else None])


def remove_mlp(block: nn.Module, layout: Layout) -> None:
    block.mlp = RemovedMLP()
    _skip_norms(block, [layout.ffn_norm, layout.ffn_output_norm])


# ---- rebuilding a pruned model from its config (placeholders: the saved weights load over them) ----
def _narrow_hidden(base: nn.Module, width: int, layout: Layout) -> None:
    """The residual stream at ``width`` dimensions everywhere the base model reads or writes it."""
    narrow_embedding(base.embed_tokens, width)
    for norm in [base.norm, *(getattr(b, name) for b in base.layers for name in layout.norms())]:
        narrow_norm(norm, width)
    qkv = [layout.fused_qkv] if layout.fused_qkv else ["q_proj", "k_proj", "v_proj"]
    gate_up = [layout.fused_gate_up] if layout.fused_gate_up else ["gate_proj", "up_proj"]
    for block in base.layers:
        sa, mlp = block.self_attn, block.mlp
        for parent, name, is_input in [*((sa, n, 1) for n in qkv), (sa, "o_proj", 0),
                                       *((mlp, n, 1) for n in gate_up), (mlp, "down_proj", 0)]:
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
    layout = layout_of(config)
    shapes = layer_shapes(config, len(blocks))
    width = getattr(config, "prunekit_hidden_size", None)
    if width is not None and width != config.hidden_size:
        _narrow_hidden(base, width, layout)
    for block, shape in zip(blocks, shapes, strict=True):
        if shape is None:  # no prunekit_layers: every layer at the config's widths
            continue
        sa, mlp = block.self_attn, block.mlp
        d, d_h = sa.o_proj.out_features, sa.head_dim
        if shape.get("attention_removed"):
            remove_attention(block, layout)
        elif shape["num_heads"] == 0:
            empty_attention(block, zero_bias(sa.o_proj, d, added_bias(shape, "attention")), layout)
        else:
            heads, kv_heads = shape["num_heads"], shape.get("num_kv_heads", shape["num_heads"])
            kv_map = tuple(shape.get("kv_map") or range(heads))
            if layout.fused_qkv:  # one placeholder of the fused width, as the folder stores it
                old = getattr(sa, layout.fused_qkv)
                projections = {layout.fused_qkv: linear_like(old, d, (heads + 2 * kv_heads) * d_h)}
            else:
                projections = {"q_proj": linear_like(sa.q_proj, d, heads * d_h),
                               "k_proj": linear_like(sa.k_proj, d, kv_heads * d_h),
                               "v_proj": linear_like(sa.v_proj, d, kv_heads * d_h)}
            install_attention(block, projections, linear_like(sa.o_proj, heads * d_h, d, added_bias(shape, "attention")),
                              kv_map, layout)
        n = shape["intermediate_size"]
        if shape.get("ffn_removed"):
            remove_mlp(block, layout)
        elif n == 0:
            empty_mlp(block, zero_bias(mlp.down_proj, d, added_bias(shape, "ffn")), layout)
        else:
            if layout.fused_gate_up:
                projections = {layout.fused_gate_up: linear_like(getattr(mlp, layout.fused_gate_up), d, 2 * n)}
            else:
                projections = {"gate_proj": linear_like(mlp.gate_proj, d, n), "up_proj": linear_like(mlp.up_proj, d, n)}
            install_mlp(block, projections, linear_like(mlp.down_proj, n, d, added_bias(shape, "ffn")))
    base._prunekit_built = True


BUILDERS = {family: build_pruned for family in LAYOUTS}


def __getattr__(name: str) -> type:
    # auto_map names PrunedLlamaForCausalLM, PrunedQwen3Model, ...: made on first use.
    return model_class_named(name, __name__, BUILDERS)
