"""The model view: the one protocol through which prunekit sees a Transformer.

Everything outside ``prunekit.families`` speaks to a model only through a ``ModelAdapter``. An
adapter knows one family's module names (where the layers, the q/k/v/out projections, the FFN
linears and the LayerNorms live) and how to put a narrower sublayer back in place. Methods,
masks, surgery, accounting and save/load are written once against this protocol (architecture.md,
"the adapter").

Sublayers are numbered as in the specs: sublayer ``j = 2 * l`` is the attention (MHA) sublayer
of layer ``l`` and ``j = 2 * l + 1`` its FFN sublayer.

The adapter also *states* the facts of its family that the core must not assume (``BlockFacts``,
``ModelAdapter.facts``): where each norm sits and its kind, which projections have a bias, whether
the FFN is gated, whether the input embedding is tied to the output head; and per layer the head
geometry (``AttentionParts``): query heads, key/value heads, the head size d_h (a number of its own,
not hidden / heads) and which key/value head each query head reads (its key/value group).

A sublayer f with residual input X is in one of four states; with ``norm_placement`` "post" a layer
computes norm(X + f(X)), with "pre" X + f(norm(X)):

- full or narrowed: some heads / neurons;
- *empty* (Kprune, spec P4): no units left, the output bias b_out kept where the family has one.
  It computes exactly what the masked model computes with every unit's mask at 0: post-norm
  norm(X + b_out), pre-norm X + b_out (X when the output projection has no bias);
- *removed* (CoFi, cofi.md §8 pitfall 1): the sublayer and its norm are gone, out = X in both
  placements.

A present or emptied sublayer may carry an output bias its family does not have (a method's bias
compensation, FLAP): ``LayerShape.attention_out_bias`` / ``ffn_out_bias`` record it.

Independently of the sublayers, the residual stream (the hidden size d) may be *narrowed* to a
subset of its dimensions (CoFi's hidden pruning); the head size d_h never changes.

A new family is one subclass of :class:`ModelAdapter` in its own file and one entry in
``prunekit.families.ADAPTERS``. It states ``facts`` (``BlockFacts``), ``grouped_kv``,
``pooled_token``, the full widths (``full_hidden_size``, ``head_dim``, ``full_num_heads``,
``full_num_kv_heads``, ``full_intermediate_size``) and ``tied_embeddings``; it finds the modules
(``layers``, ``attention``, ``ffn``, the norms, the embedding tables, the head's input linears,
``sublayer_module``) and puts narrower ones back (``set_attention`` with per-layer query and
key/value head counts and the key/value map, ``set_ffn``, the empty and removed forms), setting
whatever per-layer attributes the Hugging Face modules read. Masks, surgery, accounting,
save/load and the methods then work unchanged; ``prunekit.families.llama`` is such an adapter
(pre-norm, RMSNorm, no biases, gated FFN, grouped key/value heads), used by the tests.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

SublayerKind = Literal["attn", "ffn"]
NormPlacement = Literal["pre", "post"]
NormKind = Literal["layernorm", "rmsnorm"]
# The projections a family may give a bias: q/k/v/out of attention, up/gate/down of the FFN.
PROJECTIONS = ("query", "key", "value", "out", "up", "gate", "down")


@dataclass(frozen=True)
class BlockFacts:
    """What every block of a family computes, as its adapter states it (the core never assumes).

    - ``norm_placement``: "post", X <- norm(X + f(X)) (BERT); "pre", X <- X + f(norm(X)) (Llama),
      with one more norm after the last layer (``ModelAdapter.final_norm``).
    - ``norm_kind``: "layernorm" (mean and variance, weight and bias) or "rmsnorm" (root mean square,
      weight only). Only a LayerNorm after the residual sum removes a constant added to it.
    - ``biases``: the projections (names from ``PROJECTIONS``) that carry a bias.
    - ``gated_ffn``: the FFN computes down(act(gate(x)) * up(x)) rather than down(act(up(x))).
    - ``output_norm``: pre-norm blocks that also normalise each sublayer's output before the
      residual add, X <- X + norm_out(f(norm(X))) (Gemma 2/3's "sandwich" norms;
      ``ModelAdapter.sublayer_output_norm``). The residual sum is then not linear in the output
      projection's weights, so least-squares re-fits of that projection (Kprune's KPWT, Kwon's mask
      tuning) do not apply there; an emptied sublayer computes X + norm_out(b_out), X without a bias.
    - ``norm_offset``: an RMSNorm scales by (norm_offset + w) rather than w (Gemma: 1, its stored
      weights are centred on 0).
    """

    norm_placement: NormPlacement
    norm_kind: NormKind
    biases: frozenset[str]
    gated_ffn: bool = False
    output_norm: bool = False
    norm_offset: float = 0.0

    def __post_init__(self) -> None:
        if self.norm_placement not in ("pre", "post"):
            raise ValueError(f"norm_placement must be 'pre' or 'post', got {self.norm_placement!r}")
        if self.norm_kind not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm_kind must be 'layernorm' or 'rmsnorm', got {self.norm_kind!r}")
        unknown = set(self.biases) - set(PROJECTIONS)
        if unknown or (not self.gated_ffn and "gate" in self.biases):
            raise ValueError(f"biases must name projections among {PROJECTIONS} (gate only for a gated FFN), "
                             f"got {sorted(self.biases)}")
        if self.output_norm and self.norm_placement != "pre":
            raise ValueError("output_norm (a norm on each sublayer's output) is stated for pre-norm blocks only")

    def has_bias(self, projection: str) -> bool:
        return projection in self.biases

    @property
    def offset_absorbed(self) -> bool:
        """Whether a constant added to every entry of a sublayer's residual sum leaves the model's
        output unchanged: true only when a LayerNorm (which subtracts the mean) normalises that sum."""
        return self.norm_placement == "post" and self.norm_kind == "layernorm"


POST_LAYERNORM_ALL_BIASES = BlockFacts("post", "layernorm", frozenset({"query", "key", "value", "out", "up", "down"}))


@dataclass
class AttentionParts:
    """The linears of one attention sublayer and its head geometry.

    ``query`` maps d -> H * d_h and ``out`` H * d_h -> d, grouped by query head: head h owns rows
    (of q) and columns (of out) ``[h * d_h, (h + 1) * d_h)``. ``key``/``value`` map d -> H_kv * d_h,
    grouped by key/value head the same way. Query head h reads key/value head ``kv_map[h]``; the
    query heads reading one key/value head are its *group* (``groups``). Defaults: H_kv = H with
    each query head its own group (multi-head attention, BERT); with fewer key/value heads,
    contiguous groups of H / H_kv query heads, as Llama's ``repeat_kv`` builds them.
    """

    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    out: nn.Linear
    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None  # None: as many as query heads
    kv_map: tuple[int, ...] | None = None  # per query head, its key/value head; None: contiguous groups

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.kv_map is None:
            if self.num_kv_heads == 0 or self.num_heads % self.num_kv_heads:
                raise ValueError(f"{self.num_heads} query heads cannot be split into {self.num_kv_heads} equal "
                                 "key/value groups; give kv_map")
            size = self.num_heads // self.num_kv_heads
            self.kv_map = tuple(h // size for h in range(self.num_heads))
        self.kv_map = tuple(int(k) for k in self.kv_map)
        if len(self.kv_map) != self.num_heads or set(self.kv_map) != set(range(self.num_kv_heads)):
            raise ValueError(f"kv_map must give each of the {self.num_heads} query heads one of the "
                             f"{self.num_kv_heads} key/value heads, and use each; got {self.kv_map}")

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def output(self) -> nn.Linear:
        """The output projection, the one whose input columns the units own (``out``)."""
        return self.out

    @property
    def num_units(self) -> int:
        """What a method keeps or cuts here: query heads."""
        return self.num_heads

    @property
    def unit_size(self) -> int:
        """Input columns of the output projection per unit: the head size."""
        return self.head_dim

    def columns(self, units: torch.Tensor) -> torch.Tensor:
        """The output projection's input columns of query heads ``units``, head by head."""
        return unit_columns(units, self.head_dim)

    def groups(self) -> list[list[int]]:
        """Per key/value head, the query heads that read it (sorted)."""
        groups: list[list[int]] = [[] for _ in range(self.num_kv_heads)]
        for head, kv in enumerate(self.kv_map):
            groups[kv].append(head)
        return groups


@dataclass
class FfnParts:
    """The linears of one FFN sublayer: ``up`` (d -> d_ff), optional ``gate``, ``down`` (d_ff -> d)."""

    up: nn.Linear
    down: nn.Linear
    gate: nn.Linear | None = None

    @property
    def width(self) -> int:
        return self.down.in_features

    @property
    def output(self) -> nn.Linear:
        """The output projection, the one whose input columns the units own (``down``)."""
        return self.down

    @property
    def num_units(self) -> int:
        """What a method keeps or cuts here: neurons."""
        return self.width

    @property
    def unit_size(self) -> int:
        """Input columns of the output projection per unit: one per neuron."""
        return 1

    def columns(self, units: torch.Tensor) -> torch.Tensor:
        """The output projection's input columns of neurons ``units``: the same indices."""
        return unit_columns(units, 1)


@dataclass(frozen=True)
class LayerShape:
    """Per-layer widths of a (possibly pruned) model; what the saved config records.

    A removed sublayer (out = X, norm skipped) has 0 units and its flag set; an *empty* one
    (0 units, bias only) has 0 units and no flag. ``num_kv_heads`` and ``kv_map`` (see
    ``AttentionParts``) are recorded only for families whose key/value heads can be shared by
    several query heads (``ModelAdapter.grouped_kv``); None for the others, whose key/value heads
    are their query heads.
    """

    num_heads: int
    intermediate_size: int
    attention_removed: bool = False
    ffn_removed: bool = False
    num_kv_heads: int | None = None
    kv_map: tuple[int, ...] | None = None
    # An output bias the family's projections do not have (FLAP's bias compensation gives a Llama
    # o_proj / down_proj one): the saved config says so, so every load path allocates it.
    attention_out_bias: bool = False
    ffn_out_bias: bool = False

    def __post_init__(self) -> None:
        if self.attention_removed and self.num_heads:
            raise ValueError(f"a removed attention sublayer has no heads, got num_heads={self.num_heads}")
        if self.ffn_removed and self.intermediate_size:
            raise ValueError(f"a removed FFN sublayer has no neurons, got intermediate_size={self.intermediate_size}")
        if self.kv_map is not None:
            object.__setattr__(self, "kv_map", tuple(int(k) for k in self.kv_map))  # JSON gives lists
            if len(self.kv_map) != self.num_heads:
                raise ValueError(f"kv_map has {len(self.kv_map)} entries for {self.num_heads} query heads")

    def to_dict(self) -> dict[str, Any]:
        # The flags and key/value fields only when set, so configs of models without removals or
        # grouped heads read as before and configs written before they existed load unchanged.
        data: dict[str, Any] = {"num_heads": self.num_heads, "intermediate_size": self.intermediate_size}
        if self.attention_removed:
            data["attention_removed"] = True
        if self.ffn_removed:
            data["ffn_removed"] = True
        if self.num_kv_heads is not None:
            data["num_kv_heads"] = self.num_kv_heads
        if self.kv_map is not None:
            data["kv_map"] = list(self.kv_map)
        for flag in ("attention_out_bias", "ffn_out_bias"):
            if getattr(self, flag):
                data[flag] = True
        return data


@dataclass(frozen=True)
class CausalLmParts:
    """A causal LM split where its logits are made, so that callers can make them a few positions
    at a time: ``body`` is the model without its output head, whose first output is the final
    hidden states (B, T, d) (the final norm applied), and ``head`` maps hidden states (..., d) to
    logits (..., V). The whole (B, T, V) tensor of logits then never has to exist: at a vocabulary
    of 49,152 it is 0.8 GB for 4,096 tokens in float32, more than a 135 M-parameter model."""

    body: nn.Module
    head: nn.Module

    def final_hidden(self, **inputs: torch.Tensor) -> torch.Tensor:
        """The final hidden states (B, T, d) for the model's inputs (input_ids, attention_mask).
        No key/value cache: nothing generates after this pass."""
        return self.body(**inputs, use_cache=False)[0]


class ModelAdapter(ABC):
    """Base class of the per-family adapters. Subclasses fill in the module-name methods.

    The adapter wraps one model instance and never changes it on construction; create it with
    ``prunekit.families.get_adapter(model)``, which first puts the model in the family's working form
    (:meth:`to_working_form`). The pipeline builds the teacher's view once and passes it down; a
    method's working copy of the teacher gets its view through :meth:`of`.
    """

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    # Hugging Face classes this adapter accepts, by task head ("sequence_classification", ...).
    model_classes: ClassVar[dict[str, type[nn.Module]]] = {}
    # Variants of the family prunekit refuses, by model_type, each with the feature it lacks (one
    # line; e.g. Phi-3.5-MoE's mixture-of-experts FFNs): named in the error instead of a generic one.
    refused_model_types: ClassVar[dict[str, str]] = {}
    # Whether several query heads may share one key/value head (grouped-query attention). False:
    # every query head has its own key and value head, removed with it (BERT); a pruning unit
    # "head" then costs its q, k and v rows. True: key/value heads are units of their own.
    grouped_kv: ClassVar[bool] = False
    # The token a sequence-level head (classification, regression) reads: "first" ([CLS], BERT)
    # or "last" (the last non-padding token, decoders).
    pooled_token: ClassVar[Literal["first", "last"]] = "first"
    # The modeling file in prunekit/families/remote_code/ that defines this family's placeholder
    # modules and builds its Pruned<Model> classes (configuration_prunekit.model_class_named);
    # saved folders carry it, with configuration_prunekit.py, so that they load without prunekit
    # (trust_remote_code=True), and prunekit registers the same classes. None: no pruned classes.
    remote_code: ClassVar[str | None] = None

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    # Whether to_working_form changes a stock model's modules (GPT-2's Conv1D, OPT's layer class):
    # the pipeline then prunes its own copy, so the caller's model is never changed.
    changes_modules: ClassVar[bool] = False

    @classmethod
    def to_working_form(cls, model: nn.Module) -> None:
        """Put ``model``'s modules in the form this adapter reads, in place (idempotent, exact).
        Most families read the stock modules as they are."""
        return None

    def of(self, model: nn.Module) -> ModelAdapter:
        """The view of another model of this family that prunekit owns (a copy of this one, a
        pruned student, a reloaded checkpoint), put in working form, without a registry lookup."""
        self.to_working_form(model)  # a no-op for a copy of a model in working form
        return type(self)(model)

    # ---- geometry -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers())

    @property
    def hidden_size(self) -> int:
        """The current width d of the residual stream: the config's unless narrowed (CoFi)."""
        return self._embedding_tables()[0].embedding_dim

    @property
    def full_hidden_size(self) -> int:
        """The residual width of the unpruned architecture (the config's value, never narrowed).
        ``hidden_size`` and ``num_attention_heads`` are every Hugging Face config's names (GPT-2's
        and DistilBERT's through their ``attribute_map``)."""
        return self.config.hidden_size

    @property
    @abstractmethod
    def facts(self) -> BlockFacts:
        """Norm placement and kind, biases and FFN kind of this family (and config)."""
        ...

    @property
    def head_dim(self) -> int:
        """d_h, as the family defines it (here hidden / heads; families that state it in the config
        say so): fixed by the architecture, unchanged by any pruning."""
        return self.config.hidden_size // self.config.num_attention_heads

    @property
    def full_num_heads(self) -> int:
        """Query heads per layer in the unpruned architecture (the config's value)."""
        return self.config.num_attention_heads

    @property
    def full_num_kv_heads(self) -> int:
        """Key/value heads per layer in the unpruned architecture; the query heads' count unless
        the family groups them (``grouped_kv``)."""
        return self.full_num_heads

    @property
    def tied_embeddings(self) -> bool:
        """Whether the output head's weight is the input embedding table itself (one parameter)."""
        return False

    @property
    @abstractmethod
    def full_intermediate_size(self) -> int:
        """FFN width of the unpruned architecture: each family's config names it its own way."""
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

    def sublayer(self, layer: int, kind: SublayerKind) -> AttentionParts | FfnParts | None:
        """:meth:`attention` or :meth:`ffn` by sublayer kind."""
        if kind == "attn":
            return self.attention(layer)
        if kind == "ffn":
            return self.ffn(layer)
        raise ValueError(f"unknown sublayer kind {kind!r}; choose 'attn' or 'ffn'")

    @abstractmethod
    def is_removed(self, layer: int, kind: SublayerKind) -> bool:
        """Whether sublayer ``kind`` of ``layer`` was removed (it and its LayerNorm are the identity)."""
        ...

    @abstractmethod
    def embedding_layer_norm(self) -> nn.Module | None:
        """The norm applied to the summed embeddings (CoFi gates the hidden dims around it), or
        None where the family has none (pre-norm decoders)."""
        ...

    def final_norm(self) -> nn.Module | None:
        """The norm after the last layer (pre-norm families), or None."""
        return None

    @abstractmethod
    def sublayer_layer_norm(self, layer: int, kind: SublayerKind) -> nn.Module:
        """The norm of sublayer ``kind`` of ``layer``: post-norm, the one applied to X + f(X) right
        after it, also for an empty sublayer; pre-norm, the one applied to X before it (an empty
        pre-norm sublayer has none: ValueError). ValueError for a removed sublayer."""
        ...

    def sublayer_output_norm(self, layer: int, kind: SublayerKind) -> nn.Module | None:
        """The norm applied to sublayer ``kind``'s output before the residual add (``BlockFacts.
        output_norm``), or None: families without one, removed sublayers, and emptied ones without
        an output bias (norm(0) = 0, so theirs is skipped). The residual sum is X + this norm's
        output where there is one, else X + the output projection's output."""
        return None

    def layer_output(self, layer: int, ffn_residual: torch.Tensor) -> torch.Tensor:
        """``layer``'s output from the residual sum X + f(X) of its FFN (present, neither emptied
        nor removed), any leading shape: post-norm norm(X + f(X)), pre-norm X + f(X) itself."""
        if self.facts.norm_placement == "pre":
            return ffn_residual
        return self.sublayer_layer_norm(layer, "ffn")(ffn_residual)

    def norm_eps(self, norm: nn.Module) -> float:
        """The epsilon of one of this family's norm modules (``eps`` of ``nn.LayerNorm``)."""
        return norm.eps

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The embedding tables' and embedding norm's parameters (CoFi never trains them)."""
        norm = self.embedding_layer_norm()
        modules = [*self._embedding_tables(), *([norm] if norm is not None else [])]
        return [p for module in modules for p in module.parameters()]

    def embedding_tables(self) -> list[nn.Embedding]:
        """Every embedding table summed into the residual stream, the word embeddings first."""
        return self._embedding_tables()

    @abstractmethod
    def _embedding_tables(self) -> list[nn.Embedding]:
        """Every embedding table summed into the residual stream, the word embeddings first."""
        ...

    @abstractmethod
    def _head_input_linears(self) -> list[nn.Linear]:
        """The linears after the encoder whose input is the residual stream (pooler, task head);
        only their input columns follow a hidden narrowing, their outputs keep their width."""
        ...

    @classmethod
    def causal_lm_parts(cls, model: nn.Module) -> CausalLmParts:
        """``model`` (a causal LM of this family, in working form or stock) split into its body and
        its output head (:class:`CausalLmParts`). A classmethod: it reads the model, never changes
        it, so evaluation can split a model it does not own.

        The same for every decoder family prunekit has: Hugging Face's ``*ForCausalLM`` runs its
        base model and applies the output head to the first output, nothing else (no logit scaling
        or soft-capping; a family whose head does more overrides this). ValueError for a model
        without a causal LM head."""
        causal = cls.model_classes.get("causal_lm")
        if causal is None or not isinstance(model, causal):
            raise ValueError(f"{type(model).__name__} is not a causal LM of the {cls.family or cls.__name__} family")
        return CausalLmParts(body=model.base_model, head=model.get_output_embeddings())

    def call_layer(self, block: nn.Module, hidden: torch.Tensor) -> Any:
        """Run one layer module on its input hidden states (B, T, d) alone, outside the model's
        forward (latency tables time it this way), with whatever else the family's layer needs
        (decoders: rotary position embeddings); no padding mask."""
        return block(hidden)

    @abstractmethod
    def sublayer_module(self, layer: int, kind: SublayerKind) -> nn.Module:
        """The module whose first positional input is the sublayer's residual input X_j."""
        ...

    def sublayer_bias(self, layer: int, kind: SublayerKind) -> torch.Tensor | None:
        """The output-projection bias b_j (also for an emptied sublayer, which keeps it); None for
        a removed sublayer, which adds nothing to the residual, and where the family has no bias."""
        if self.is_removed(layer, kind):
            return None
        parts = self.sublayer(layer, kind)
        if parts is not None:
            return parts.output.bias
        return getattr(self._empty_module(layer, kind), "bias", None)

    # ---- rebuilding -------------------------------------------------------------------------
    @abstractmethod
    def set_attention(self, layer: int, parts: AttentionParts) -> None:
        """Install (possibly narrower) attention linears and update the head-count attributes."""
        ...

    @abstractmethod
    def set_empty_attention(self, layer: int, bias: torch.Tensor | None) -> None:
        """Replace the attention sublayer by the explicit zero-head path (spec P4): post-norm
        norm(X + b), pre-norm X + b; ``bias`` None (a family without an output bias): X + 0."""
        ...

    @abstractmethod
    def set_ffn(self, layer: int, parts: FfnParts) -> None:
        ...

    @abstractmethod
    def set_empty_ffn(self, layer: int, bias: torch.Tensor | None) -> None:
        """The FFN's zero-neuron path, as :meth:`set_empty_attention`."""
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
        input columns. The caller validates ``keep`` (``prunekit.core.surgery.narrow_hidden``); only
        shapes are checked here, so this also runs on meta tensors while a model is built.
        """
        if keep.dim() != 1 or keep.numel() == 0:
            raise ValueError(f"narrow_hidden needs a non-empty 1-D index, got shape {tuple(keep.shape)}")
        tables = self._embedding_tables()
        heads = self._head_input_linears()
        # A tied output head shares the word embeddings' Parameter: narrowed once, then re-tied.
        tied = [(linear, table) for linear in heads for table in tables if linear.weight is table.weight]
        for table in tables:
            _narrow_embedding(table, keep)
        for norm in (self.embedding_layer_norm(), self.final_norm()):
            if norm is not None:
                _narrow_norm(norm, keep)
        for layer in range(self.num_layers):
            for kind in ("attn", "ffn"):
                if self.is_removed(layer, kind):
                    continue  # no parameters: it passes any width through
                parts = self.sublayer(layer, kind)
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
                if parts is not None or self.facts.norm_placement == "post":
                    _narrow_norm(self.sublayer_layer_norm(layer, kind), keep)
                output_norm = self.sublayer_output_norm(layer, kind)
                if output_norm is not None:
                    _narrow_norm(output_norm, keep)
        for linear in heads:
            if any(linear is tied_linear for tied_linear, _ in tied):
                continue
            _narrow_linear_input(linear, keep)
        for linear, table in tied:
            linear.weight = table.weight
            linear.in_features = keep.numel()

    # ---- shapes -----------------------------------------------------------------------------
    def layer_shapes(self) -> list[LayerShape]:
        shapes = []
        for layer in range(self.num_layers):
            attn, ffn = self.attention(layer), self.ffn(layer)
            kv: dict[str, Any] = {}
            if self.grouped_kv:
                kv = {"num_kv_heads": attn.num_kv_heads if attn is not None else 0,
                      "kv_map": attn.kv_map if attn is not None else ()}
            shapes.append(
                LayerShape(
                    num_heads=attn.num_heads if attn is not None else 0,
                    intermediate_size=ffn.width if ffn is not None else 0,
                    attention_removed=self.is_removed(layer, "attn"),
                    ffn_removed=self.is_removed(layer, "ffn"),
                    **kv,
                    attention_out_bias=self.added_out_bias(layer, "attn"),
                    ffn_out_bias=self.added_out_bias(layer, "ffn"),
                )
            )
        return shapes

    def added_out_bias(self, layer: int, kind: SublayerKind) -> bool:
        """Whether sublayer ``kind`` of ``layer`` carries an output bias its family's projection
        has not (added by a method's bias compensation); False for a removed sublayer."""
        projection = "out" if kind == "attn" else "down"
        return not self.facts.has_bias(projection) and self.sublayer_bias(layer, kind) is not None

    def layer_removal_blocker(self) -> str | None:
        """Why whole layers cannot leave this model (a layer whose computation depends on its index),
        or None: they can."""
        return None

    def drop_layers(self, keep: list[int]) -> None:
        """Keep only the layers ``keep`` (sorted indices into the current layers), in place: the
        others leave the model (ShortGPT's block removal) and the kept ones are renumbered
        0..len(keep)-1 wherever a module records its index (``layer_idx``: the key/value cache
        slot), with the config's layer count and per-layer ``layer_types`` cut to match, so that
        the model is its stock architecture with fewer layers. At least one layer must stay."""
        if (reason := self.layer_removal_blocker()) is not None:
            raise ValueError(reason)
        layers = self.layers()
        count = len(layers)
        if not keep or sorted(set(keep)) != list(keep) or keep[0] < 0 or keep[-1] >= count:
            raise ValueError(f"layers to keep must be sorted distinct indices in [0, {count}), at least one; "
                             f"got {keep}")
        for index in reversed(range(count)):
            if index not in keep:
                del layers[index]
        for index, block in enumerate(layers):
            for module in block.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = index
        layer_types = getattr(self.config, "layer_types", None)
        if isinstance(layer_types, list | tuple) and len(layer_types) == count:
            self.config.layer_types = [layer_types[i] for i in keep]
        self.config.num_hidden_layers = len(keep)

    def full_layer_shape(self) -> LayerShape:
        """The shape of every layer of the unpruned architecture."""
        kv: dict[str, Any] = {}
        if self.grouped_kv:
            size = self.full_num_heads // self.full_num_kv_heads
            kv = {"num_kv_heads": self.full_num_kv_heads,
                  "kv_map": tuple(h // size for h in range(self.full_num_heads))}
        return LayerShape(self.full_num_heads, self.full_intermediate_size, **kv)

    def pruned_config_updates(self) -> dict[str, Any]:
        """Config values a saved pruned form of this model must change so that it reloads (none
        by default); ``prunekit.io.folders.as_pruned_model`` applies them."""
        return {}

    def is_pruned(self) -> bool:
        full = self.full_layer_shape()
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
        elif hidden_size is not None:
            # The residual stream already has this width: transformers' generic task heads build
            # their base model through AutoModel, whose pruned class resized it; the head linears
            # made after it still read the full width.
            tables = [table.weight for table in self._embedding_tables()]
            for linear in self._head_input_linears():
                if linear.in_features != hidden_size and not any(linear.weight is w for w in tables):
                    _narrow_linear_input(linear, torch.arange(hidden_size, device="cpu"))
        for layer, shape in enumerate(shapes):
            for kind, removed in (("attn", shape.attention_removed), ("ffn", shape.ffn_removed)):
                if removed:
                    self.remove(layer, kind)
                elif self.is_removed(layer, kind):
                    raise ValueError(f"layer {layer}: the {_KIND_NAMES[kind]} sublayer was removed; "
                                     "it cannot be rebuilt at a width")
            attn = self.attention(layer)
            kv_changed = attn is not None and shape.kv_map is not None and shape.kv_map != attn.kv_map
            bias_added = shape.attention_out_bias and attn is not None and attn.out.bias is None
            if attn is not None and (shape.num_heads != attn.num_heads or kv_changed or bias_added):
                if shape.num_heads == 0:
                    self.set_empty_attention(layer, _bias_copy(attn.out, shape.attention_out_bias))
                else:
                    width = shape.num_heads * attn.head_dim
                    # Without recorded key/value heads (non-grouped families), one per query head.
                    num_kv = shape.num_kv_heads if shape.kv_map is not None else shape.num_heads
                    kv_width = num_kv * attn.head_dim
                    self.set_attention(
                        layer,
                        AttentionParts(
                            query=_like(attn.query, attn.query.in_features, width),
                            key=_like(attn.key, attn.key.in_features, kv_width),
                            value=_like(attn.value, attn.value.in_features, kv_width),
                            out=_like(attn.out, width, attn.out.out_features, shape.attention_out_bias),
                            num_heads=shape.num_heads,
                            head_dim=attn.head_dim,
                            num_kv_heads=num_kv,
                            kv_map=shape.kv_map,
                        ),
                    )
            ffn = self.ffn(layer)
            bias_added = shape.ffn_out_bias and ffn is not None and ffn.down.bias is None
            if ffn is not None and (shape.intermediate_size != ffn.width or bias_added):
                if shape.intermediate_size == 0:
                    self.set_empty_ffn(layer, _bias_copy(ffn.down, shape.ffn_out_bias))
                else:
                    n = shape.intermediate_size
                    self.set_ffn(
                        layer,
                        FfnParts(
                            up=_like(ffn.up, ffn.up.in_features, n),
                            down=_like(ffn.down, n, ffn.down.out_features, shape.ffn_out_bias),
                            gate=_like(ffn.gate, ffn.gate.in_features, n) if ffn.gate is not None else None,
                        ),
                    )


_KIND_NAMES = {"attn": "attention", "ffn": "FFN"}


def unit_columns(units: torch.Tensor, size: int) -> torch.Tensor:
    """The indices that units of ``size`` consecutive rows or columns each own, unit by unit: unit
    u owns ``[u * size, (u + 1) * size)``. Returns (len(units) * size,)."""
    return (units[:, None] * size + torch.arange(size, device=units.device)).reshape(-1)


def removed_error(layer: int, kind: SublayerKind, what: str) -> ValueError:
    """The error for asking a removed sublayer for something only a present one has."""
    return ValueError(f"layer {layer}: the {_KIND_NAMES[kind]} sublayer was removed, so it has no {what}")


def require_own_kv_heads(layer: int, parts: AttentionParts) -> None:
    """For families without grouped key/value heads: each query head must keep its own k/v head."""
    if parts.num_kv_heads != parts.num_heads or parts.kv_map != tuple(range(parts.num_heads)):
        raise ValueError(f"layer {layer}: this family gives every query head its own key/value head; got "
                         f"{parts.num_kv_heads} key/value heads for {parts.num_heads} query heads "
                         f"(kv_map {parts.kv_map})")


def _bias_copy(linear: nn.Linear, added: bool = False) -> torch.Tensor | None:
    """A detached copy of ``linear``'s bias (what an emptied sublayer keeps), None without one;
    with ``added`` a zero placeholder where the family has none (a bias a method added)."""
    if linear.bias is None:
        return linear.weight.new_zeros(linear.out_features) if added else None
    return linear.bias.detach().clone()


def _like(linear: nn.Linear, in_features: int, out_features: int, added_bias: bool = False) -> nn.Linear:
    """A new Linear of the given size on the same device and dtype as ``linear``, with a bias
    where it has one or ``added_bias`` asks for one."""
    return nn.Linear(
        in_features,
        out_features,
        bias=linear.bias is not None or added_bias,
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
    old = getattr(module, name, None)  # an RMSNorm has no bias at all
    if old is None:
        return
    new = old.detach().index_select(dim, index.to(old.device)).clone()
    setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))


def _narrow_embedding(table: nn.Embedding, keep: torch.Tensor) -> None:
    _narrow_parameter(table, "weight", keep, 1)  # (num_embeddings, d) -> (num_embeddings, d')
    table.embedding_dim = keep.numel()


def _narrow_norm(norm: nn.Module, keep: torch.Tensor) -> None:
    """A LayerNorm or RMSNorm over the kept dims only: its statistics then cover those alone."""
    _narrow_parameter(norm, "weight", keep, 0)  # (d',)
    _narrow_parameter(norm, "bias", keep, 0)  # LayerNorm only
    if hasattr(norm, "normalized_shape"):  # drives F.layer_norm / F.rms_norm
        norm.normalized_shape = (keep.numel(),)


def _narrow_linear_input(linear: nn.Linear, keep: torch.Tensor) -> None:
    _narrow_parameter(linear, "weight", keep, 1)  # (out, d) -> (out, d'); the bias is per output
    linear.in_features = keep.numel()


def _narrow_linear_output(linear: nn.Linear, keep: torch.Tensor) -> None:
    _narrow_parameter(linear, "weight", keep, 0)  # (d, in) -> (d', in)
    _narrow_parameter(linear, "bias", keep, 0)
    linear.out_features = keep.numel()
