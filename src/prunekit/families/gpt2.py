"""GPT-2 adapter: ``GPT2LMHeadModel`` and ``GPT2ForSequenceClassification`` (transformers v5).

Layout per layer (``model.transformer.h[l]``, ``GPT2Block``)::

    ln_1                  LayerNorm(X), the attention's input            (pre-norm)
    attn.c_attn           Conv1D d -> 3*H*d_h: q, k and v side by side (fused)
    attn.c_proj           Conv1D H*d_h -> d; the block adds X
    ln_2                  LayerNorm(Y), the FFN's input
    mlp.c_fc, mlp.c_proj  Conv1D d -> d_ff, ReLU/GELU, Conv1D d_ff -> d; the block adds Y

then ``transformer.ln_f``; learned positions ``transformer.wpe`` summed with ``transformer.wte``,
and ``lm_head`` tied to ``wte``. Every projection has a bias; no grouped key/value heads.

**Conv1D.** Hugging Face's ``Conv1D`` is a linear map whose weight is stored transposed, (in, out),
and ``c_attn`` fuses q, k and v into one. prunekit's surgery, masks and methods work on
``nn.Linear`` modules that run in the forward pass (hooks read their inputs and outputs), so the
adapter puts the model in *linear form* when it first sees it, in place and exactly:
``c_proj``/``c_fc`` become :class:`Conv1DLinear` (an ``nn.Linear``) and ``c_attn`` a
:class:`FusedQKV` holding three ``nn.Linear`` (q, k, v) whose outputs it concatenates, so
``GPT2Attention``'s own forward (split by ``split_size``, cache, kernels) runs unchanged. Their
state dicts are GPT-2's: ``c_attn.weight`` (d, 3w), ``c_proj.weight`` (w, d) and so on, names and
shapes as a stock GPT-2 checkpoint has them, so ``save_pretrained`` writes a GPT-2 folder and
``load_state_dict`` reads one. The pruned classes and the remote code build *stock* modules
(``Conv1D``) at the pruned widths, which is what ``from_pretrained`` loads into
(:meth:`GPT2Adapter.resize` leaves that form); a reloaded model is put in linear form again when
prunekit next views it. Both forms compute the same function.

What the v5 modules read per layer: ``GPT2Attention`` splits ``c_attn``'s output at
``self.split_size`` and views heads with ``(..., -1, self.head_dim)``; its ``scaling`` (1/sqrt(d_h),
and 1/(layer_idx + 1) with ``scale_attn_by_inverse_layer_idx``) is fixed at construction and never
changes, since d_h does not. So a layer's heads need only ``split_size`` (and ``num_heads``,
bookkeeping) set. ``GPT2MLP`` takes its width from the weights.

A sublayer emptied or removed takes its pre-norm with it (nothing else reads it): the block then
computes X + b_out (emptied) or X (removed), as the masked model does. An emptied or removed
attention still records the sequence length in the key/value cache (one placeholder head of width
1), because the model reads the past length from the cache's first layer (positions, masks). Those
modules live in ``remote_code/modeling_prunekit_gpt2.py``, which saved folders carry so that they
load without prunekit.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel, GPT2Model
from transformers.pytorch_utils import Conv1D

from prunekit.core.view import (
    AttentionParts,
    BlockFacts,
    FfnParts,
    LayerShape,
    ModelAdapter,
    SublayerKind,
    removed_error,
    require_own_kv_heads,
)
from prunekit.families.remote_code.configuration_prunekit import SkippedNorm
from prunekit.families.remote_code.modeling_prunekit_gpt2 import (
    EmptyGPT2Attention,
    EmptyGPT2MLP,
    RemovedGPT2Attention,
    RemovedGPT2MLP,
)

ALL_BIASES = frozenset({"query", "key", "value", "out", "up", "down"})


# ---- linear form of GPT-2's Conv1D modules ---------------------------------------------------------
class Conv1DLinear(nn.Linear):
    """An ``nn.Linear`` whose state dict is a ``Conv1D``'s: ``weight`` saved and loaded as (in, out)."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        weight = destination[prefix + "weight"]
        destination[prefix + "weight"] = weight.t() if keep_vars else weight.detach().t().contiguous()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        if key in state_dict:
            state_dict = {**state_dict, key: state_dict[key].t()}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class FusedQKV(nn.Module):
    """GPT-2's ``c_attn`` as three ``nn.Linear`` (q, k, v; d -> w each), concatenated in the forward
    as ``c_attn`` would give them. State dict: ``weight`` (d, 3w) and ``bias`` (3w,), Conv1D's."""

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear) -> None:
        super().__init__()
        self.q, self.k, self.v = q, k, v
        # A plain function (no reference to this module), so that deep copies save correctly.
        self._register_state_dict_hook(_fused_state_dict)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # ``state_dict`` is this module's own dict, filtered for its children after this returns.
        _split_state_dict(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(hidden_states), self.k(hidden_states), self.v(hidden_states)], dim=-1)


def _fused_state_dict(module: FusedQKV, state_dict, prefix: str, local_metadata) -> None:
    weights = [state_dict.pop(f"{prefix}{name}.weight") for name in ("q", "k", "v")]
    biases = [state_dict.pop(f"{prefix}{name}.bias") for name in ("q", "k", "v")]
    state_dict[prefix + "weight"] = torch.cat(weights, 0).t().contiguous()  # (d, 3w)
    state_dict[prefix + "bias"] = torch.cat(biases, 0)


def _split_state_dict(module: FusedQKV, state_dict, prefix: str) -> None:
    if prefix + "weight" not in state_dict:
        return  # missing keys are reported by the linears' own loading
    weight, bias = state_dict.pop(prefix + "weight").t(), state_dict.pop(prefix + "bias", None)
    width = module.q.out_features
    for i, name in enumerate(("q", "k", "v")):
        state_dict[f"{prefix}{name}.weight"] = weight[i * width:(i + 1) * width]
        if bias is not None:
            state_dict[f"{prefix}{name}.bias"] = bias[i * width:(i + 1) * width]


def _linear_from_conv(conv: nn.Module, rows: slice | None = None, cls: type[nn.Linear] = Conv1DLinear) -> nn.Linear:
    """The ``Conv1D`` (or its output columns ``rows``) as an ``nn.Linear`` (``cls``) of the same
    values; q, k and v inside a :class:`FusedQKV` are plain ``nn.Linear`` (it fuses their state)."""
    weight, bias = conv.weight.detach().t(), conv.bias.detach()  # (out, in), (out,)
    if rows is not None:
        weight, bias = weight[rows], bias[rows]
    linear = cls(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.contiguous(), requires_grad=conv.weight.requires_grad)
    linear.bias = nn.Parameter(bias.clone(), requires_grad=conv.bias.requires_grad)
    return linear


def _as_conv(linear: nn.Linear) -> Conv1D:
    conv = Conv1D(linear.out_features, linear.in_features)
    conv.weight = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=linear.weight.requires_grad)
    conv.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
    return conv


def _as_conv1d_linear(linear: nn.Linear) -> Conv1DLinear:
    """A Linear (from surgery) re-classed so its state dict keeps GPT-2's Conv1D layout."""
    if not isinstance(linear, Conv1DLinear):
        linear.__class__ = Conv1DLinear
    return linear


def to_linear_form(model: nn.Module) -> None:
    """Put every block of a GPT-2 model in linear form, in place (idempotent); exact."""
    for block in model.base_model.h:
        attn, mlp = block.attn, block.mlp
        if isinstance(getattr(attn, "c_attn", None), Conv1D):
            width = attn.c_attn.nf // 3
            attn.c_attn = FusedQKV(*(_linear_from_conv(attn.c_attn, slice(i * width, (i + 1) * width), nn.Linear)
                                     for i in range(3)))
        if isinstance(getattr(attn, "c_proj", None), Conv1D):
            attn.c_proj = _linear_from_conv(attn.c_proj)
        for name in ("c_fc", "c_proj"):
            if isinstance(getattr(mlp, name, None), Conv1D):
                setattr(mlp, name, _linear_from_conv(getattr(mlp, name)))


def to_conv_form(model: nn.Module) -> None:
    """The inverse of :func:`to_linear_form`: stock ``Conv1D`` modules, what from_pretrained loads."""
    for block in model.base_model.h:
        attn, mlp = block.attn, block.mlp
        if isinstance(getattr(attn, "c_attn", None), FusedQKV):
            q, k, v = attn.c_attn.q, attn.c_attn.k, attn.c_attn.v
            fused = nn.Linear(q.in_features, 3 * q.out_features, device=q.weight.device, dtype=q.weight.dtype)
            fused.weight = nn.Parameter(torch.cat([q.weight.detach(), k.weight.detach(), v.weight.detach()], 0))
            fused.bias = nn.Parameter(torch.cat([q.bias.detach(), k.bias.detach(), v.bias.detach()], 0))
            attn.c_attn = _as_conv(fused)
        if isinstance(getattr(attn, "c_proj", None), nn.Linear):
            attn.c_proj = _as_conv(attn.c_proj)
        for name in ("c_fc", "c_proj"):
            if isinstance(getattr(mlp, name, None), nn.Linear):
                setattr(mlp, name, _as_conv(getattr(mlp, name)))


class GPT2Adapter(ModelAdapter):
    family = "gpt2"
    model_types = ("gpt2",)
    model_classes = {
        "causal_lm": GPT2LMHeadModel,
        "sequence_classification": GPT2ForSequenceClassification,
        "base": GPT2Model,
    }
    pooled_token = "last"  # GPT2ForSequenceClassification pools the last non-padding token
    remote_code = "modeling_prunekit_gpt2.py"

    changes_modules = True  # Conv1D -> Linear

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if getattr(self.config, "add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention (add_cross_attention=True) is not supported by prunekit")

    @classmethod
    def to_working_form(cls, model: nn.Module) -> None:
        to_linear_form(model)

    @property
    def facts(self) -> BlockFacts:
        return BlockFacts("pre", "layernorm", ALL_BIASES)

    @property
    def full_intermediate_size(self) -> int:
        return self.config.n_inner if self.config.n_inner is not None else 4 * self.config.n_embd

    @property
    def tied_embeddings(self) -> bool:
        head = getattr(self.model, "lm_head", None)
        return head is not None and head.weight is self.model.base_model.wte.weight

    def layers(self) -> nn.ModuleList:
        return self.model.base_model.h

    def attention(self, layer: int) -> AttentionParts | None:
        attn = self.layers()[layer].attn
        if isinstance(attn, EmptyGPT2Attention):
            return None
        qkv = attn.c_attn
        return AttentionParts(query=qkv.q, key=qkv.k, value=qkv.v, out=attn.c_proj,
                              num_heads=qkv.q.out_features // attn.head_dim, head_dim=attn.head_dim)

    def ffn(self, layer: int) -> FfnParts | None:
        mlp = self.layers()[layer].mlp
        if isinstance(mlp, EmptyGPT2MLP):
            return None
        return FfnParts(up=mlp.c_fc, down=mlp.c_proj)

    def is_removed(self, layer: int, kind: SublayerKind) -> bool:
        block = self.layers()[layer]
        return isinstance(block.attn, RemovedGPT2Attention) if kind == "attn" else isinstance(block.mlp, RemovedGPT2MLP)

    def embedding_layer_norm(self) -> None:
        return None

    def final_norm(self) -> nn.Module:
        return self.model.base_model.ln_f

    def sublayer_layer_norm(self, layer: int, kind: SublayerKind) -> nn.Module:
        if self.is_removed(layer, kind):
            raise removed_error(layer, kind, "norm")
        if self.sublayer(layer, kind) is None:
            raise ValueError(f"layer {layer}: an emptied pre-norm sublayer has no norm")
        block = self.layers()[layer]
        return block.ln_1 if kind == "attn" else block.ln_2

    def _embedding_tables(self) -> list[nn.Embedding]:
        base = self.model.base_model
        return [base.wte, base.wpe]

    def _head_input_linears(self) -> list[nn.Linear]:
        for name in ("lm_head", "score"):
            if isinstance(getattr(self.model, name, None), nn.Linear):
                return [getattr(self.model, name)]
        return []

    def call_layer(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return block(hidden)  # causal by default, unpadded; positions were added before the layers

    def sublayer_module(self, layer: int, kind: SublayerKind) -> nn.Module:
        # GPT2Block calls ln_1(X) and ln_2(Y) positionally (a SkippedNorm once the sublayer is
        # emptied or removed): their inputs are the sublayers' residual inputs.
        block = self.layers()[layer]
        return block.ln_1 if kind == "attn" else block.ln_2

    def _empty_module(self, layer: int, kind: SublayerKind) -> nn.Module:
        block = self.layers()[layer]
        return block.attn if kind == "attn" else block.mlp

    def set_attention(self, layer: int, parts: AttentionParts) -> None:
        require_own_kv_heads(layer, parts)
        attn = self.layers()[layer].attn
        if isinstance(attn, EmptyGPT2Attention):
            raise ValueError(f"layer {layer}: the attention has no heads left (or was removed); it cannot be given heads")
        attn.c_attn = FusedQKV(parts.query, parts.key, parts.value)
        attn.c_proj = _as_conv1d_linear(parts.out)
        attn.split_size = parts.width  # where c_attn's output is split into q, k and v
        attn.num_heads = parts.num_heads

    def set_empty_attention(self, layer: int, bias: torch.Tensor | None) -> None:
        if self.is_removed(layer, "attn"):
            raise removed_error(layer, "attn", "heads to empty")
        block = self.layers()[layer]
        block.attn, block.ln_1 = EmptyGPT2Attention(bias, layer), SkippedNorm()

    def set_ffn(self, layer: int, parts: FfnParts) -> None:
        mlp = self.layers()[layer].mlp
        if isinstance(mlp, EmptyGPT2MLP):
            raise ValueError(f"layer {layer}: the FFN has no neurons left (or was removed); it cannot be given neurons")
        mlp.c_fc, mlp.c_proj = _as_conv1d_linear(parts.up), _as_conv1d_linear(parts.down)

    def set_empty_ffn(self, layer: int, bias: torch.Tensor | None) -> None:
        if self.is_removed(layer, "ffn"):
            raise removed_error(layer, "ffn", "neurons to empty")
        block = self.layers()[layer]
        block.mlp, block.ln_2 = EmptyGPT2MLP(bias), SkippedNorm()

    def remove_attention(self, layer: int) -> None:
        block = self.layers()[layer]
        block.attn, block.ln_1 = RemovedGPT2Attention(layer), SkippedNorm()

    def layer_removal_blocker(self) -> str | None:
        if getattr(self.config, "scale_attn_by_inverse_layer_idx", False):
            # Attention scores are divided by layer_idx + 1: a renumbered layer would compute another function.
            return ("this GPT-2 scales attention by 1/(layer index + 1) (scale_attn_by_inverse_layer_idx), so a "
                    "layer computes something else once the layers below it are removed; whole layers cannot be "
                    "removed from it")
        return None

    def remove_ffn(self, layer: int) -> None:
        block = self.layers()[layer]
        block.mlp, block.ln_2 = RemovedGPT2MLP(), SkippedNorm()

    def resize(self, shapes: list[LayerShape], hidden_size: int | None = None) -> None:
        """As :meth:`ModelAdapter.resize`, then back to stock ``Conv1D`` modules: the form whose
        parameters have the names and shapes of the saved (GPT-2) state dict, for from_pretrained."""
        super().resize(shapes, hidden_size=hidden_size)
        to_conv_form(self.model)
