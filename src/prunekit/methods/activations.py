"""What the activation-based LLM methods share (FLAP, Wanda-sp, ShortGPT; decoders.md §1):
statistics of the input channels of every output projection over the calibration sample, the
budget fields every retraining-free method takes, and the unit budget they prune to.

The output projection (attention ``out`` / FFN ``down``, ``parts.output`` of the model view) is where
both FLAP and Wanda-sp score: its input channel c is head h's dimension (c in
``[h·d_h, (h+1)·d_h)``) or neuron c, so a channel's statistics and its weight column
``W[:, c]`` say how much the residual stream would lose without it. Statistics are taken at the
non-padding positions only (``attention_mask``), in float64, with the per-batch moments merged
exactly (Chan et al.'s parallel variance), whatever the batch sizes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from prunekit.core.accounting import (
    budget_kind_of,
    check_budget,
    kv_head_flops,
    params_unit_budget,
    query_and_neuron_budget,
)
from prunekit.core.errors import ConfigError
from prunekit.core.preflight import check_config_values
from prunekit.core.surgery import LayerPlan, PruningPlan
from prunekit.core.view import ModelAdapter, SublayerKind
from prunekit.methods.lut import per_unit_costs, sublayer_costs
from prunekit.methods.search import SublayerCost, SublayerId, full_widths, params_costs, total_cost


@dataclass(frozen=True)
class BudgetConfig:
    """The budget of a retraining-free method: one of keep_flops, keep_params, keep_latency."""

    keep_flops: float = 0.5  # fraction of the encoder FLOPs kept, in (0, 1]; unused with keep_latency
    keep_latency: float | None = None  # fraction of the latency kept (needs ``lut``); replaces keep_flops
    lut: str | None = None  # latency table JSON from `prunekit lut`, for keep_latency
    seq_len: float | None = None  # FLOPs sequence length; None: the sample's mean length
    keep_params: float | None = None  # fraction of the non-embedding parameters kept; replaces keep_flops

    def __post_init__(self) -> None:
        check_config_values(self)  # types, and finite numbers
        check_budget(self.keep_flops, self.keep_latency, self.lut, self.seq_len, self.keep_params)

    @property
    def keep(self) -> float:
        if self.keep_params is not None:
            return self.keep_params
        return self.keep_latency if self.keep_latency is not None else self.keep_flops

    @property
    def budget_kind(self) -> str:
        return budget_kind_of(self)


def unit_budget(adapter: ModelAdapter, sample: Any, config: BudgetConfig
                ) -> tuple[dict[SublayerId, SublayerCost], float, float]:
    """Per-sublayer costs of the units (query heads, neurons), the budget they must fit and the
    FLOPs length: parameters for keep_params, a latency table's fits for keep_latency, else FLOPs
    at ``seq_len`` (the sample's mean length by default). Key/value heads are reserved at their
    full cost (``accounting.query_and_neuron_budget``), as every method here does."""
    seq_len = config.seq_len or sample.mean_length
    if config.keep_params is not None:
        return params_costs(adapter), params_unit_budget(adapter, config.keep_params)[1], seq_len
    costs = sublayer_costs(adapter, seq_len, config.lut if config.keep_latency is not None else None)
    kv = 0.0 if config.keep_latency is not None else kv_head_flops(per_unit_costs(adapter, seq_len), adapter)
    full = total_cost(costs, full_widths(adapter)) + kv
    return costs, query_and_neuron_budget(config.keep, full, kv), seq_len


def uniform_ratio(adapter: ModelAdapter, costs: dict[SublayerId, SublayerCost], budget: float, method: str,
                  layers: set[int] | None = None) -> tuple[float, dict[str, int]]:
    """The smallest pruning ratio p whose widths (ceil((1 − p)·H) query heads and ceil((1 − p)·d_ff)
    neurons in each of ``layers``, the other layers whole; None: every layer) cost at most
    ``budget``, by bisection; returns p and the kept counts per unit type ("attn", "ffn"). A
    ConfigError names ``method`` when even p = 1 does not fit."""
    heads, neurons = adapter.full_num_heads, adapter.full_intermediate_size
    pruned = set(range(adapter.num_layers)) if layers is None else layers

    def counts(p: float) -> dict[str, int]:
        # A hair below the ceiling's step, so that a whole (1 - p)·n is not rounded up by float error.
        return {"attn": math.ceil((1.0 - p) * heads - 1e-9), "ffn": math.ceil((1.0 - p) * neurons - 1e-9)}

    def cost(p: float) -> float:
        c = counts(p)
        full = {"attn": heads, "ffn": neurons}
        return total_cost(costs, {key: c[key[0]] if key[1] in pruned else full[key[0]] for key in costs})

    if cost(0.0) <= budget:
        return 0.0, counts(0.0)
    if cost(1.0) > budget:
        kept_whole = adapter.num_layers - len(pruned)
        raise ConfigError(f"{method} cannot meet the budget: even with no heads and neurons in the layers it prunes "
                          f"the units cost {cost(1.0):.4g} against {budget:.4g} left for them"
                          + (f" ({kept_whole} layers are left whole)" if kept_whole else "")
                          + "; give a larger budget")
    low, high = 0.0, 1.0  # cost(low) > budget >= cost(high)
    for _ in range(60):
        mid = (low + high) / 2
        if cost(mid) <= budget:
            high = mid
        else:
            low = mid
    return high, counts(high)


def plan_of(adapter: ModelAdapter, keep: Mapping[SublayerId, torch.Tensor]) -> PruningPlan:
    """The plan keeping units ``keep[("attn" | "ffn", layer)]`` (sorted indices) in each sublayer."""
    plan = PruningPlan(layers=[LayerPlan() for _ in range(adapter.num_layers)])
    for (kind, layer), units in keep.items():
        if kind == "attn":
            plan.layers[layer].heads = [int(u) for u in units]
        else:
            plan.layers[layer].neurons = [int(u) for u in units]
    return plan


@dataclass
class ChannelStats:
    """Moments of one output projection's input channels over the sample's real tokens (C,)."""

    count: int = 0
    mean: torch.Tensor | None = None  # (C,) float64
    m2: torch.Tensor | None = None  # (C,) Σ (x − mean)², float64
    sq: torch.Tensor | None = None  # (C,) Σ x², float64

    def add(self, rows: torch.Tensor) -> None:
        """Merge the rows (N, C) of one batch (Chan et al.: exact for any split into batches)."""
        rows = rows.detach().double()
        n = rows.shape[0]
        if n == 0:
            return
        mean_b = rows.mean(0)  # (C,)
        m2_b = (rows - mean_b).pow(2).sum(0)
        sq_b = rows.pow(2).sum(0)
        if self.count == 0:
            self.count, self.mean, self.m2, self.sq = n, mean_b, m2_b, sq_b
            return
        total = self.count + n
        delta = mean_b - self.mean
        self.m2 = self.m2 + m2_b + delta.pow(2) * self.count * n / total
        self.mean = self.mean + delta * n / total
        self.sq = self.sq + sq_b
        self.count = total

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased variance per channel (the fluctuation FLAP scores); 0 for a single token."""
        return self.m2 / max(self.count - 1, 1)

    @property
    def mean_square(self) -> torch.Tensor:
        """E[x²] per channel: ‖X_c‖₂² over the sample divided by the token count (Wanda's statistic,
        up to that constant)."""
        return self.sq / max(self.count, 1)


@dataclass
class _TokenMask:
    """The current batch's non-padding positions (B, T), read by the hooks."""

    value: torch.Tensor | None = None
    hooks: list = field(default_factory=list)


@contextmanager
def output_input_stats(adapter: ModelAdapter, sublayers: list[tuple[SublayerKind, int]]
                       ) -> Iterator[tuple[dict[SublayerId, ChannelStats], _TokenMask]]:
    """Inside the block, every forward that reaches the output projection of a listed sublayer
    adds that projection's input rows at the real positions to its :class:`ChannelStats`. The
    caller sets ``mask.value`` to the batch's ``attention_mask`` before each forward (None: every
    position). The hooks always come off."""
    stats: dict[SublayerId, ChannelStats] = {}
    mask = _TokenMask()

    def hook_for(key: SublayerId):
        def hook(module, args):
            x = args[0]  # (B, T, C)
            if mask.value is not None and x.dim() == 3 and mask.value.shape == x.shape[:2]:
                rows = x[mask.value.bool()]  # (N_real, C)
            else:
                rows = x.reshape(-1, x.shape[-1])
            stats[key].add(rows)
        return hook

    try:
        for kind, layer in sublayers:
            parts = adapter.sublayer(layer, kind)
            if parts is None:
                continue
            stats[(kind, layer)] = ChannelStats()
            mask.hooks.append(parts.output.register_forward_pre_hook(hook_for((kind, layer))))
        yield stats, mask
    finally:
        for handle in mask.hooks:
            handle.remove()
        mask.hooks.clear()
