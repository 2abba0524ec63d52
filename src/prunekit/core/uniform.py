"""``--uniform``: turn a method's plan into one where every layer keeps the same number of key/value
groups, query heads per group and FFN neurons, so the pruned model is the family's stock class
(``prunekit.io.folders.as_stock_model``) that loads with no prunekit and no remote code.

What it does (a post-step on the method's plan, the same for every method):

1. The plan's cost, summed over layers, in the budget's own measure: FLOPs at the run's length
   (``prunekit.core.accounting.unit_costs``: a query head, a key/value head, a neuron) or, for a
   parameter budget, parameters (2·d·d_h per query head and per key/value head, 2 or 3·d per neuron).
2. The uniform widths spending at most that: the attention (g groups of q query heads, at least
   one of each, a shape the family's stock config accepts) closest to the plan's attention cost,
   then as many neurons per layer (at least one) as the rest of the plan's cost pays for. So the
   budget the method met is still met (when even one head, one group and one neuron per layer
   cost more than the plan, the result says so: ``over_budget``).
3. Per layer, which units: the method's own choice ranks first (units it kept before units it
   dropped; groups by how many of their query heads it kept), ties broken by weight magnitude
   (a head's output-projection columns, a neuron's down column times its up row).

The plan's unit scales and sublayer gates carry over. A re-fitted output projection (Kprune's
least-squares fit of the kept units) belongs to the set it was fitted for: it is kept where a
layer's kept set is unchanged and dropped where it changed (the sliced teacher weight is used,
as magnitude pruning does); ``refits_dropped`` in the log counts them. A compensated output bias
(FLAP) is kept where the kept set is unchanged and the family has that bias, else dropped
(``biases_dropped``): the stock config has no place for a bias the family lacks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from prunekit.core.accounting import UnitCosts, count_non_embedding_params, full_flops, unit_costs
from prunekit.core.errors import ConfigError
from prunekit.core.surgery import LayerPlan, PruningPlan
from prunekit.core.view import ModelAdapter


def uniform_plan(adapter: ModelAdapter, plan: PruningPlan, seq_len: float | None = None,
                 keep: float | None = None) -> tuple[PruningPlan, dict[str, Any]]:
    """The uniform form of ``plan`` for the (unpruned) model of ``adapter``; ``seq_len`` None
    prices units by parameters, else by FLOPs at that length. ``keep`` (the budget, in the same
    measure) caps the uniform widths when the plan's cost would not: fewer neurons, then the
    smallest attention shape, so the uniform model meets the budget itself (the method's plan
    may have removed whole sublayers, with their norms, which no uniform shape can). Returns the
    plan and a log."""
    _check_uniform_family(adapter)
    if plan.hidden is not None or plan.weights is not None:
        raise ConfigError("--uniform keeps the full hidden size and the method's own weights; this plan narrows "
                          "the residual stream or trains weights (CoFi): prune without --uniform")
    layers = adapter.num_layers
    cost = _unit_cost(adapter, seq_len)
    steps = list(plan.layers) + [LayerPlan() for _ in range(layers - len(plan.layers))]
    kept_heads = [_heads_of(adapter, layer, step) for layer, step in enumerate(steps)]
    kept_neurons = [_neurons_of(adapter, step) for step in steps]
    size = adapter.full_num_heads // adapter.full_num_kv_heads
    kept_groups = [sorted({h // size for h in heads}) for heads in kept_heads]
    attention = sum(len(h) * cost.head + len(g) * cost.kv_head for h, g in zip(kept_heads, kept_groups, strict=True))
    total = attention + sum(len(n) * cost.neuron for n in kept_neurons)

    groups, per_group = _attention_shape(adapter, attention / layers, cost)
    left = total / layers - groups * per_group * cost.head - groups * cost.kv_head
    neurons = min(adapter.full_intermediate_size, max(1, math.floor(left / cost.neuron + 1e-9)))
    uniform_cost = layers * (groups * per_group * cost.head + groups * cost.kv_head + neurons * cost.neuron)
    limit = None if keep is None else _units_limit(adapter, keep, seq_len, cost)
    if limit is not None and uniform_cost > limit * (1 + 1e-9):
        # Over the budget itself (not only over the plan's cost): shrink to meet it where a shape can.
        shapes = [(groups, per_group), _smallest_shape(adapter, cost)]
        for shape in shapes:
            attention_price = shape[0] * shape[1] * cost.head + shape[0] * cost.kv_head
            fit = math.floor((limit / layers - attention_price) / cost.neuron + 1e-9)
            if fit >= 1:
                break
        groups, per_group = shape
        neurons = min(neurons, max(1, fit))
        uniform_cost = layers * (groups * per_group * cost.head + groups * cost.kv_head + neurons * cost.neuron)

    new_layers, dropped, biases_dropped = [], 0, 0
    for layer, step in enumerate(steps):
        heads = _choose_heads(adapter, layer, step, set(kept_heads[layer]), groups, per_group)
        chosen_neurons = _choose_neurons(adapter, layer, set(kept_neurons[layer]), neurons)
        same_heads, same_neurons = heads == sorted(kept_heads[layer]), chosen_neurons == sorted(kept_neurons[layer])
        dropped += (step.attention_out_weight is not None and not same_heads) + (
            step.ffn_out_weight is not None and not same_neurons)
        # A compensated output bias (FLAP) belongs to its kept set too, and one the family lacks has
        # no place in the stock config: kept only where both hold.
        keep_attn_bias = same_heads and adapter.facts.has_bias("out")
        keep_ffn_bias = same_neurons and adapter.facts.has_bias("down")
        biases_dropped += (step.attention_out_bias is not None and not keep_attn_bias) + (
            step.ffn_out_bias is not None and not keep_ffn_bias)
        new_layers.append(dataclasses.replace(
            step, heads=heads, neurons=chosen_neurons, kv_groups=None, attention_removed=False, ffn_removed=False,
            attention_out_weight=step.attention_out_weight if same_heads else None,
            ffn_out_weight=step.ffn_out_weight if same_neurons else None,
            attention_out_bias=step.attention_out_bias if keep_attn_bias else None,
            ffn_out_bias=step.ffn_out_bias if keep_ffn_bias else None))
    log = {"kv_groups": groups, "query_heads_per_group": per_group, "query_heads": groups * per_group,
           "neurons": neurons, "measure": "params" if seq_len is None else f"flops at {seq_len:g}",
           "plan_cost": total, "uniform_cost": uniform_cost, "over_budget": uniform_cost > total * (1 + 1e-9),
           "refits_dropped": dropped, "biases_dropped": biases_dropped}
    if limit is not None:  # the budget itself, in the same measure: what the run must meet
        log |= {"budget_cost": limit, "within_budget": uniform_cost <= limit * (1 + 1e-9)}
    return PruningPlan(layers=new_layers), log


def _check_uniform_family(adapter: ModelAdapter) -> None:
    if not hasattr(adapter, "uniform_config_updates") or not adapter.grouped_kv:
        raise ConfigError(f"--uniform is not available for {type(adapter.model).__name__}: its family has no "
                          "stock form of pruned widths; prune without --uniform")


def _units_limit(adapter: ModelAdapter, keep: float, seq_len: float | None, cost: UnitCosts) -> float:
    """What the units of every layer may cost, in ``cost``'s measure, for the model to keep
    ``keep``: of its FLOPs at ``seq_len`` (units are all its FLOPs), or of its non-embedding
    parameters (everything but the units stays)."""
    if seq_len is not None:
        return keep * full_flops(adapter, seq_len)
    full = adapter.full_layer_shape()
    full_units = adapter.num_layers * (full.num_heads * cost.head + adapter.full_num_kv_heads * cost.kv_head
                                       + full.intermediate_size * cost.neuron)
    total = count_non_embedding_params(adapter)
    return keep * total - (total - full_units)


def _smallest_shape(adapter: ModelAdapter, cost: UnitCosts) -> tuple[int, int]:
    return _attention_shape(adapter, 0.0, cost)


def smallest_uniform_keep(adapter: ModelAdapter, seq_len: float | None) -> tuple[float, dict[str, int]]:
    """The least a uniform model of ``adapter``'s (unpruned) model can keep, in the budget's measure
    (non-embedding parameters with ``seq_len`` None, else FLOPs at ``seq_len``): one key/value
    group, the fewest query heads the stock config accepts and one neuron in every layer. Known
    before any work, so a budget under it is refused up front."""
    _check_uniform_family(adapter)
    cost = _unit_cost(adapter, seq_len)
    groups, per_group = _smallest_shape(adapter, cost)
    units = adapter.num_layers * (groups * per_group * cost.head + groups * cost.kv_head + cost.neuron)
    if seq_len is not None:
        kept = units / full_flops(adapter, seq_len)
    else:
        fixed = -_units_limit(adapter, 0.0, None, cost)  # the parameters no pruning touches
        kept = (fixed + units) / count_non_embedding_params(adapter)
    return kept, {"kv_groups": groups, "query_heads": groups * per_group, "neurons": 1}


def _unit_cost(adapter: ModelAdapter, seq_len: float | None) -> UnitCosts:
    if seq_len is not None:
        return unit_costs(adapter, 0, seq_len)
    d, d_h = adapter.hidden_size, adapter.head_dim
    return UnitCosts(head=2 * d * d_h, kv_head=2 * d * d_h, neuron=(3 if adapter.facts.gated_ffn else 2) * d)


def _attention_shape(adapter: ModelAdapter, target: float, cost: UnitCosts) -> tuple[int, int]:
    """(groups, query heads per group) with per-layer cost closest to ``target`` without exceeding
    it when any shape fits; (1, 1) at the least. Only shapes the stock config accepts."""
    size = adapter.full_num_heads // adapter.full_num_kv_heads
    shapes = [(g, q) for g in range(1, adapter.full_num_kv_heads + 1) for q in range(1, size + 1)
              if adapter.uniform_heads_allowed(g * q, g)]
    if not shapes:
        raise ConfigError(f"no uniform attention shape of {type(adapter.model).__name__} is a valid stock config")

    def price(shape: tuple[int, int]) -> float:
        return shape[0] * shape[1] * cost.head + shape[0] * cost.kv_head

    fitting = [s for s in shapes if price(s) <= target * (1 + 1e-9)]
    if not fitting:
        return min(shapes, key=price)
    return max(fitting, key=lambda s: (price(s), s[1]))  # ties: more query heads per group


def _heads_of(adapter: ModelAdapter, layer: int, step: LayerPlan) -> list[int]:
    if step.attention_removed:
        return []
    if step.kv_groups is not None:
        size = adapter.full_num_heads // adapter.full_num_kv_heads
        in_groups = [h for h in range(adapter.full_num_heads) if h // size in set(step.kv_groups)]
        return in_groups if step.heads is None else sorted(set(step.heads) & set(in_groups))
    return list(range(adapter.full_num_heads)) if step.heads is None else sorted(step.heads)


def _neurons_of(adapter: ModelAdapter, step: LayerPlan) -> list[int]:
    if step.ffn_removed:
        return []
    return list(range(adapter.full_intermediate_size)) if step.neurons is None else sorted(step.neurons)


def _choose_heads(adapter: ModelAdapter, layer: int, step: LayerPlan, kept: set[int], groups: int,
                  per_group: int) -> list[int]:
    parts = adapter.attention(layer)
    d_h = parts.head_dim
    weight = parts.out.weight.detach().float()
    scales = step.head_scales.detach().float().abs() if step.head_scales is not None else torch.ones(parts.num_heads)
    magnitude = [float(weight[:, h * d_h:(h + 1) * d_h].norm() * scales[h]) for h in range(parts.num_heads)]
    by_group = parts.groups()
    rank = sorted(range(len(by_group)), key=lambda g: (-sum(h in kept for h in by_group[g]),
                                                         -sum(magnitude[h] for h in by_group[g]), g))
    heads = []
    for g in rank[:groups]:
        order = sorted(by_group[g], key=lambda h: (h not in kept, -magnitude[h], h))
        heads += order[:per_group]
    return sorted(heads)


def _choose_neurons(adapter: ModelAdapter, layer: int, kept: set[int], count: int) -> list[int]:
    parts = adapter.ffn(layer)
    magnitude = parts.down.weight.detach().float().norm(dim=0) * parts.up.weight.detach().float().norm(dim=1)
    order = sorted(range(parts.width), key=lambda n: (n not in kept, -float(magnitude[n]), n))
    return sorted(order[:count])
