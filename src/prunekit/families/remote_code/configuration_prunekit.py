"""The one factory of prunekit's pruned classes, and what every family's remote code shares.

Copied into every folder prunekit writes, next to the family's ``modeling_prunekit*.py`` (which
imports it), and named in ``config.json``'s ``auto_map``, so that plain transformers rebuilds the
pruned model in a process where prunekit is not installed::

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

prunekit itself imports these same modules (``prunekit.families.remote_code``) and registers the
same classes with the Auto classes, so a folder loads into one set of classes on every path. It
imports only torch and transformers, never prunekit.

- ``Prunekit<Config>`` (``PrunekitLlamaConfig``, ``PrunekitBertConfig``, ...) is the family's config
  plus ``prunekit_layers`` (per layer: heads, FFN width, removed sublayers), ``prunekit_hidden_size``
  (the narrowed residual width, None when not narrowed) and ``prunekit_base_model_type``, under
  ``model_type`` ``prunekit_<family>``. Made on first use by name (module ``__getattr__``).
- ``Pruned<Model>`` (``PrunedLlamaForCausalLM``, ...) is the family's model class that, once built at
  the config's full widths, reallocates every layer at its pruned widths with its family's
  ``build(model, config)``; the saved weights are then loaded over those placeholders. Each
  modeling file makes them with :func:`model_class_named` from its own builders.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers
from torch import nn
from transformers import AutoModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING

_CLASSES: dict[tuple[str, str], type] = {}  # (module, class name): the classes made so far


# ---- the factory --------------------------------------------------------------------------------
def pruned_config_class(base: type) -> type:
    """``base`` (e.g. LlamaConfig) plus the per-layer widths, as model_type ``prunekit_<family>``."""
    name = "Prunekit" + base.__name__
    key = (__name__, name)
    if key not in _CLASSES:
        family = base.model_type
        # Class-body annotations become fields of transformers' (dataclass-based) configs.
        _CLASSES[key] = type(name, (base,), {
            "__module__": __name__,
            "__doc__": f"{base.__name__} plus prunekit's per-layer widths.",
            "__annotations__": {"prunekit_layers": list | None, "prunekit_base_model_type": str,
                                "prunekit_hidden_size": int | None},
            "model_type": f"prunekit_{family}",
            "prunekit_layers": None,
            "prunekit_base_model_type": family,
            "prunekit_hidden_size": None,  # None: the residual stream has the config's full width
        })
    return _CLASSES[key]


def pruned_model_class(base: type, build: Callable[[nn.Module, object], None], module: str) -> type:
    """``base`` (e.g. LlamaForCausalLM) built at the widths of its config's ``prunekit_layers`` by
    ``build``; the class belongs to ``module`` (the family's modeling file)."""
    name = "Pruned" + base.__name__
    key = (module, name)
    if key not in _CLASSES:
        def __init__(self, config, *args, **kwargs):
            # Heads that build their base model with AutoModel.from_config (transformers' generic
            # *ForSequenceClassification) must find the pruned base class, not ask for remote code.
            # (Only for prunekit's config class: AutoModel.register refuses any other.)
            base_model = MODEL_MAPPING[base.config_class] if base.config_class in MODEL_MAPPING else None
            if base_model not in (None, base) and type(config).__name__ == "Prunekit" + base.config_class.__name__:
                AutoModel.register(type(config), pruned_model_class(base_model, build, module), exist_ok=True)
            base.__init__(self, config, *args, **kwargs)
            build(self, config)

        _CLASSES[key] = type(name, (base,), {
            "__init__": __init__, "__module__": module,
            "config_class": pruned_config_class(base.config_class),
            "__doc__": f"{base.__name__} at the widths prunekit pruned it to.",
        })
    return _CLASSES[key]


def model_class_named(name: str, module: str, builders: dict[str, Callable[[nn.Module, object], None]]) -> type:
    """``Pruned<Model>`` for a modeling file's module ``__getattr__``: the transformers class after
    the prefix, built by the builder of its family (``builders``, by model_type); AttributeError
    for any other name."""
    base = getattr(transformers, name[len("Pruned"):], None) if name.startswith("Pruned") else None
    family = getattr(getattr(base, "config_class", None), "model_type", None)
    if not isinstance(base, type) or family not in builders:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    return pruned_model_class(base, builders[family], module)


def __getattr__(name: str) -> type:
    # auto_map names PrunekitLlamaConfig, PrunekitBertConfig, ...: made here on first use.
    base = getattr(transformers, name[len("Prunekit"):], None) if name.startswith("Prunekit") else None
    if isinstance(base, type) and issubclass(base, transformers.PreTrainedConfig) and name.endswith("Config"):
        return pruned_config_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- shared by the families' builders and placeholders -------------------------------------------
def added_bias(shape: dict | None, kind: str) -> bool:
    """Whether a layer's ``prunekit_layers`` entry gives sublayer ``kind`` ("attention" or "ffn")
    an output bias its family lacks."""
    return bool(shape and shape.get(f"{kind}_out_bias"))


def layer_shapes(config, num_layers: int) -> list[dict | None]:
    """The config's ``prunekit_layers``, one entry per layer (None: the layer at full width)."""
    layers = getattr(config, "prunekit_layers", None) or []
    if not isinstance(layers, list):
        raise ValueError("prunekit_layers in config.json must be a list with one entry per layer")
    if layers and len(layers) != num_layers:
        raise ValueError(f"prunekit_layers lists {len(layers)} layers but the model has {num_layers}")
    return layers or [None] * num_layers


def new_param(module: nn.Module, name: str, shape: tuple[int, ...]) -> None:
    """Replace ``module.<name>`` (when it has one) by an uninitialised parameter of ``shape``."""
    old = getattr(module, name, None)
    if old is not None:
        setattr(module, name, nn.Parameter(torch.empty(shape, device=old.device, dtype=old.dtype)))


def linear_like(old: nn.Linear, in_features: int, out_features: int, added_bias: bool = False) -> nn.Linear:
    """A new (placeholder) linear of these widths, with ``old``'s device and dtype and a bias where
    ``old`` has one or ``added_bias`` says the pruned model has one its family lacks (an output
    bias a method added: ``attention_out_bias`` / ``ffn_out_bias`` in ``prunekit_layers``)."""
    return nn.Linear(in_features, out_features, bias=old.bias is not None or added_bias, device=old.weight.device,
                     dtype=old.weight.dtype)


def narrow_input(linear: nn.Linear, width: int) -> None:
    new_param(linear, "weight", (linear.out_features, width))
    linear.in_features = width


def narrow_norm(norm: nn.Module, width: int) -> None:
    """A LayerNorm (weight and bias) or RMSNorm (weight) at ``width``."""
    new_param(norm, "weight", (width,))
    new_param(norm, "bias", (width,))
    if hasattr(norm, "normalized_shape"):
        norm.normalized_shape = (width,)


def narrow_embedding(table: nn.Embedding, width: int) -> None:
    new_param(table, "weight", (table.num_embeddings, width))
    table.embedding_dim = width


def zero_bias(linear: nn.Module, width: int, added: bool = False) -> torch.Tensor | None:
    """A placeholder output bias of ``width`` for an emptied sublayer whose output linear has one,
    or that was given one its family lacks (``added``, as in :func:`linear_like`)."""
    like = getattr(linear, "bias", None)
    if like is None and not added:
        return None
    like = like if like is not None else linear.weight
    return torch.zeros(width, device=like.device, dtype=like.dtype)


def record_length(cache, hidden_states: torch.Tensor, layer_idx: int) -> None:
    """Give the cache one placeholder key/value head of width 1 for ``hidden_states``' tokens, so
    that its sequence length (which the model reads for positions and masks) stays right when a
    layer's attention is emptied or removed."""
    placeholder = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
    cache.update(placeholder, placeholder, layer_idx)


class SkippedNorm(nn.Module):
    """Where an emptied or removed pre-norm sublayer's norm was (or a removed post-norm one's):
    nothing reads its output but that sublayer, which ignores it."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states
