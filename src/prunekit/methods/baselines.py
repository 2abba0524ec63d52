"""Baselines that every comparison needs as a floor: magnitude and random pruning.

Neither looks at data or tunes anything; the calibration sample only sets the FLOPs sequence
length (its mean length, unless ``seq_len`` is given).

- ``magnitude``: a unit's importance is the squared L2 norm of its weights (``power`` 2): for a
  head the rows of Q, K and V and the columns of the output projection it owns, for a neuron its
  FFN-in row (and gate row) and FFN-out column. Kept units come from the same global search as
  Kwon et al.'s (``prunekit.methods.search.knapsack_search``). With power 2 a unit's score grows with its
  parameter count, as its FLOPs do, so heads and neurons compete on even terms.
- ``random``: seeded random priorities; units are kept in that order while the budget allows
  (``prunekit.methods.search.prefix_search``), so heads and neurons are kept in about the same proportion.
  (Random scores in a knapsack would instead keep the cheapest type first.)

Both take a FLOPs budget, a latency budget with a latency table (``prunekit lut``), or a budget
of non-embedding parameters (``keep_params``, priced by ``prunekit.methods.search.params_costs``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch

from prunekit.core.accounting import (
    kv_head_flops,
    params_unit_budget,
    query_and_neuron_budget,
)
from prunekit.core.errors import ConfigError
from prunekit.core.surgery import LayerPlan, PruningPlan
from prunekit.core.view import ModelAdapter
from prunekit.methods.activations import BudgetConfig
from prunekit.methods.lut import per_unit_costs, sublayer_costs
from prunekit.methods.search import (
    SearchResult,
    SublayerId,
    full_widths,
    knapsack_search,
    params_costs,
    prefix_search,
    total_cost,
)
from prunekit.tasks.task_data import TaskData

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MagnitudeConfig(BudgetConfig):
    """Magnitude pruning: weight-norm importance, Kwon et al.'s global search, no tuning."""

    power: float = 2.0  # importance = ‖unit weights‖₂ ** power

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.power <= 0:
            raise ConfigError(f"power must be positive, got {self.power}")


@dataclass(frozen=True)
class RandomConfig(BudgetConfig):
    """Random pruning: units kept in a seeded random order while the budget allows."""

    seed: int = 0  # seed of the torch.Generator that draws the order


def magnitude_scores(adapter: ModelAdapter, power: float = 2.0) -> dict[SublayerId, torch.Tensor]:
    """‖weights of each head and neuron‖₂ ** power, per sublayer: (H,) or (d_ff,)."""
    scores = {}
    for layer in range(adapter.num_layers):
        attn, ffn = adapter.attention(layer), adapter.ffn(layer)
        if attn is not None:
            # A head's own rows: Q, and K and V where each query head has its own (a shared
            # key/value head belongs to its group, not to one query head).
            own = (attn.query,) if adapter.grouped_kv else (attn.query, attn.key, attn.value)
            sq = sum(lin.weight.detach().double().pow(2).sum(1) for lin in own)  # (H·d_h,)
            sq = sq + attn.out.weight.detach().double().pow(2).sum(0)
            scores[("attn", layer)] = sq.view(attn.num_heads, attn.head_dim).sum(1).pow(power / 2).cpu()  # (H,)
        if ffn is not None:
            ins = [ffn.up] + ([ffn.gate] if ffn.gate is not None else [])
            sq = sum(lin.weight.detach().double().pow(2).sum(1) for lin in ins) + ffn.down.weight.detach().double().pow(2).sum(0)
            scores[("ffn", layer)] = sq.pow(power / 2).cpu()  # (d_ff,)
    return scores


def random_scores(adapter: ModelAdapter, seed: int) -> dict[SublayerId, torch.Tensor]:
    """Uniform random priorities from a torch.Generator seeded with ``seed``, per sublayer."""
    generator = torch.Generator().manual_seed(seed)
    scores = {}
    for layer, shape in enumerate(adapter.layer_shapes()):
        if shape.num_heads:
            scores[("attn", layer)] = torch.rand(shape.num_heads, generator=generator, dtype=torch.float64)
        if shape.intermediate_size:
            scores[("ffn", layer)] = torch.rand(shape.intermediate_size, generator=generator, dtype=torch.float64)
    return scores


def magnitude(adapter: ModelAdapter, data: TaskData, config: MagnitudeConfig) -> tuple[PruningPlan, dict]:
    """The plan keeping the units of largest weight norm under the budget, and a log; the model is
    left unchanged; ``data.sample`` only sets the FLOPs length."""
    costs, budget, seq_len = _budget(adapter, data.sample, config)
    result = knapsack_search(magnitude_scores(adapter, config.power), costs, budget)
    return _plan(adapter, result, config, seq_len, "magnitude")


def random_prune(adapter: ModelAdapter, data: TaskData, config: RandomConfig) -> tuple[PruningPlan, dict]:
    """The plan keeping units in a seeded random order while the budget allows, and a log."""
    costs, budget, seq_len = _budget(adapter, data.sample, config)
    result = prefix_search(random_scores(adapter, config.seed), costs, budget)
    return _plan(adapter, result, config, seq_len, "random")


def _budget(adapter: ModelAdapter, sample: Any, config: BudgetConfig):
    seq_len = config.seq_len or sample.mean_length
    if config.keep_params is not None:
        return params_costs(adapter), params_unit_budget(adapter, config.keep_params)[1], seq_len
    costs = sublayer_costs(adapter, seq_len, config.lut if config.keep_latency is not None else None)
    kv = 0.0 if config.keep_latency is not None else kv_head_flops(per_unit_costs(adapter, seq_len), adapter)
    full = total_cost(costs, full_widths(adapter)) + kv
    return costs, query_and_neuron_budget(config.keep, full, kv), seq_len


def _plan(adapter, result: SearchResult, config, seq_len, name) -> tuple[PruningPlan, dict]:
    plan = PruningPlan(layers=[LayerPlan() for _ in range(adapter.num_layers)])
    for (kind, layer), units in result.keep.items():
        if kind == "attn":
            plan.layers[layer].heads = units.tolist()
        else:
            plan.layers[layer].neurons = units.tolist()
    logger.info("%s: kept cost %.4g of budget %.4g", name, result.cost, result.budget)
    return plan, {
        "config": asdict(config),
        "seq_len": seq_len,
        "budget_kind": config.budget_kind,
        "budget": result.budget,
        "search": {"value": result.value, "cost": result.cost, **result.details},
    }
