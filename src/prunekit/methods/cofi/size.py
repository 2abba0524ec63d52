"""The size CoFi constrains (cofi.md §2): expected or actual prunable parameters or FLOPs as a
function of the kept heads, neurons and hidden dims, and the sparsity it gives."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from prunekit.core.accounting import full_flops, full_prunable_params, unit_costs
from prunekit.core.errors import ModelError
from prunekit.core.view import ModelAdapter
from prunekit.methods.cofi.l0 import CofiGates, GateValues


class SizeModel:
    """The size CoFi constrains, as a function of kept units: prunable encoder parameters (cofi.md §2:
    4·d_h per kept (head, hidden dim) pair, 2 per kept (neuron, hidden dim) pair, plus the units'
    biases, against all encoder weights and biases) or encoder FLOPs (the core's accounting, linear
    in the kept hidden size)."""

    def __init__(self, adapter: ModelAdapter, kind: str, seq_len: float) -> None:
        self.kind = kind
        self.hidden = adapter.hidden_size
        if adapter.grouped_kv:
            raise ModelError(f"CoFi gates query heads only; {adapter.family} shares key/value heads between "
                             "query heads, which its size model and gates do not cover yet")
        facts = adapter.facts
        if kind == "params":
            # (fixed, per kept hidden dim): a head owns 4·d_h weights per hidden dim (Q, K, V rows,
            # O columns) and d_h biases for each of Q, K, V that has one; a neuron 2 weights per
            # hidden dim (3 with a gate) and its FFN-in (and gate) bias where there is one. The
            # spec's formula drops the biases; with them a fully open model counts ~0 sparsity.
            head_biases = sum(facts.has_bias(name) for name in ("query", "key", "value"))
            ffn_in = ("up", "gate") if facts.gated_ffn else ("up",)
            neuron_biases = sum(facts.has_bias(name) for name in ffn_in)
            self.full = float(full_prunable_params(adapter))
            self.head = [(float(head_biases * adapter.head_dim), float(4 * adapter.head_dim))] * adapter.num_layers
            self.neuron = [(float(neuron_biases), float(len(ffn_in) + 1))] * adapter.num_layers
        else:
            self.full = full_flops(adapter, seq_len)
            self.head, self.neuron = [], []
            for layer in range(adapter.num_layers):
                at0 = unit_costs(adapter, layer, seq_len, hidden_size=0)
                at1 = unit_costs(adapter, layer, seq_len, hidden_size=1)
                self.head.append((at0.head, at1.head - at0.head))
                self.neuron.append((at0.neuron, at1.neuron - at0.neuron))

    def size(self, heads: Sequence[Any], neurons: Sequence[Any], hidden: Any) -> Any:
        """Size for (expected or actual) kept counts; works on tensors (differentiable) and floats."""
        hidden = self.hidden if hidden is None else hidden
        total = 0.0
        for layer, (h, n) in enumerate(zip(heads, neurons, strict=True)):
            total = total + h * (self.head[layer][0] + self.head[layer][1] * hidden)
            total = total + n * (self.neuron[layer][0] + self.neuron[layer][1] * hidden)
        return total

    def expected_sparsity(self, gates: CofiGates) -> torch.Tensor:
        """ŝ = 1 − E[size | log α] / M, differentiable in the gates (the Lagrangian's constraint)."""
        counts = gates.expected_counts()
        return 1.0 - self.size(counts["heads"], counts["neurons"], counts["hidden"]) / self.full

    def sparsity(self, values: GateValues) -> float:
        """Sparsity of the deterministic structure (closed units and sublayers removed)."""
        kept = gate_summary(values)
        return 1.0 - float(self.size(kept["heads"], kept["neurons"], kept["hidden"])) / self.full


def gate_summary(values: GateValues) -> dict[str, Any]:
    """What deterministic gate values keep: per layer the open heads and neurons (0 where the
    sublayer is off), which gated sublayers are removed, and the open hidden dims (None: ungated)."""
    return {
        "heads": [int((u != 0).sum()) if u is not None and on else 0 for u, on in zip(values.head, values.attn_on, strict=True)],
        "neurons": [int((u != 0).sum()) if u is not None and on else 0
                    for u, on in zip(values.neuron, values.ffn_on, strict=True)],
        "attention_removed": [u is not None and not on for u, on in zip(values.head, values.attn_on, strict=True)],
        "ffn_removed": [u is not None and not on for u, on in zip(values.neuron, values.ffn_on, strict=True)],
        "hidden": int((values.hidden != 0).sum()) if values.hidden is not None else None,
    }  # fmt: skip
