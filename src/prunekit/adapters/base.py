"""The model view: the one protocol through which prunekit sees a Transformer.

Everything outside ``prunekit.adapters`` speaks to a model only through a ``ModelAdapter``. An
adapter knows one family's module names (where the layers, the q/k/v/out projections, the FFN
linears and the LayerNorms live) and how to put a narrower sublayer back in place. Methods,
masks, surgery, accounting and save/load are written once against this protocol (architecture.md,
"the adapter").

Sublayers are numbered as in the specs: sublayer ``j = 2 * l`` is the attention (MHA) sublayer
of layer ``l`` and ``j = 2 * l + 1`` its FFN sublayer.

A sublayer is in one of four states:

- full or narrowed: some heads / neurons, computes LN(X + sublayer(X));
- *empty* (Kprune, spec P4): no units left but its output bias kept, computes LN(X + b_out);
- *removed* (CoFi, cofi.md §8 pitfall 1): the sublayer and its LayerNorm are gone, out = X.

Independently of the sublayers, the residual stream (the hidden size d) may be *narrowed* to a
subset of its dimensions (CoFi's hidden pruning); the head size d_h never changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

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
    """Per-layer widths of a (possibly pruned) model; what the saved config records.

    A removed sublayer (out = X, LayerNorm skipped) has 0 units and its flag set; an *empty* one
    (0 units, LN(X + b_out)) has 0 units and no flag.
    """

    num_heads: int
    intermediate_size: int
    attention_removed: bool = False
    ffn_removed: bool = False

    def __post_init__(self) -> None:
        if self.attention_removed and self.num_heads:
            raise ValueError(f"a removed attention sublayer has no heads, got num_heads={self.num_heads}")
        if self.ffn_removed and self.intermediate_size:
            raise ValueError(f"a removed FFN sublayer has no neurons, got intermediate_size={self.intermediate_size}")

    def to_dict(self) -> dict[str, int | bool]:
        # The flags only when set, so configs of models without removals read as before and
        # configs written before the flags existed load unchanged.
        data: dict[str, int | bool] = {"num_heads": self.num_heads, "intermediate_size": self.intermediate_size}
        if self.attention_removed:
            data["attention_removed"] = True
        if self.ffn_removed:
            data["ffn_removed"] = True
        return data


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
    def hidden_size(self) -> int:
        """The current width d of the residual stream: the config's unless narrowed (CoFi)."""
        return self._embedding_tables()[0].embedding_dim

    @property
    @abstractmethod
    def full_hidden_size(self) -> int:
        """The residual width of the unpruned architecture (the config's value, never narrowed)."""
        ...

    @property
    @abstractmethod
    def head_dim(self) -> int:
        """d_h = full hidden size / full heads: fixed by the architecture, unchanged by any pruning."""
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
        """The attention linears of ``layer``, or None once it is empty or removed."""
        ...

    @abstractmethod
    def ffn(self, layer: int) -> FfnParts | None:
        """The FFN linears of ``layer``, or None once it is empty or removed."""
        ...

    @abstractmethod
    def is_removed(self, layer: int, kind: SublayerKind) -> bool:
        """Whether sublayer ``kind`` of ``layer`` was removed (it and its LayerNorm are the identity)."""
        ...

    @abstractmethod
    def embedding_layer_norm(self) -> nn.LayerNorm:
        """The LayerNorm applied to the summed embeddings (CoFi gates the hidden dims around it)."""
        ...

    @abstractmethod
    def sublayer_layer_norm(self, layer: int, kind: SublayerKind) -> nn.LayerNorm:
        """The LayerNorm applied to X + sublayer(X) right after sublayer ``kind`` of ``layer``, also
        for an empty sublayer; ValueError for a removed one, which has none."""
        ...

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The embedding tables' and embedding LayerNorm's parameters (CoFi never trains them)."""
        modules = [*self._embedding_tables(), self.embedding_layer_norm()]
        return [p for module in modules for p in module.parameters()]

    @abstractmethod
    def _embedding_tables(self) -> list[nn.Embedding]:
        """Every embedding table summed into the residual stream, the word embeddings first."""
        ...

    @abstractmethod
    def _head_input_linears(self) -> list[nn.Linear]:
        """The linears after the encoder whose input is the residual stream (pooler, task head);
        only their input columns follow a hidden narrowing, their outputs keep their width."""
        ...

    @abstractmethod
    def sublayer_module(self, layer: int, kind: SublayerKind) -> nn.Module:
        """The module whose first positional input is the sublayer's residual input X_j."""
        ...

    def sublayer_bias(self, layer: int, kind: SublayerKind) -> torch.Tensor | None:
        """The output-projection bias b_j (also for an emptied sublayer, which keeps it); None for
        a removed sublayer, which adds nothing to the residual."""
        if self.is_removed(layer, kind):
            return None
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

    @abstractmethod
    def remove_attention(self, layer: int) -> None:
        """Replace the attention sublayer of ``layer`` (full, narrowed or empty) by the identity:
        the layer's attention step then returns its input X unchanged, skipping its LayerNorm."""
        ...

    @abstractmethod
    def remove_ffn(self, layer: int) -> None:
        """Replace the FFN sublayer of ``layer`` by the identity, as :meth:`remove_attention`."""
        ...

    def remove(self, layer: int, kind: SublayerKind) -> None:
        """``remove_attention`` or ``remove_ffn`` by sublayer kind."""
        if kind == "attn":
            self.remove_attention(layer)
        elif kind == "ffn":
            self.remove_ffn(layer)
        else:
            raise ValueError(f"unknown sublayer kind {kind!r}; choose 'attn' or 'ffn'")

    def narrow_hidden(self, keep: torch.Tensor) -> None:
        """Keep only the hidden dimensions ``keep`` (sorted indices into the current d) everywhere
        the residual stream is read or written, in place.

        Every residual dimension is tied to the same dimension in every layer through the skip
        connections (cofi.md §8 pitfall 3), so one index set slices all embedding tables'
        columns, every LayerNorm, the q/k/v and FFN-up input columns, the attention-out and
        FFN-down output rows and biases, the biases of emptied sublayers, and the task head's
        input columns. The caller validates ``keep`` (``prunekit.surgery.narrow_hidden``); only
        shapes are checked here, so this also runs on meta tensors while a model is built.
        """
        if keep.dim() != 1 or keep.numel() == 0:
            raise ValueError(f"narrow_hidden needs a non-empty 1-D index, got shape {tuple(keep.shape)}")
        for table in self._embedding_tables():
            _narrow_embedding(table, keep)
        _narrow_layer_norm(self.embedding_layer_norm(), keep)
        for layer in range(self.num_layers):
            for kind in ("attn", "ffn"):
                if self.is_removed(layer, kind):
                    continue  # no parameters: it passes any width through
                parts = self.attention(layer) if kind == "attn" else self.ffn(layer)
                if parts is None:
                    _narrow_parameter(self._empty_module(layer, kind), "bias", keep, 0)  # (d,)
                elif isinstance(parts, AttentionParts):
                    for linear in (parts.query, parts.key, parts.value):
                        _narrow_linear_input(linear, keep)
                    _narrow_linear_output(parts.out, keep)
                else:
                    for linear in (parts.up, parts.gate):
                        if linear is not None:
                            _narrow_linear_input(linear, keep)
                    _narrow_linear_output(parts.down, keep)
                _narrow_layer_norm(self.sublayer_layer_norm(layer, kind), keep)
        for linear in self._head_input_linears():
            _narrow_linear_input(linear, keep)

    # ---- shapes -----------------------------------------------------------------------------
    def layer_shapes(self) -> list[LayerShape]:
        shapes = []
        for layer in range(self.num_layers):
            attn, ffn = self.attention(layer), self.ffn(layer)
            shapes.append(
                LayerShape(
                    num_heads=attn.num_heads if attn is not None else 0,
                    intermediate_size=ffn.width if ffn is not None else 0,
                    attention_removed=self.is_removed(layer, "attn"),
                    ffn_removed=self.is_removed(layer, "ffn"),
                )
            )
        return shapes

    def pruned_config_updates(self) -> dict[str, Any]:
        """Config values a saved pruned form of this model must change so that it reloads (none
        by default); ``prunekit.io.as_pruned_model`` applies them."""
        return {}

    def is_pruned(self) -> bool:
        full = LayerShape(self.full_num_heads, self.full_intermediate_size)
        return self.hidden_size != self.full_hidden_size or any(shape != full for shape in self.layer_shapes())

    def resize(self, shapes: list[LayerShape], hidden_size: int | None = None) -> None:
        """Allocate every sublayer at the given widths, removed sublayers as removed, and the
        residual stream at ``hidden_size`` (None: leave it); used to build a pruned architecture
        from its config before the saved weights are loaded into it, so the values are
        placeholders (a narrowed hidden size keeps the first dimensions of the current ones).
        A removed sublayer cannot be rebuilt: resize a model that still has it."""
        if len(shapes) != self.num_layers:
            raise ValueError(f"{len(shapes)} layer shapes given for a model with {self.num_layers} layers")
        if hidden_size is not None and hidden_size != self.hidden_size:
            if not 0 < hidden_size < self.hidden_size:
                raise ValueError(f"hidden size {hidden_size} given for a model whose residual stream has "
                                 f"{self.hidden_size} dimensions; it can only be narrowed")
            # An explicit CPU index: from_pretrained builds models under a meta-device context.
            self.narrow_hidden(torch.arange(hidden_size, device="cpu"))
        for layer, shape in enumerate(shapes):
            for kind, removed in (("attn", shape.attention_removed), ("ffn", shape.ffn_removed)):
                if removed:
                    self.remove(layer, kind)
                elif self.is_removed(layer, kind):
                    raise ValueError(f"layer {layer}: the {_KIND_NAMES[kind]} sublayer was removed; "
                                     "it cannot be rebuilt at a width")
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


_KIND_NAMES = {"attn": "attention", "ffn": "FFN"}


def removed_error(layer: int, kind: SublayerKind, what: str) -> ValueError:
    """The error for asking a removed sublayer for something only a present one has."""
    return ValueError(f"layer {layer}: the {_KIND_NAMES[kind]} sublayer was removed, so it has no {what}")


def _like(linear: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    """A new Linear of the given size on the same device and dtype as ``linear``."""
    return nn.Linear(
        in_features,
        out_features,
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )


# ---- in-place slicing along the hidden dimension -------------------------------------------------
# In place (the module stays, only its parameter and size attribute change), so that modules that
# share a LayerNorm (Kprune's emptied sublayers hold the original one) and hooks stay attached.
# Surgery's ``slice_linear`` builds new Linears instead; it cannot be used here without an import
# cycle (surgery imports the adapters), and the narrowing needs Embeddings and LayerNorms too.
def _narrow_parameter(module: nn.Module, name: str, index: torch.Tensor, dim: int) -> None:
    """Replace ``module.<name>`` by its entries ``index`` along ``dim``: a copy on the same device
    and dtype with the same requires_grad."""
    old = getattr(module, name)
    if old is None:
        return
    new = old.detach().index_select(dim, index.to(old.device)).clone()
    setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))


def _narrow_embedding(table: nn.Embedding, keep: torch.Tensor) -> None:
    _narrow_parameter(table, "weight", keep, 1)  # (num_embeddings, d) -> (num_embeddings, d')
    table.embedding_dim = keep.numel()


def _narrow_layer_norm(norm: nn.LayerNorm, keep: torch.Tensor) -> None:
    # normalized_shape drives F.layer_norm: the statistics are then over the kept dims only.
    _narrow_parameter(norm, "weight", keep, 0)  # (d',)
    _narrow_parameter(norm, "bias", keep, 0)
    norm.normalized_shape = (keep.numel(),)


def _narrow_linear_input(linear: nn.Linear, keep: torch.Tensor) -> None:
    _narrow_parameter(linear, "weight", keep, 1)  # (out, d) -> (out, d'); the bias is per output
    linear.in_features = keep.numel()


def _narrow_linear_output(linear: nn.Linear, keep: torch.Tensor) -> None:
    _narrow_parameter(linear, "weight", keep, 0)  # (d, in) -> (d', in)
    _narrow_parameter(linear, "bias", keep, 0)
    linear.out_features = keep.numel()
