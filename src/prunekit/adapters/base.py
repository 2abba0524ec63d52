"""The model view: the one protocol through which prunekit sees a Transformer.

Everything outside ``prunekit.adapters`` speaks to a model only through a ``ModelAdapter``. An
adapter knows one family's module names (where the layers, the q/k/v/out projections, the FFN
linears and the LayerNorms live) and how to put a narrower sublayer back in place. Methods,
masks, surgery, accounting and save/load are written once against this protocol (architecture.md,
"the adapter").

Sublayers are numbered as in the specs: sublayer ``j = 2 * l`` is the attention (MHA) sublayer
of layer ``l`` and ``j = 2 * l + 1`` its FFN sublayer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

SublayerKind = Literal["attn", "ffn"]


@dataclass
class AttentionParts:
    """The linears of one attention sublayer and its head geometry.

    ``query``/``key``/``value`` map d -> H * d_h; ``out`` maps H * d_h -> d. Rows of q/k/v and
    columns of ``out`` are grouped by head: head h owns ``[h * d_h, (h + 1) * d_h)``.
    """

    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    out: nn.Linear
    num_heads: int
    head_dim: int

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim


@dataclass
class FfnParts:
    """The linears of one FFN sublayer: ``up`` (d -> d_ff), optional ``gate``, ``down`` (d_ff -> d)."""

    up: nn.Linear
    down: nn.Linear
    gate: nn.Linear | None = None

    @property
    def width(self) -> int:
        return self.down.in_features


@dataclass(frozen=True)
class LayerShape:
    """Per-layer widths of a (possibly pruned) model; what the saved config records."""

    num_heads: int
    intermediate_size: int

    def to_dict(self) -> dict[str, int]:
        return {"num_heads": self.num_heads, "intermediate_size": self.intermediate_size}


class ModelAdapter(ABC):
    """Base class of the per-family adapters. Subclasses fill in the module-name methods.

    The adapter wraps one model instance; create it with ``prunekit.adapters.get_adapter(model)``.
    """

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    # Hugging Face classes this adapter accepts, by task head ("sequence_classification", ...).
    model_classes: ClassVar[dict[str, type[nn.Module]]] = {}

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    # ---- geometry -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers())

    @property
    @abstractmethod
    def hidden_size(self) -> int:
        ...

    @property
    @abstractmethod
    def head_dim(self) -> int:
        ...

    @property
    @abstractmethod
    def full_num_heads(self) -> int:
        """Heads per layer in the unpruned architecture (the config's value)."""
        ...

    @property
    @abstractmethod
    def full_intermediate_size(self) -> int:
        ...

    # ---- module access --------------------------------------------------------------------
    @abstractmethod
    def layers(self) -> nn.ModuleList:
        ...

    @abstractmethod
    def attention(self, layer: int) -> AttentionParts | None:
        """The attention linears of ``layer``, or None once every head was removed."""
        ...

    @abstractmethod
    def ffn(self, layer: int) -> FfnParts | None:
        """The FFN linears of ``layer``, or None once every neuron was removed."""
        ...

    @abstractmethod
    def sublayer_module(self, layer: int, kind: SublayerKind) -> nn.Module:
        """The module whose first positional input is the sublayer's residual input X_j."""
        ...

    def sublayer_bias(self, layer: int, kind: SublayerKind) -> torch.Tensor | None:
        """The output-projection bias b_j (also for an emptied sublayer, which keeps it)."""
        parts = self.attention(layer) if kind == "attn" else self.ffn(layer)
        if parts is not None:
            linear = parts.out if kind == "attn" else parts.down
            return linear.bias
        return self._empty_module(layer, kind).bias

    # ---- rebuilding -------------------------------------------------------------------------
    @abstractmethod
    def set_attention(self, layer: int, parts: AttentionParts) -> None:
        """Install (possibly narrower) attention linears and update the head-count attributes."""
        ...

    @abstractmethod
    def set_empty_attention(self, layer: int, bias: torch.Tensor) -> None:
        """Replace the attention sublayer by the explicit zero-head path, LN(X + b) (spec P4)."""
        ...

    @abstractmethod
    def set_ffn(self, layer: int, parts: FfnParts) -> None:
        ...

    @abstractmethod
    def set_empty_ffn(self, layer: int, bias: torch.Tensor) -> None:
        ...

    @abstractmethod
    def _empty_module(self, layer: int, kind: SublayerKind) -> nn.Module:
        ...

    # ---- shapes -----------------------------------------------------------------------------
    def layer_shapes(self) -> list[LayerShape]:
        shapes = []
        for layer in range(self.num_layers):
            attn, ffn = self.attention(layer), self.ffn(layer)
            shapes.append(
                LayerShape(
                    num_heads=attn.num_heads if attn is not None else 0,
                    intermediate_size=ffn.width if ffn is not None else 0,
                )
            )
        return shapes

    def is_pruned(self) -> bool:
        full = LayerShape(self.full_num_heads, self.full_intermediate_size)
        return any(shape != full for shape in self.layer_shapes())

    def resize(self, shapes: list[LayerShape]) -> None:
        """Allocate every sublayer at the given widths (fresh weights); used to build a pruned
        architecture from its config before the saved weights are loaded into it."""
        if len(shapes) != self.num_layers:
            raise ValueError(f"{len(shapes)} layer shapes given for a model with {self.num_layers} layers")
        for layer, shape in enumerate(shapes):
            attn = self.attention(layer)
            if attn is not None and shape.num_heads != attn.num_heads:
                if shape.num_heads == 0:
                    self.set_empty_attention(layer, attn.out.bias.detach().clone())
                else:
                    width = shape.num_heads * attn.head_dim
                    self.set_attention(
                        layer,
                        AttentionParts(
                            query=_like(attn.query, attn.query.in_features, width),
                            key=_like(attn.key, attn.key.in_features, width),
                            value=_like(attn.value, attn.value.in_features, width),
                            out=_like(attn.out, width, attn.out.out_features),
                            num_heads=shape.num_heads,
                            head_dim=attn.head_dim,
                        ),
                    )
            ffn = self.ffn(layer)
            if ffn is not None and shape.intermediate_size != ffn.width:
                if shape.intermediate_size == 0:
                    self.set_empty_ffn(layer, ffn.down.bias.detach().clone())
                else:
                    n = shape.intermediate_size
                    self.set_ffn(
                        layer,
                        FfnParts(
                            up=_like(ffn.up, ffn.up.in_features, n),
                            down=_like(ffn.down, n, ffn.down.out_features),
                            gate=_like(ffn.gate, ffn.gate.in_features, n) if ffn.gate is not None else None,
                        ),
                    )


def _like(linear: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    """A new Linear of the given size on the same device and dtype as ``linear``."""
    return nn.Linear(
        in_features,
        out_features,
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )
