"""Global mask searches under a FLOPs or latency budget (spec kprune_kwon.md §3.3, §3.4, P7, P10).

Scores and costs are keyed by sublayer id: ``("attn", l)`` for the heads of layer l and
``("ffn", l)`` for its FFN neurons. A sublayer's cost as a function of the number n of units it
keeps is one :class:`SublayerCost`::

    cost(0) = 0,    cost(n) = const + slope · max(0, n − free)    for n ≥ 1

FLOPs are the linear case (``const = free = 0``, ``slope`` = FLOPs of one unit, §2); latency is
the piecewise-linear fit of a measured table (``prunekit.methods.lut``, §3.4).

- :func:`knapsack_search` is Kwon et al.'s search. With linear costs it is the exact two-type
  knapsack of §3.3: every unit of a type costs the same, so the best set takes the top-scored
  units of each type, and trying every head count gives the optimum. With latency costs it is the
  layer-dropping search of §3.4, with the bugs of P10 fixed: the budget left is computed afresh for
  every configuration, scores are never changed in place, and every layer of a type may be dropped.
- :func:`prefix_search` keeps units in a given priority order while the budget allows (the random
  baseline).

Ties are broken by a fixed unit order (layer, then heads before neurons, then unit index), so the
same scores give the same masks. The cost of the result never exceeds the budget (P7), up to a
relative 1e-12 for rounding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from prunekit.core.accounting import param_unit_costs, unit_costs
from prunekit.core.errors import ConfigError
from prunekit.core.view import ModelAdapter

SublayerId = tuple[str, int]  # ("attn" | "ffn", layer)
KINDS = ("attn", "ffn")
_TOLERANCE = 1e-12  # relative slack on the budget for floating-point rounding


@dataclass(frozen=True)
class SublayerCost:
    """Cost of a sublayer that keeps n units: 0 for n = 0, else ``const + slope · max(0, n − free)``."""

    slope: float  # cost of each unit beyond the free ones (FLOPs, or ms)
    const: float = 0.0  # paid once by a sublayer that keeps any unit
    free: int = 0  # units covered by ``const``

    def __call__(self, n: int) -> float:
        if n <= 0:
            return 0.0
        return self.const + self.slope * max(0, n - self.free)

    @property
    def is_linear(self) -> bool:
        return self.const == 0 and self.free == 0


@dataclass
class SearchResult:
    """Kept unit indices (sorted) per sublayer, with the total score and cost of the selection."""

    keep: dict[SublayerId, torch.Tensor]
    value: float
    cost: float
    budget: float
    details: dict = field(default_factory=dict)

    def counts(self) -> dict[SublayerId, int]:
        return {key: int(kept.numel()) for key, kept in self.keep.items()}


def params_costs(adapter: ModelAdapter) -> dict[SublayerId, SublayerCost]:
    """Linear per-unit parameter costs of every sublayer (``accounting.param_unit_costs``), for a
    budget of non-embedding parameters (``keep_params``)."""
    unit = param_unit_costs(adapter)
    costs = {}
    for layer in range(adapter.num_layers):
        costs[("attn", layer)] = SublayerCost(slope=unit.head)
        costs[("ffn", layer)] = SublayerCost(slope=unit.neuron)
    return costs


def flops_costs(adapter: ModelAdapter, seq_len: float) -> dict[SublayerId, SublayerCost]:
    """Linear per-unit FLOPs costs of every sublayer at sequence length ``seq_len`` (spec §2)."""
    costs = {}
    for layer in range(adapter.num_layers):
        unit = unit_costs(adapter, layer, seq_len)
        costs[("attn", layer)] = SublayerCost(slope=unit.head)
        costs[("ffn", layer)] = SublayerCost(slope=unit.neuron)
    return costs


def full_widths(adapter: ModelAdapter) -> dict[SublayerId, int]:
    """Units per sublayer of the unpruned architecture (the config's head count and FFN width)."""
    widths = {}
    for layer in range(adapter.num_layers):
        widths[("attn", layer)] = adapter.full_num_heads
        widths[("ffn", layer)] = adapter.full_intermediate_size
    return widths


def current_widths(adapter: ModelAdapter) -> dict[SublayerId, int]:
    """Units per sublayer of the model as it is now (pruned or not)."""
    widths = {}
    for layer, shape in enumerate(adapter.layer_shapes()):
        widths[("attn", layer)] = shape.num_heads
        widths[("ffn", layer)] = shape.intermediate_size
    return widths


def total_cost(costs: Mapping[SublayerId, SublayerCost], counts: Mapping[SublayerId, int]) -> float:
    """Cost of a model that keeps ``counts[key]`` units in each sublayer."""
    return float(sum(costs[key](n) for key, n in counts.items()))


def _order(key: SublayerId) -> tuple[int, int]:
    return key[1], KINDS.index(key[0])


def _ranked(scores: torch.Tensor) -> torch.Tensor:
    """Unit indices by descending score; the stable sort keeps index order among ties."""
    return torch.sort(-scores, stable=True).indices


def _two_type_knapsack(
    values_a: torch.Tensor, cost_a: float, values_b: torch.Tensor, cost_b: float, budget: float
) -> tuple[int, int, float]:
    """Exact 0/1 knapsack over two item types of uniform cost: how many of the best items of each
    type to take. ``values_*`` are sorted descending (float64). Returns (n_a, n_b, value).

    For each n_a the best n_b is the prefix of b (at most the count that fits) with the largest
    sum; a running maximum of the prefix sums makes this exact for negative values too.
    """
    prefix_a = torch.cat([values_a.new_zeros(1), torch.cumsum(values_a, 0)])  # (N_a + 1,)
    prefix_b = torch.cat([values_b.new_zeros(1), torch.cumsum(values_b, 0)])  # (N_b + 1,)
    best_b, best_b_at = torch.cummax(prefix_b, 0)  # best prefix sum of b among the first k + 1
    slack = budget * (1 + _TOLERANCE) + _TOLERANCE
    n_a = torch.arange(values_a.numel() + 1, dtype=torch.float64)
    room = slack - n_a * cost_a  # (N_a + 1,) budget left for b
    fits = room >= 0
    if cost_b > 0:
        cap_b = torch.floor(room.clamp(min=0) / cost_b).clamp(max=values_b.numel()).long()
    else:
        cap_b = torch.full_like(n_a, values_b.numel()).long()
    total = torch.where(fits, prefix_a + best_b[cap_b], torch.full_like(prefix_a, -math.inf))
    take_a = int(torch.argmax(total))  # the first maximum: fewest heads among equal values
    take_b = int(best_b_at[cap_b[take_a]])
    return take_a, take_b, float(total[take_a])


def _check_budget_left(budget: float) -> None:
    """A negative budget for the searched units: what is priced outside them (the key/value heads
    of grouped attention, reserved whole) already costs more than the budget allows."""
    if budget < 0:
        raise ConfigError("the budget is below the cost of this model's key/value heads, which grouped-query "
                          "attention keeps whole in this release (reserved out of the budget); raise the budget")


def knapsack_search(
    scores: Mapping[SublayerId, torch.Tensor],
    costs: Mapping[SublayerId, SublayerCost],
    budget: float,
) -> SearchResult:
    """Kwon et al.'s mask search (§3.3 with linear costs, §3.4 with latency costs; P10 fixed).

    Args:
        scores: per sublayer, one score per unit, (units,); higher is more important.
        costs: per sublayer, its cost function. The slope must be the same for every sublayer of
            a type (true of FLOPs and of a latency table), which makes the search exact.
        budget: the largest total cost allowed.
    Returns:
        The kept units of every sublayer, maximising the summed score within the budget.
    """
    _check_budget_left(budget)
    keys = sorted(scores, key=_order)
    slopes = {}
    for kind in KINDS:
        kind_slopes = {costs[key].slope for key in keys if key[0] == kind and scores[key].numel()}
        if len(kind_slopes) > 1:
            raise ValueError(f"{kind} units cost differently in different layers ({sorted(kind_slopes)}); "
                             "the two-type knapsack needs one unit cost per type")
        slopes[kind] = kind_slopes.pop() if kind_slopes else 0.0
    ranked = {key: _ranked(scores[key].double()) for key in keys}
    values = {key: scores[key].double()[ranked[key]] for key in keys}  # descending
    # In a kept sublayer its best ``free`` units come with the constant (§3.4).
    free = {key: min(costs[key].free, values[key].numel()) for key in keys}
    base = {key: float(values[key][: free[key]].sum()) for key in keys}
    active = [key for key in keys if values[key].numel()]
    linear = all(costs[key].is_linear for key in active)
    # Drop order per type: lowest base value first, ties by layer (a stable sort of layer order).
    drop_order = {
        kind: sorted((key for key in active if key[0] == kind), key=lambda key: base[key]) for kind in KINDS
    }
    # With linear costs dropping a sublayer never helps (the knapsack can already keep none of it).
    drops = [(0, 0)] if linear else [
        (d_a, d_f) for d_a in range(len(drop_order["attn"]) + 1) for d_f in range(len(drop_order["ffn"]) + 1)
    ]

    best: tuple[float, tuple[int, int], int, int] | None = None
    for d_a, d_f in drops:
        kept = drop_order["attn"][d_a:] + drop_order["ffn"][d_f:]
        left = budget - sum(costs[key].const for key in kept)  # afresh for each configuration (P10)
        if left < -abs(budget) * _TOLERANCE:
            continue
        pools = {kind: [values[key][free[key]:] for key in sorted(kept, key=_order) if key[0] == kind] for kind in KINDS}
        pool = {kind: torch.sort(torch.cat(pools[kind]) if pools[kind] else torch.zeros(0, dtype=torch.float64),
                                 descending=True, stable=True).values for kind in KINDS}
        n_a, n_f, extra = _two_type_knapsack(pool["attn"], slopes["attn"], pool["ffn"], slopes["ffn"], max(left, 0.0))
        value = sum(base[key] for key in kept) + extra
        if best is None or value > best[0]:
            best = (value, (d_a, d_f), n_a, n_f)
    assert best is not None  # dropping everything always fits
    value, (d_a, d_f), n_a, n_f = best
    keep = _select(keys, ranked, values, free, drop_order, (d_a, d_f), {"attn": n_a, "ffn": n_f})
    counts = {key: int(kept.numel()) for key, kept in keep.items()}
    return SearchResult(
        keep=keep, value=value, cost=total_cost(costs, counts), budget=budget,
        details={"dropped_attn_layers": d_a, "dropped_ffn_layers": d_f, "configurations": len(drops)},
    )


def _select(keys, ranked, values, free, drop_order, drops, extra_counts) -> dict[SublayerId, torch.Tensor]:
    """Rebuild the kept indices of the winning configuration: the free units of each kept
    sublayer plus the best ``extra_counts[kind]`` of the rest, ties in the fixed unit order."""
    kept_keys = set(drop_order["attn"][drops[0]:] + drop_order["ffn"][drops[1]:])
    keep: dict[SublayerId, list[int]] = {key: [] for key in keys}
    for kind in KINDS:
        pool = []  # (value, order, key, unit index)
        for key in sorted(kept_keys, key=_order):
            if key[0] != kind:
                continue
            keep[key].extend(ranked[key][: free[key]].tolist())
            for rank in range(free[key], values[key].numel()):
                pool.append((float(values[key][rank]), len(pool), key, int(ranked[key][rank])))
        pool.sort(key=lambda item: (-item[0], item[1]))
        for _, _, key, unit in pool[: extra_counts[kind]]:
            keep[key].append(unit)
    return {key: torch.tensor(sorted(units), dtype=torch.long) for key, units in keep.items()}


def prefix_search(
    priorities: Mapping[SublayerId, torch.Tensor],
    costs: Mapping[SublayerId, SublayerCost],
    budget: float,
) -> SearchResult:
    """Walk all units in descending priority (ties in the fixed unit order) and keep each one whose
    added cost still fits the budget; units that do not fit are skipped, not the end of the walk.

    Returns the kept units; ``value`` is the summed priority of the kept units.
    """
    _check_budget_left(budget)
    keys = sorted(priorities, key=_order)
    flat = torch.cat([priorities[key].double() for key in keys]) if keys else torch.zeros(0, dtype=torch.float64)
    owners = [(key, unit) for key in keys for unit in range(priorities[key].numel())]
    counts = {key: 0 for key in keys}
    keep: dict[SublayerId, list[int]] = {key: [] for key in keys}
    spent, value = 0.0, 0.0
    slack = budget * (1 + _TOLERANCE) + _TOLERANCE
    for position in _ranked(flat).tolist():
        key, unit = owners[position]
        step = costs[key](counts[key] + 1) - costs[key](counts[key])
        if spent + step > slack:
            continue
        spent += step
        counts[key] += 1
        keep[key].append(unit)
        value += float(flat[position])
    return SearchResult(
        keep={key: torch.tensor(sorted(units), dtype=torch.long) for key, units in keep.items()},
        value=value, cost=total_cost(costs, counts), budget=budget,
    )
