"""CoFi's exact target projection (cofi.md §8, pitfall 5; issue 11).

The Lagrangian drives the *expected* size to the target, but the deterministic gates round per
group, and a short or unlucky run can end far from it (a too-short warm-up once kept 0.915 of the
parameters for a target of 0.3). So that the saved model always meets the budget the user gave,
the deterministic structure is projected onto the target when it is off: every head and neuron is
ranked by its gate score (log keep probability of the unit and of its sublayer gate), and units
are taken in that order, at their cost under the size model, while they fit the budget. The
result keeps at most the target and misses it by less than the smallest unit that did not fit.
Hidden dimensions keep their own (deterministic) choice, widened in log α order only when even
every unit at that width could not reach the target.
"""

from __future__ import annotations

from typing import Any

import torch

from prunekit.core.view import ModelAdapter
from prunekit.methods.cofi.l0 import SOFT_FACTOR, TEMPERATURE, CofiGates, GateValues, _on, keep_probability
from prunekit.methods.cofi.size import SizeModel


def structure_size(values: GateValues, sizer: SizeModel, adapter: ModelAdapter) -> float:
    """The exact size (parameters or FLOPs, as ``sizer.kind``) of the model the deterministic
    ``values`` leave after surgery: the size model's units plus, for parameters, the output bias
    (one per hidden dim) of every sublayer that stays."""
    heads = [_count(u, on) for u, on in zip(values.head, values.attn_on, strict=True)]
    neurons = [_count(u, on) for u, on in zip(values.neuron, values.ffn_on, strict=True)]
    hidden = int((values.hidden != 0).sum()) if values.hidden is not None else sizer.hidden
    total = float(sizer.size(heads, neurons, hidden))
    if sizer.kind == "params":
        total += hidden * _sublayers_left(values, adapter)
    return total


def project_to_target(gates: CofiGates, values: GateValues, sizer: SizeModel, adapter: ModelAdapter,
                      target_sparsity: float, tolerance: float) -> tuple[GateValues, dict[str, Any]]:
    """``values`` unchanged when their structure keeps at most the target and misses it by no more
    than ``tolerance`` (a fraction of the full size); else the projected values. Returns the values
    and a log: target, kept before and after, whether the projection was applied."""
    full = sizer.full
    budget = (1.0 - target_sparsity) * full
    before = structure_size(values, sizer, adapter)
    info: dict[str, Any] = {"kind": sizer.kind, "target_keep": 1.0 - target_sparsity, "keep_before": before / full}
    if before <= budget * (1 + 1e-12) and budget - before <= tolerance * full:
        return values, {**info, "applied": False, "keep_after": before / full}
    hidden_keep = _hidden_choice(gates, values, sizer, adapter, budget)
    h = int(hidden_keep.numel()) if hidden_keep is not None else sizer.hidden
    chosen = _choose_units(gates, values, sizer, adapter, budget, h)
    projected = _values_for(gates, values, chosen, hidden_keep)
    after = structure_size(projected, sizer, adapter)
    return projected, {**info, "applied": True, "keep_after": after / full}


# ---- helpers ----------------------------------------------------------------------------------------------
def _count(units: torch.Tensor | None, on: bool) -> int:
    return int((units != 0).sum()) if units is not None and on else 0


def _sublayers_left(values: GateValues, adapter: ModelAdapter) -> int:
    """Sublayers that stay after surgery: gated ones still on, ungated ones not removed (empty)."""
    left = 0
    for layer in range(len(values.head)):
        for units, on, kind in ((values.head[layer], values.attn_on[layer], "attn"),
                                (values.neuron[layer], values.ffn_on[layer], "ffn")):
            left += on if units is not None else not adapter.is_removed(layer, kind)
    return left


def _max_size(gates: CofiGates, sizer: SizeModel, adapter: ModelAdapter, values: GateValues, h: int) -> float:
    """The size at hidden width ``h`` with every gated unit open."""
    heads = [g.numel() for g in gates.head]
    neurons = [g.numel() for g in gates.neuron]
    total = float(sizer.size(heads, neurons, h))
    if sizer.kind == "params":
        everything = GateValues(head=values.head, mha=values.mha, neuron=values.neuron, ffn=values.ffn,
                                hidden=values.hidden, attn_on=[u is not None for u in values.head],
                                ffn_on=[u is not None for u in values.neuron])
        total += h * _sublayers_left(everything, adapter)
    return total


def _hidden_choice(gates: CofiGates, values: GateValues, sizer: SizeModel, adapter: ModelAdapter,
                   budget: float) -> torch.Tensor | None:
    """Sorted kept hidden dims: the deterministic ones, or more (highest log α first) when even
    every unit at that width stays below the budget."""
    if values.hidden is None:
        return None
    log_alpha = gates.hidden.detach().float()
    order = torch.argsort(log_alpha, descending=True, stable=True)
    h = max(1, int((values.hidden != 0).sum()))
    while h < log_alpha.numel() and _max_size(gates, sizer, adapter, values, h) < budget:
        h += 1
    return torch.sort(order[:h]).values


def _log_keep(log_alpha: torch.Tensor) -> torch.Tensor:
    return torch.log(keep_probability(log_alpha.detach().float()))


def _choose_units(gates: CofiGates, values: GateValues, sizer: SizeModel, adapter: ModelAdapter, budget: float,
                  h: int) -> dict[tuple[str, int], list[int]]:
    """Greedy by gate score: (kind, layer) -> chosen unit indices, fitting ``budget`` at width ``h``."""
    candidates: list[tuple[float, int, str, int, int]] = []  # (-score, order, kind, layer, index)
    for kind, groups, layer_gates in (("attn", gates.head, gates.mha), ("ffn", gates.neuron, gates.ffn)):
        for layer, group in enumerate(groups):
            if group.numel() == 0:
                continue
            score = _log_keep(group)
            if layer_gates[layer].numel():
                score = score + _log_keep(layer_gates[layer])[0]
            for index, value in enumerate(score.tolist()):
                candidates.append((-value, len(candidates), kind, layer, index))
    candidates.sort()
    fixed = h if sizer.kind == "params" else 0.0  # a sublayer's output bias, paid by its first unit
    used = _ungated_size(values, sizer, adapter, h)
    chosen: dict[tuple[str, int], list[int]] = {}
    for _, _, kind, layer, index in candidates:
        table = sizer.head if kind == "attn" else sizer.neuron
        cost = table[layer][0] + table[layer][1] * h
        if (kind, layer) not in chosen:
            cost += fixed
        if used + cost <= budget * (1 + 1e-12):
            chosen.setdefault((kind, layer), []).append(index)
            used += cost
    return chosen


def _ungated_size(values: GateValues, sizer: SizeModel, adapter: ModelAdapter, h: int) -> float:
    """What stays whatever the gates say: the output biases of empty (ungated, not removed) sublayers."""
    if sizer.kind != "params":
        return 0.0
    count = sum(not adapter.is_removed(layer, kind)
                for layer in range(len(values.head))
                for units, kind in ((values.head[layer], "attn"), (values.neuron[layer], "ffn")) if units is None)
    return float(h * count)


def _soft(log_alpha: torch.Tensor) -> torch.Tensor:
    """The deterministic value of an open gate (as prunekit.methods.cofi.l0.deterministic_gate gives it)."""
    return torch.sigmoid(SOFT_FACTOR * log_alpha.detach().float() / TEMPERATURE)


def _values_for(gates: CofiGates, values: GateValues, chosen: dict[tuple[str, int], list[int]],
                hidden_keep: torch.Tensor | None) -> GateValues:
    """Gate values that open exactly the chosen units (their deterministic value where they had
    one, else their soft value) and the chosen hidden dims (binary, as deterministic hidden gates)."""

    def units(kind: str, groups, old: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        for layer, current in enumerate(old):
            if current is None:
                out.append(None)
                continue
            soft = _soft(groups[layer]).to(current)
            new = torch.zeros_like(current)
            index = torch.tensor(chosen.get((kind, layer), []), dtype=torch.long, device=current.device)
            new[index] = torch.where(current[index] != 0, current[index], soft[index])
            out.append(new)
        return out

    def layer_values(kind: str, groups, old: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        out = []
        for layer, current in enumerate(old):
            if current is not None and float(current) == 0.0 and chosen.get((kind, layer)):
                current = _soft(groups[layer])[0].to(current)  # reopened: its soft value
            out.append(current)
        return out

    head = units("attn", gates.head, values.head)
    neuron = units("ffn", gates.neuron, values.neuron)
    mha = layer_values("attn", gates.mha, values.mha)
    ffn = layer_values("ffn", gates.ffn, values.ffn)
    hidden = values.hidden
    if hidden is not None and hidden_keep is not None:
        hidden = torch.zeros_like(values.hidden)
        hidden[hidden_keep.to(hidden.device)] = 1.0
    return GateValues(
        head=head, mha=mha, neuron=neuron, ffn=ffn, hidden=hidden,
        attn_on=[_on(u, g) for u, g in zip(head, mha, strict=True)],
        ffn_on=[_on(u, g) for u, g in zip(neuron, ffn, strict=True)],
    )  # fmt: skip


__all__ = ["project_to_target", "structure_size"]
