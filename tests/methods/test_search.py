"""prunekit.methods.search: the two-type knapsack is exact (checked by brute force on small cases), the
latency search honours its budget and fixes the reference's bugs (P10), ties break the same way
every time, and the prefix search keeps units in priority order within the budget."""

from __future__ import annotations

import itertools

import pytest
import torch
from builders import view

from prunekit.families import get_adapter
from prunekit.methods.search import (
    SublayerCost,
    flops_costs,
    full_widths,
    knapsack_search,
    prefix_search,
    total_cost,
)


def random_scores(layers: int, heads: int, neurons: int, seed: int, signed: bool = False) -> dict:
    generator = torch.Generator().manual_seed(seed)
    scores = {}
    for layer in range(layers):
        for kind, n in (("attn", heads), ("ffn", neurons)):
            values = torch.rand(n, generator=generator, dtype=torch.float64)
            scores[(kind, layer)] = values - 0.3 if signed else values
    return scores


def brute_force(scores, costs, budget):
    """Best (value, kept sets) over every subset of units, by enumeration."""
    units = [(key, i) for key in sorted(scores) for i in range(scores[key].numel())]
    best_value, best = -float("inf"), None
    for chosen in itertools.product((False, True), repeat=len(units)):
        counts = {key: 0 for key in scores}
        value = 0.0
        for (key, i), take in zip(units, chosen, strict=True):
            if take:
                counts[key] += 1
                value += float(scores[key][i])
        if total_cost(costs, counts) <= budget * (1 + 1e-12) and value > best_value + 1e-12:
            best_value = value
            best = {key: sorted(i for (k, i), take in zip(units, chosen, strict=True) if take and k == key)
                    for key in scores}
    return best_value, best


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("signed", [False, True])
def test_knapsack_is_exact_on_small_cases(seed, signed):
    layers, heads, neurons = 2, 2, 4
    scores = random_scores(layers, heads, neurons, seed, signed)
    costs = {(kind, layer): SublayerCost(slope=3.0 if kind == "attn" else 1.0)
             for layer in range(layers) for kind in ("attn", "ffn")}
    full = total_cost(costs, {key: s.numel() for key, s in scores.items()})
    for keep in (0.2, 0.45, 0.7, 1.0):
        result = knapsack_search(scores, costs, keep * full)
        value, best = brute_force(scores, costs, keep * full)
        assert result.value == pytest.approx(value, abs=1e-9)
        assert {key: kept.tolist() for key, kept in result.keep.items()} == best
        assert result.cost <= keep * full * (1 + 1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_latency_search_fits_the_budget(seed):
    """With a constant per kept sublayer the search is a heuristic (§3.4): its result fits the
    budget, never claims more than the brute-force optimum, and keeps everything at keep 1."""
    scores = random_scores(2, 2, 4, seed)
    costs = {(kind, layer): (SublayerCost(slope=2.0, const=3.0, free=1) if kind == "attn"
                             else SublayerCost(slope=0.5, const=1.0, free=2))
             for layer in range(2) for kind in ("attn", "ffn")}
    full = total_cost(costs, {key: s.numel() for key, s in scores.items()})
    for keep in (0.1, 0.3, 0.5, 0.8, 1.0):
        result = knapsack_search(scores, costs, keep * full)
        assert result.cost <= keep * full * (1 + 1e-12)
        value, _ = brute_force(scores, costs, keep * full)
        assert result.value <= value + 1e-9
        # Sublayers are kept whole or with at least their free units (§3.4).
        for key, kept in result.keep.items():
            assert kept.numel() == 0 or kept.numel() >= min(costs[key].free, scores[key].numel())
    assert result.value == pytest.approx(sum(float(s.sum()) for s in scores.values()))


def test_latency_search_can_drop_every_layer_of_a_type():
    """P10: the reference could never drop all L layers of one type."""
    scores = {("attn", 0): torch.tensor([0.01, 0.01]), ("attn", 1): torch.tensor([0.01, 0.01]),
              ("ffn", 0): torch.tensor([1.0, 1.0]), ("ffn", 1): torch.tensor([1.0, 1.0])}
    costs = {key: SublayerCost(slope=1.0, const=5.0, free=1) for key in scores}
    result = knapsack_search(scores, costs, budget=12.0)
    assert result.counts() == {("attn", 0): 0, ("attn", 1): 0, ("ffn", 0): 2, ("ffn", 1): 2}


def test_latency_budget_is_reset_for_every_configuration():
    """P10: the reference decremented the budget across configurations, so a configuration tried
    late saw less than the true budget. Here the best configuration is the last one tried."""
    scores = {("attn", 0): torch.tensor([0.1]), ("attn", 1): torch.tensor([0.2]),
              ("ffn", 0): torch.tensor([0.3]), ("ffn", 1): torch.tensor([5.0])}
    costs = {key: SublayerCost(slope=0.0, const=4.0, free=1) for key in scores}
    result = knapsack_search(scores, costs, budget=4.0)
    assert result.counts() == {("attn", 0): 0, ("attn", 1): 0, ("ffn", 0): 0, ("ffn", 1): 1}


def test_ties_break_by_a_fixed_unit_order():
    scores = {("attn", 0): torch.ones(4), ("ffn", 0): torch.ones(6), ("attn", 1): torch.ones(4), ("ffn", 1): torch.ones(6)}
    costs = {key: SublayerCost(slope=1.0) for key in scores}
    first = knapsack_search(scores, costs, budget=7.0)
    second = knapsack_search(dict(reversed(list(scores.items()))), costs, budget=7.0)
    assert {k: v.tolist() for k, v in first.keep.items()} == {k: v.tolist() for k, v in second.keep.items()}
    assert sum(first.counts().values()) == 7


def test_prefix_search_keeps_units_in_priority_order():
    priorities = {("attn", 0): torch.tensor([0.9, 0.1]), ("ffn", 0): torch.tensor([0.8, 0.7, 0.2])}
    costs = {("attn", 0): SublayerCost(slope=3.0), ("ffn", 0): SublayerCost(slope=1.0)}
    result = prefix_search(priorities, costs, budget=5.0)
    # 0.9 (head, 3) and 0.8, 0.7 (neurons, 1 each) fill the budget; the rest do not fit.
    assert result.keep[("attn", 0)].tolist() == [0]
    assert result.keep[("ffn", 0)].tolist() == [0, 1]
    assert result.cost == 5.0


def test_prefix_search_skips_units_that_do_not_fit_and_goes_on():
    priorities = {("attn", 0): torch.tensor([0.9]), ("ffn", 0): torch.tensor([0.8, 0.1])}
    costs = {("attn", 0): SublayerCost(slope=10.0), ("ffn", 0): SublayerCost(slope=1.0)}
    result = prefix_search(priorities, costs, budget=2.0)
    assert result.keep[("attn", 0)].numel() == 0
    assert result.keep[("ffn", 0)].tolist() == [0, 1]


def test_flops_costs_match_the_accounting(make_model):
    from prunekit.core.accounting import full_flops

    model = make_model("bert")
    adapter = get_adapter(model)
    costs = flops_costs(adapter, 17.5)
    assert total_cost(costs, full_widths(adapter)) == pytest.approx(full_flops(view(model), 17.5))
    assert all(cost.is_linear for cost in costs.values())


def test_mixed_unit_costs_are_refused():
    scores = {("attn", 0): torch.ones(2), ("attn", 1): torch.ones(2)}
    costs = {("attn", 0): SublayerCost(slope=1.0), ("attn", 1): SublayerCost(slope=2.0)}
    with pytest.raises(ValueError, match="one unit cost per type"):
        knapsack_search(scores, costs, 3.0)
