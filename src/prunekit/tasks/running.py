"""What every family's evaluation loop needs from a model: where it lives and which inputs it takes."""

from __future__ import annotations

import inspect

import torch

__all__ = ["MODEL_INPUTS", "accepted_inputs", "model_device"]

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def accepted_inputs(model: torch.nn.Module) -> set[str]:
    """Which of input_ids / attention_mask / token_type_ids the model's forward takes by name.

    DistilBERT, for one, has no token_type_ids; passing them would fail.
    """
    parameters = inspect.signature(model.forward).parameters
    named = {name for name, p in parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    accepted = {name for name in MODEL_INPUTS if name in named}
    return accepted or set(MODEL_INPUTS)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without any)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
