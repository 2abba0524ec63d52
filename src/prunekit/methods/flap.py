"""FLAP: fluctuation-based adaptive structured pruning (An et al., AAAI 2024), retraining-free.

The algorithm, as this file runs it:

1. **Fluctuation** (one forward pass of the unpruned teacher over the calibration sample). For
   every output projection W (attention ``o_proj``: d × H·d_h; FFN ``down_proj``: d × d_ff) and
   each of its input channels c, the sample variance of the channel over the real tokens,
   Var[X_c], and its mean E[X_c] (kept for step 5).
2. **Score** (the paper's WIFV metric): S_c = Var[X_c] · ‖W[:, c]‖₂², how much the output of the
   sublayer fluctuates through channel c. An attention channel's score is squared once more
   (``attention_power`` 2), as the reference code does (see below).
3. **Standardize** each sublayer's scores over its channels, z = (S − mean S) / std S (one
   standardization per layer and sublayer type: attention channels of layer l among themselves,
   FFN channels of layer l among themselves), so that scores of different layers and types
   compare. A head's score is the mean z of its d_h channels; a neuron's is its z.
4. **Adaptive structure search**: all heads and neurons of all layers in one ranking, kept from
   the top while the budget allows (``search.prefix_search`` at each unit's own cost). Layers then
   keep different widths, chosen by the scores alone ("AL-AM", the paper's default).
5. **Bias compensation**: a removed channel is replaced by its mean, so the output projection's
   bias becomes b + W[:, removed] · E[X_removed] (d,). The plan carries it
   (``LayerPlan.attention_out_bias`` / ``ffn_out_bias``); a family without an output bias
   (Llama, Mistral, Qwen, OPT with ``enable_bias=false``) gets one, recorded in ``prunekit_layers``
   so that every load path (prunekit, the Auto classes, remote code) builds it.

Figures (no fine-tuning, WikiText-2 perplexity; from ../shared/specs/decoders.md, which read the
papers and repositories): LLaMA-7B at 20% of parameters removed 12.62 → 16.14 (window 128, the
repository's README figure); Llama-2-7B at 20% / 40%, window 1024: FLAP 10.3 / 38.9 against
Wanda-sp 10.6 / 43.8 and LLM-Pruner 17.5 / 51.1 (average zero-shot 61.4 / 54.9, dense 64.0);
Llama-3.1-8B at 20 / 30 / 50%, window 128: 19.32 / 24.50 / 42.86. The repository's LLaMA-7B
recipe (``scripts/llama_7b.sh``) calibrates on 1024 WikiText-2 samples (``--nsamples 1024``) and
runs with ``--unstr`` (weights masked in place, not cut: the same function); 3-5 minutes for a 7B
model on one GPU.

Where the reference code (CASIA-IVA-Lab/FLAP, ``lib/prune.py``, ``lib/layerwrapper.py``) and the
paper differ, and what prunekit does:

- The paper scores an attention channel by WIFV; the code squares that score for ``o_proj`` only
  (``metrics[...] ** 2``) before standardizing. prunekit follows the code (``attention_power``
  2.0; set 1.0 for the paper's formula): the published figures come from the code.
- The code's running variance (``BiasGPT.add_batch``) counts samples, not tokens, drops the first
  sample's fluctuation (``fluc_inp = 0`` at ``nsamples == 0``) and aliases ``old_baseline_inp`` to
  the mean it updates in place, so it is not the sample variance (and is all zeros with one
  calibration sample). prunekit computes the exact unbiased variance over all real tokens.
- The code's threshold weights a head 512/3 times a neuron (LLaMA-7B's head of 4·d·128
  parameters against a neuron's 3·d) and takes the unit whose cumulative weight comes *closest*
  to the target, so it may remove a little less than asked. prunekit prices every unit at its
  own cost in the budget's measure (parameters, FLOPs or measured latency) and never exceeds it.
- The code fixes the head size at 128 and has no grouped-query attention. Here the units are query
  heads of any size; key/value heads are reserved at full cost (``accounting.query_and_neuron_budget``)
  and a group whose query heads all go takes its key/value head with it.
- The added biases are parameters: under ``keep_params`` the budget reserves one bias of d per
  sublayer for the families that have none, so the saved model (biases included) meets it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch

from prunekit.core.errors import ConfigError
from prunekit.core.surgery import PruningPlan
from prunekit.core.view import ModelAdapter
from prunekit.methods.activations import (
    BudgetConfig,
    ChannelStats,
    output_input_stats,
    plan_of,
    unit_budget,
)
from prunekit.methods.layerwise import model_inputs
from prunekit.methods.search import SublayerId, prefix_search
from prunekit.tasks.task_data import TaskData

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FlapConfig(BudgetConfig):
    """FLAP (AAAI 2024): fluctuation scores, standardized, one global ranking, bias compensation."""

    attention_power: float = 2.0  # attention channel score = WIFV ** power (reference code: 2, paper: 1)
    bias_compensation: bool = True  # fold the removed channels' mean contribution into the output bias

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.attention_power <= 0:
            raise ConfigError(f"attention_power must be positive, got {self.attention_power}")


def flap(adapter: ModelAdapter, data: TaskData, config: FlapConfig) -> tuple[PruningPlan, dict]:
    """The FLAP plan (kept units and compensated output biases) under the budget, and a log; the
    teacher is left unchanged."""
    stats = fluctuation(adapter, data.sample)
    scores = standardized_scores(adapter, stats, config.attention_power)
    costs, budget, seq_len = unit_budget(adapter, data.sample, config)
    budget -= _reserved_bias_params(adapter, config)
    result = prefix_search(scores, costs, budget)
    plan = plan_of(adapter, result.keep)
    if config.bias_compensation:
        compensate_biases(adapter, plan, stats)
    logger.info("flap: kept cost %.4g of budget %.4g", result.cost, result.budget)
    widths = {f"{kind}{layer}": int(units.numel()) for (kind, layer), units in sorted(result.keep.items())}
    return plan, {"config": asdict(config), "seq_len": seq_len, "budget_kind": config.budget_kind,
                  "budget": result.budget, "search": {"value": result.value, "cost": result.cost},
                  "kept_units": widths, "calibration_tokens": _tokens(stats)}


def fluctuation(adapter: ModelAdapter, sample) -> dict[SublayerId, ChannelStats]:
    """Step 1: mean and variance of every output projection's input channels over the sample's
    real tokens, from one forward pass of the unpruned teacher per batch."""
    sublayers = [(kind, layer) for layer in range(adapter.num_layers) for kind in ("attn", "ffn")]
    with torch.no_grad(), output_input_stats(adapter, sublayers) as (stats, mask):
        for batch in sample.batches:
            mask.value = batch.get("attention_mask")
            adapter.model(**model_inputs(batch))
    return stats


def standardized_scores(adapter: ModelAdapter, stats: dict[SublayerId, ChannelStats],
                        attention_power: float = 2.0) -> dict[SublayerId, torch.Tensor]:
    """Steps 2-3: WIFV per channel, standardized per sublayer, averaged per head: (H,) or (d_ff,)."""
    scores = {}
    for (kind, layer), channel in stats.items():
        parts = adapter.sublayer(layer, kind)
        column_sq = parts.output.weight.detach().double().pow(2).sum(0).cpu()  # ‖W[:, c]‖², (C,)
        wifv = channel.variance.cpu() * column_sq  # (C,)
        if kind == "attn":
            wifv = wifv.pow(attention_power)
        z = _standardize(wifv)
        scores[(kind, layer)] = z.view(parts.num_units, parts.unit_size).mean(1)  # (H,) or (d_ff,)
    return scores


def compensate_biases(adapter: ModelAdapter, plan: PruningPlan, stats: dict[SublayerId, ChannelStats]) -> None:
    """Step 5: for each sublayer that loses units, its output bias b + W[:, removed] E[X_removed]."""
    for (kind, layer), channel in stats.items():
        step = plan.layers[layer]
        parts = adapter.sublayer(layer, kind)
        kept = step.heads if kind == "attn" else step.neurons
        if kept is None or len(kept) == parts.num_units:
            continue
        removed = torch.ones(parts.num_units, dtype=torch.bool)
        removed[list(kept)] = False
        columns = parts.columns(torch.nonzero(removed).flatten())  # (n_removed · unit_size,)
        weight = parts.output.weight.detach().cpu().double()  # (d, C)
        shift = weight[:, columns] @ channel.mean.cpu()[columns]  # (d,)
        bias = parts.output.bias
        new = shift if bias is None else bias.detach().cpu().double() + shift
        new = new.to(parts.output.weight.dtype)
        if kind == "attn":
            step.attention_out_bias = new
        else:
            step.ffn_out_bias = new


def _standardize(x: torch.Tensor) -> torch.Tensor:
    """(x − mean) / std over the channels (std unbiased, as torch.std); a constant row gives 0."""
    std = x.std() if x.numel() > 1 else x.new_zeros(())
    centered = x - x.mean()
    return centered / std if std > 0 else torch.zeros_like(centered)


def _reserved_bias_params(adapter: ModelAdapter, config: FlapConfig) -> float:
    """Parameters of the output biases compensation may add (keep_params only; biases cost no FLOPs
    and no measured latency here): d per sublayer whose family has no output bias."""
    if config.keep_params is None or not config.bias_compensation:
        return 0.0
    facts = adapter.facts
    missing = (not facts.has_bias("out")) + (not facts.has_bias("down"))
    return float(missing * adapter.num_layers * adapter.hidden_size)


def _tokens(stats: dict[SublayerId, ChannelStats]) -> int:
    return max((channel.count for channel in stats.values()), default=0)
