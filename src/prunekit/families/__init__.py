"""Model adapters: the only code that knows Hugging Face module names (style.md §4).

``ADAPTERS`` maps a config ``model_type`` to its adapter class; it is filled here, once.
"""

from __future__ import annotations

import copy
import difflib

from torch import nn

from prunekit.core.errors import ModelError
from prunekit.core.view import (
    PROJECTIONS,
    AttentionParts,
    BlockFacts,
    CausalLmParts,
    FfnParts,
    LayerShape,
    ModelAdapter,
    NormKind,
    NormPlacement,
    SublayerKind,
)
from prunekit.families.bert import BertAdapter
from prunekit.families.distilbert import DistilBertAdapter
from prunekit.families.gemma import Gemma2Adapter, Gemma3Adapter
from prunekit.families.gpt2 import GPT2Adapter
from prunekit.families.llama import LlamaAdapter, MistralAdapter
from prunekit.families.opt import OPTAdapter
from prunekit.families.phi3 import Phi3Adapter
from prunekit.families.qwen2 import Qwen2Adapter
from prunekit.families.qwen3 import Qwen3Adapter
from prunekit.families.roberta import RobertaAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {
    model_type: adapter
    for adapter in (
        BertAdapter,
        RobertaAdapter,
        DistilBertAdapter,
        LlamaAdapter,
        MistralAdapter,
        Qwen2Adapter,
        Qwen3Adapter,
        Gemma2Adapter,
        Gemma3Adapter,
        Phi3Adapter,
        OPTAdapter,
        GPT2Adapter,
    )
    for model_type in adapter.model_types
}
# Variants of supported families that prunekit refuses, by model_type: (family, the feature it lacks).
REFUSED: dict[str, tuple[str, str]] = {
    model_type: (adapter.family, feature)
    for adapter in set(ADAPTERS.values())
    for model_type, feature in adapter.refused_model_types.items()
}


def supported_models() -> list[str]:
    """Names of every Hugging Face model class prunekit can prune."""
    return sorted(cls.__name__ for adapter in set(ADAPTERS.values()) for cls in adapter.model_classes.values())


def base_model_type(config) -> str:
    """The family's model_type, also for prunekit's own pruned configs (``prunekit_bert`` -> ``bert``)."""
    return getattr(config, "prunekit_base_model_type", None) or getattr(config, "model_type", "")


def adapter_class(model: nn.Module) -> type[ModelAdapter]:
    """The adapter class for ``model``; a clear ModelError for anything prunekit does not support.
    Looks only: the model is not changed."""
    config = getattr(model, "config", None)
    model_type = base_model_type(config) if config is not None else ""
    if model_type in REFUSED:
        family, feature = REFUSED[model_type]
        raise ModelError(f"prunekit does not support {type(model).__name__}: {feature} "
                         f"(model_type {model_type!r}, a variant of the {family} family)")
    adapter_cls = ADAPTERS.get(model_type)
    accepted = tuple(adapter_cls.model_classes.values()) if adapter_cls else ()
    if adapter_cls is None or not isinstance(model, accepted):
        hint = ""
        close = difflib.get_close_matches(model_type, list(ADAPTERS), n=1)
        if close and model_type:
            hint = f" (model_type {model_type!r}; did you mean {close[0]!r}?)"
        raise ModelError(
            f"prunekit does not support {type(model).__name__}{hint}. Supported model classes: "
            f"{', '.join(supported_models())}. Load a fine-tuned model with one of these heads, "
            "e.g. AutoModelForSequenceClassification.from_pretrained(...)."
        )
    return adapter_cls


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The view of a model prunekit owns (a copy, a model it loaded): the model is put in its
    family's working form in place (GPT-2's Conv1D as Linear, OPT's blocks), then viewed. For a
    caller's model use :func:`pruning_view`, which never changes it."""
    return _view(adapter_class(model), model)


def pruning_view(model: nn.Module, copied: bool = False) -> ModelAdapter:
    """The view the pipeline works on for a caller's ``model``: the model itself when its family
    reads the stock modules, else (or when ``copied``) a deep copy in working form, so the caller's
    model is never changed (its module types, parameters and any optimizer built on them stay as
    they are). Unsupported models are refused before anything is copied."""
    adapter_cls = adapter_class(model)
    if copied or adapter_cls.changes_modules:
        model = copy.deepcopy(model)
    return _view(adapter_cls, model)


def _view(adapter_cls: type[ModelAdapter], model: nn.Module) -> ModelAdapter:
    adapter = adapter_cls(model)  # checks the config before any module is touched
    adapter_cls.to_working_form(model)
    return adapter


__all__ = [
    "ADAPTERS",
    "REFUSED",
    "PROJECTIONS",
    "AttentionParts",
    "BlockFacts",
    "CausalLmParts",
    "FfnParts",
    "LayerShape",
    "ModelAdapter",
    "NormKind",
    "NormPlacement",
    "SublayerKind",
    "base_model_type",
    "adapter_class",
    "get_adapter",
    "pruning_view",
    "supported_models",
]
