"""CoFi's student: the model with its gates and W_layer as one module (cofi.md §3), below the
training loop, the distillation loss and the checkpoints that all hold it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prunekit.core.masks import GateHolder
from prunekit.core.view import ModelAdapter
from prunekit.methods.cofi.l0 import CofiGates


class CofiStudent(nn.Module):
    """The student model with its gates and the layer-distillation map W_layer, as one module so
    that data parallelism sees every trained parameter. Gates act through hooks installed by
    :func:`prunekit.core.masks.apply_gates` reading ``holder``."""

    def __init__(self, view: ModelAdapter, gates: CofiGates | None, transform: nn.Linear | None) -> None:
        super().__init__()
        self.model = view.model
        self.view = view  # the model's view, built once by the run (not a module: nothing to train)
        self.gates = gates
        self.transform = transform
        self.holder = GateHolder()
        self.gated = False  # False before pruning starts: the model runs ungated

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        if self.gates is not None and self.gated:
            self.holder.values = self.gates.sample() if self.training else self.gates.deterministic()
        else:
            self.holder.values = None
        return self.model(**batch, output_hidden_states=True)
