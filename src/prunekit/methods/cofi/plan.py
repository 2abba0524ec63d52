"""From CoFi's deterministic gates to a :class:`prunekit.core.surgery.PruningPlan` (cofi.md §7, §8)."""

from __future__ import annotations

import torch
from torch import nn

from prunekit.core.surgery import LayerPlan, PruningPlan, slice_linear
from prunekit.core.view import ModelAdapter
from prunekit.methods.cofi.l0 import GateValues


def gate_plan(adapter: ModelAdapter, values: GateValues) -> PruningPlan:
    """The plan that folds deterministic gate values into ``model``'s weights and removes what they
    close (applied by :func:`prunekit.core.surgery.apply_plan`, the one surgery path).

    Layer gates scale the output projection and its bias (what the gated model computes); head and
    neuron values are folded as unit scales; a sublayer that is off is removed (the identity);
    hidden dims whose gate is 0 are cut everywhere (their kept values are exactly 1).
    """
    plan = PruningPlan(layers=[LayerPlan() for _ in range(adapter.num_layers)])
    for layer in range(adapter.num_layers):
        step = plan.layers[layer]
        for kind, units, gate, on in (("attn", values.head[layer], values.mha[layer], values.attn_on[layer]),
                                      ("ffn", values.neuron[layer], values.ffn[layer], values.ffn_on[layer])):
            if units is None:
                continue  # no gates here (already removed or empty)
            if not on:
                if kind == "attn":
                    step.attention_removed = True
                else:
                    step.ffn_removed = True
                continue
            scales = units.detach()
            keep = torch.nonzero(scales).flatten().tolist()
            gate = gate.detach() if gate is not None else None
            if kind == "attn":
                step.heads, step.head_scales, step.attention_gate = keep, scales, gate
            else:
                step.neurons, step.neuron_scales, step.ffn_gate = keep, scales, gate
    if values.hidden is not None:
        keep = torch.nonzero(values.hidden).flatten().cpu()
        if keep.numel() < values.hidden.numel():
            plan.hidden = keep.tolist()
    return plan


def narrow_transform(transform: nn.Linear | None, plan: PruningPlan) -> nn.Linear | None:
    """W_layer narrowed to the plan's kept hidden dims (its inputs are the student's hidden states)."""
    if transform is None or plan.hidden is None:
        return transform
    return slice_linear(transform, torch.as_tensor(plan.hidden), dim=1)
