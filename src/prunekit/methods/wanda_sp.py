"""Wanda-sp: structured Wanda, as FLAP's paper defines it (An et al., AAAI 2024, §5 baselines),
after Wanda (Sun et al., ICLR 2024), whose score is |W_ij| · ‖X_j‖₂.

The algorithm, as this file runs it:

1. **Widths**: one pruning ratio for every layer and both sublayer types. The ratio is the
   smallest that meets the budget: each layer keeps ceil((1 − p) · H) query heads and
   ceil((1 − p) · d_ff) neurons (found by bisection on p, priced in the budget's own measure).
2. **Layer by layer, from the bottom**, with the layers below already pruned (their masks applied):
   the input X of each output projection W (``o_proj``, ``down_proj``) over the sample's real
   tokens gives per channel c the score mean_i |W_ic| · ‖X_c‖₂ (the Wanda metric averaged over W's
   output rows); a head's score is the sum over its d_h channels, a neuron's its own.
3. Each layer keeps its top-scored heads and neurons; the next layer's input is computed through
   the pruned layer. No bias compensation, no weight update.

Figures (no fine-tuning, from ../shared/specs/decoders.md): Llama-2-7B at 20% / 40% of parameters
removed, WikiText-2 perplexity at window 1024: Wanda-sp 10.6 / 43.8 against FLAP 10.3 / 38.9
(average zero-shot 61.5 / 54.8, dense 64.0). FLAP's ``prune_wanda_sp`` calibrates on 128 C4
samples of the model's length.

Where FLAP's reference code (``prune_wanda_sp`` in CASIA-IVA-Lab/FLAP ``lib/prune.py``) differs:

- Its statistic ``scaler_row`` is Σ‖x_c‖² divided by the number of *sequences* (a constant
  per layer, so the ranking is the same as with tokens); prunekit uses E[x_c²] over real tokens and
  ignores padding, which the reference never has (fixed-length windows).
- It prunes ``int(ratio · H)`` heads and neurons per layer at a threshold (``>=``: ties may keep
  more); prunekit keeps exactly ceil((1 − p) · n) units, ties broken by unit index.
- Its ratio is a fraction of units; prunekit picks it so that the whole model meets the budget
  (parameters, FLOPs or measured latency), key/value heads reserved at full cost.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch

from prunekit.core.masks import apply_masks
from prunekit.core.surgery import PruningPlan
from prunekit.core.view import ModelAdapter
from prunekit.methods.activations import (
    BudgetConfig,
    ChannelStats,
    output_input_stats,
    plan_of,
    uniform_ratio,
    unit_budget,
)
from prunekit.methods.layerwise import LayerRunner
from prunekit.methods.search import SublayerId, total_cost
from prunekit.tasks.task_data import TaskData

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WandaSpConfig(BudgetConfig):
    """Wanda-sp: |W| · ‖X‖ per head and neuron, the same ratio in every layer, pruned bottom-up."""


def wanda_sp(adapter: ModelAdapter, data: TaskData, config: WandaSpConfig) -> tuple[PruningPlan, dict]:
    """The Wanda-sp plan under the budget, and a log; the teacher is left unchanged (masks are
    hooks, removed after each layer's pass)."""
    costs, budget, seq_len = unit_budget(adapter, data.sample, config)
    ratio, counts = uniform_ratio(adapter, costs, budget, "wanda_sp")
    keep: dict[SublayerId, torch.Tensor] = {}
    runner = LayerRunner(adapter.model, adapter)
    batches = data.sample.batches
    head_masks: dict[int, torch.Tensor] = {}
    neuron_masks: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        hidden = [runner.layer_input(0, batch) for batch in batches]  # (B, T, d) each
        for layer in range(adapter.num_layers):
            stats = _layer_stats(adapter, runner, layer, hidden, batches)
            for (kind, _), channel in stats.items():
                scores = wanda_scores(adapter, layer, kind, channel)
                kept = torch.sort(torch.sort(-scores, stable=True).indices[: counts[kind]]).values
                keep[(kind, layer)] = kept
                mask = torch.zeros(scores.numel(), device=adapter.sublayer(layer, kind).output.weight.device)
                mask[kept] = 1.0
                (head_masks if kind == "attn" else neuron_masks)[layer] = mask
            if layer + 1 < adapter.num_layers:  # the next layer reads this one pruned
                with apply_masks(adapter, {layer: head_masks[layer]} if layer in head_masks else {},
                                 {layer: neuron_masks[layer]} if layer in neuron_masks else {}):
                    hidden = [runner.run_layer(layer, h, batch) for h, batch in zip(hidden, batches, strict=True)]
    result_cost = total_cost(costs, {key: int(units.numel()) for key, units in keep.items()})
    logger.info("wanda_sp: ratio %.4f, kept cost %.4g of budget %.4g", ratio, result_cost, budget)
    return plan_of(adapter, keep), {"config": asdict(config), "seq_len": seq_len, "budget_kind": config.budget_kind,
                                    "budget": budget, "pruning_ratio": ratio, "kept_per_layer": counts,
                                    "search": {"cost": result_cost}}


def wanda_scores(adapter: ModelAdapter, layer: int, kind: str, channel: ChannelStats) -> torch.Tensor:
    """Step 2: per unit, Σ over its channels c of mean_i |W_ic| · ‖X_c‖₂: (H,) or (d_ff,)."""
    parts = adapter.sublayer(layer, kind)
    weight = parts.output.weight.detach().double().abs().mean(0).cpu()  # mean_i |W_ic|, (C,)
    per_channel = weight * channel.mean_square.cpu().sqrt()  # (C,)
    return per_channel.view(parts.num_units, parts.unit_size).sum(1)


def _layer_stats(adapter: ModelAdapter, runner: LayerRunner, layer: int, hidden: list[torch.Tensor],
                 batches: list) -> dict[SublayerId, ChannelStats]:
    """Input statistics of ``layer``'s output projections, running that layer alone from ``hidden``."""
    with output_input_stats(adapter, [("attn", layer), ("ffn", layer)]) as (stats, mask):
        for h, batch in zip(hidden, batches, strict=True):
            mask.value = batch.get("attention_mask")
            runner.run_layer(layer, h, batch)
    return stats
