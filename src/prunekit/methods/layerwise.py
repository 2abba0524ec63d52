"""Run a model one layer at a time, through the model's own forward.

Layer-wise methods (Kprune's sublayer loop, Kwon et al.'s mask tuning) keep per-batch hidden states
at a layer boundary and run only the layers above it. Rather than re-implement each family's
forward (attention-mask construction, task heads), the runner temporarily swaps the layers below
the start for pass-through modules and injects the cached hidden states; a hook that raises stops
the forward early when only one layer's output is wanted. Everything is restored in ``finally``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from prunekit.core.view import ModelAdapter, SublayerKind
from prunekit.tasks.losses import LmOutputs

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys of a batch the model's forward takes (labels and bookkeeping removed)."""
    return {key: batch[key] for key in MODEL_INPUTS if key in batch}


class _Stop(Exception):
    pass


class _PassThrough(nn.Module):
    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class _Inject(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.value: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.value


class _Recomputed(nn.Module):
    """A layer run under ``torch.utils.checkpoint``: its intermediate tensors are made again in the
    backward pass instead of kept from the forward pass. Other attributes are the layer's (the
    model's forward may read some, e.g. a layer's attention type)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.layer, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.layer(*args, **kwargs)
        return checkpoint(self.layer, *args, use_reentrant=False, **kwargs)


class LayerRunner:
    """Feeds cached hidden states into layer ``l`` of a model and runs from there."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter) -> None:
        self.model = model
        self.adapter = adapter

    @contextmanager
    def starting_at(self, layer: int) -> Iterator[_Inject]:
        """Inside the block, the model's forward starts at ``layer`` with ``inject.value`` as input."""
        layers = self.adapter.layers()
        saved = [layers[i] for i in range(layer)]
        inject = _Inject()
        try:
            for i in range(layer - 1):
                layers[i] = _PassThrough()
            if layer > 0:
                layers[layer - 1] = inject
            yield inject
        finally:
            for i, module in enumerate(saved):
                layers[i] = module

    @contextmanager
    def recomputed_layers(self) -> Iterator[None]:
        """Inside the block, a backward pass keeps each layer's input and not its intermediate
        tensors, which it makes again, one layer at a time (one more forward pass of the model):
        memory of L layer inputs plus one layer's intermediates instead of L layers' (a causal LM's
        FFN and attention intermediates are ~25 times its hidden size per token and layer: 7 GB for
        4,096 tokens through SmolLM2-135M's 30 layers). The same gradients. Only for passes whose
        hooks compute without counting: they fire again in the recomputation."""
        layers = self.adapter.layers()
        saved = list(layers)
        try:
            for i, module in enumerate(saved):
                layers[i] = _Recomputed(module)
            yield
        finally:
            for i, module in enumerate(saved):
                layers[i] = module

    def forward_from(self, layer: int, hidden: torch.Tensor | None, batch: Mapping[str, torch.Tensor]) -> Any:
        """The model's full output, computed from ``hidden`` at the input of ``layer``."""
        with self.starting_at(layer) as inject:
            inject.value = hidden
            return self.model(**model_inputs(batch))

    def outputs_from(self, layer: int, hidden: torch.Tensor | None, batch: Mapping[str, torch.Tensor],
                     kind: str) -> Any:
        """What the loss of task kind ``kind`` reads (``prunekit.tasks.losses``), computed from
        ``hidden`` at the input of ``layer`` (layer 0: from the embeddings, ``hidden`` unused): the
        model's own output, except for a causal LM ("lm"), whose logits (tokens x vocabulary) are
        not made here: its final hidden states and output head (``LmOutputs``), from which the
        losses make them a chunk of positions at a time."""
        if kind != "lm":
            return self.forward_from(layer, hidden, batch)
        parts = self.adapter.causal_lm_parts(self.model)
        with self.starting_at(layer) as inject:
            inject.value = hidden
            return LmOutputs(parts.final_hidden(**model_inputs(batch)), parts.head)

    def layer_input(self, layer: int, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The input of ``layer`` for ``batch``, computed from the embeddings (B, T, d)."""
        captured: list[torch.Tensor] = []

        def hook(module, args):
            captured.append(args[0])
            raise _Stop

        handle = self.adapter.layers()[layer].register_forward_pre_hook(hook)
        try:
            self.model(**model_inputs(batch))
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured[0]

    def run_layer(self, layer: int, hidden: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Output of ``layer`` given its input ``hidden`` (B, T, d) -> (B, T, d)."""
        captured: list[torch.Tensor] = []

        def hook(module, args, output):
            captured.append(output[0] if isinstance(output, tuple) else output)
            raise _Stop

        handle = self.adapter.layers()[layer].register_forward_hook(hook)
        try:
            self.forward_from(layer, hidden, batch)
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured[0]


@contextmanager
def capture_residual(adapter: ModelAdapter, layer: int, kind: SublayerKind) -> Iterator[dict[str, torch.Tensor]]:
    """Record a sublayer's input X (B, T, d) and what it adds to X: its output projection's
    output O = Z Wᵀ + b, or norm_out(O) where the family normalises sublayer outputs
    (``ModelAdapter.sublayer_output_norm``, Gemma).

    The residual sum before the LayerNorm is then ``X + O`` (spec §1.3).
    """
    record: dict[str, torch.Tensor] = {}
    parts = adapter.sublayer(layer, kind)
    if parts is None:
        raise ValueError(f"layer {layer} {kind} sublayer is empty; nothing to capture")
    added = adapter.sublayer_output_norm(layer, kind)  # what the block adds to X: O, or norm_out(O)
    added = parts.output if added is None else added

    def take_input(module, args):
        record["input"] = args[0].detach()

    def take_output(module, args, output):
        record["output"] = output.detach()

    handles = [
        adapter.sublayer_module(layer, kind).register_forward_pre_hook(take_input),
        added.register_forward_hook(take_output),
    ]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()
