"""ShortGPT: block removal by Block Influence (Men et al., 2024, "ShortGPT: Layers in Large
Language Models are More Redundant Than You Expect"), retraining-free.

The algorithm, as this file runs it:

1. **Block Influence** (one forward pass of the teacher over the calibration sample): for layer
   l with input hidden states X_l and output X_{l+1}, BI_l = 1 − E_t[cos(X_l,t, X_{l+1},t)], the
   mean over the sample's real tokens t of the cosine similarity of each token's hidden state
   before and after the layer. A layer that barely turns the residual stream has a small BI.
2. **Remove** the layers of lowest BI, whole, as few as meet the budget: layers are taken out in
   increasing BI until the rest costs at most ``keep`` of the model (FLOPs, non-embedding
   parameters or measured latency). The kept layers are renumbered (each attention's ``layer_idx``,
   its key/value cache slot; ``num_hidden_layers``; ``layer_types``), every width stays, so the
   saved folder is the family's **stock** class with fewer layers (``plan.uniform``), loading with
   no prunekit and no remote code.

Whole layers are coarse: a budget lies between two reachable points. The method never exceeds
the budget (it removes one more layer instead) and the log says what was asked and reached, and
the reachable keeps on either side. A budget only reached by removing every layer is refused,
naming the smallest keep that one layer gives.

Figures: decoders.md lists ShortGPT (icip-cas/ShortGPT) for Llama-2 and Baichuan2 with PG19 as its
calibration text and no perplexity figure; the closest block-removal figure there is SLEB's
Llama-2-7B at ~20% removed, 9.14 at window 2048 (dense 5.47). The paper reports that removing about
a quarter of Llama-2's layers keeps most of its multiple-choice (MMLU-style) scores while
perplexity rises more than under width pruning; its tables are not restated here.

Where the reference code (icip-cas/ShortGPT, ``shortgpt/shortgpt.py`` and ``shortgpt/metrics.py``)
and this file differ:

- The code takes the model's ``output_hidden_states``, whose last entry in Hugging Face decoders has
  the final norm applied, so the last layer's BI compares a raw input with a normalized output;
  prunekit hooks each layer's own input and output, so every layer is measured alike.
- The code sums 1 − cos over every position of its padded batches (windows of 256 tokens), padding
  included, and builds an N × N similarity matrix to read its diagonal (NaN read as 0.5); prunekit
  averages over real tokens only, one cosine per token.
- The code deletes the layers from the ModuleList and leaves each attention's ``layer_idx`` as it
  was, so the key/value cache of a pruned model indexes the wrong slots; prunekit renumbers them
  (and ``num_hidden_layers``, ``layer_types``), so generation with the cache is right.
- The paper also proposes an angular-distance variant (``angular=True``); this file uses BI, the
  default. The code removes ``n_prune_layers`` layers; prunekit turns the budget into that number.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch

from prunekit.core.accounting import count_non_embedding_params, full_flops, layer_flops
from prunekit.core.errors import ConfigError
from prunekit.core.surgery import LayerPlan, PruningPlan
from prunekit.core.view import ModelAdapter
from prunekit.methods.activations import BudgetConfig
from prunekit.methods.layerwise import model_inputs
from prunekit.methods.lut import sublayer_costs
from prunekit.tasks.task_data import TaskData

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShortGptConfig(BudgetConfig):
    """ShortGPT: remove the whole layers of lowest Block Influence, as few as meet the budget."""


def shortgpt(adapter: ModelAdapter, data: TaskData, config: ShortGptConfig) -> tuple[PruningPlan, dict]:
    """The plan removing whole layers under the budget (saved as the stock class), and a log;
    the teacher is left unchanged."""
    if (reason := adapter.layer_removal_blocker()) is not None:
        raise ConfigError(f"shortgpt cannot prune this model: {reason}")
    influence = block_influence(adapter, data.sample)
    costs, total, seq_len = layer_costs(adapter, data.sample, config)
    order = sorted(range(adapter.num_layers), key=lambda layer: (influence[layer], layer))  # least influence first
    reachable = _reachable(costs, total, order)
    removed = next((n for n, kept in enumerate(reachable) if kept <= config.keep * (1 + 1e-12)), None)
    if removed is None or removed >= adapter.num_layers:
        raise ConfigError(f"shortgpt removes whole layers and cannot meet keep_{config.budget_kind} {config.keep:g}: "
                          f"keeping one layer keeps {reachable[-2]:.4f}, the nearest it can reach; give "
                          f"keep_{config.budget_kind} {reachable[-2]:.4f} or more, or use a width-pruning method")
    drop = sorted(order[:removed])
    plan = PruningPlan(layers=[LayerPlan(layer_removed=layer in drop) for layer in range(adapter.num_layers)],
                       uniform=True)  # every width stays: the family's stock class, fewer layers
    above = reachable[removed - 1] if removed > 0 else None
    logger.info("shortgpt: removing layers %s (keep %.4f for %.4f asked)", drop, reachable[removed], config.keep)
    return plan, {"config": asdict(config), "seq_len": seq_len, "budget_kind": config.budget_kind,
                  "block_influence": [float(v) for v in influence], "removed_layers": drop,
                  "asked": config.keep, "reached": reachable[removed],
                  "nearest_above": above, "reachable": reachable}


def block_influence(adapter: ModelAdapter, sample) -> list[float]:
    """Step 1: BI_l = 1 − mean cosine similarity of each real token's hidden state at the input
    and output of layer l, over the sample."""
    sums = [0.0] * adapter.num_layers
    count = 0
    record: dict[int, torch.Tensor] = {}
    mask_box: list[torch.Tensor | None] = [None]

    def take_input(layer: int):
        def hook(module, args, kwargs):
            record[layer] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    def take_output(layer: int):
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output  # (B, T, d)
            cos = torch.nn.functional.cosine_similarity(record.pop(layer).double(), out.detach().double(), dim=-1)
            mask = mask_box[0]
            sums[layer] += float(cos[mask.bool()].sum() if mask is not None and mask.shape == cos.shape else cos.sum())
        return hook

    handles = []
    try:
        for layer, block in enumerate(adapter.layers()):
            handles.append(block.register_forward_pre_hook(take_input(layer), with_kwargs=True))
            handles.append(block.register_forward_hook(take_output(layer), with_kwargs=True))
        with torch.no_grad():
            for batch in sample.batches:
                mask = batch.get("attention_mask")
                mask_box[0] = mask
                count += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
                adapter.model(**model_inputs(batch))
    finally:
        for handle in handles:
            handle.remove()
    return [1.0 - s / max(count, 1) for s in sums]


def layer_costs(adapter: ModelAdapter, sample, config: ShortGptConfig) -> tuple[list[float], float, float]:
    """Each layer's cost and the whole model's in the budget's measure: non-embedding parameters
    (the layer's own, norms included, of the model's), FLOPs at ``seq_len`` (key/value heads
    included) or a latency table's fits of each sublayer at its width."""
    seq_len = config.seq_len or sample.mean_length
    if config.keep_params is not None:
        costs = [float(sum(p.numel() for p in block.parameters())) for block in adapter.layers()]
        return costs, float(count_non_embedding_params(adapter)), seq_len
    if config.keep_latency is not None:
        table = sublayer_costs(adapter, seq_len, config.lut)
        costs = [table[("attn", layer)](shape.num_heads) + table[("ffn", layer)](shape.intermediate_size)
                 for layer, shape in enumerate(adapter.layer_shapes())]
        return costs, float(sum(costs)), seq_len
    costs = [row["attn_flops"] + row["ffn_flops"] for row in layer_flops(adapter, seq_len)]
    return costs, float(full_flops(adapter, seq_len)), seq_len


def _reachable(costs: list[float], total: float, order: list[int]) -> list[float]:
    """The keep reached after removing the first n layers of ``order``, for n = 0..L."""
    kept, spent = [1.0], 0.0
    for layer in order:
        spent += costs[layer]
        kept.append((total - spent) / total if total > 0 else 0.0)
    return kept
