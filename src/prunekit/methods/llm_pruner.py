"""LLM-Pruner (Ma et al., NeurIPS 2023) without its LoRA recovery step: first-order Taylor
importance of coupled structures.

The algorithm, as this file runs it:

1. **Coupled groups** (the paper's dependency graph, which for a Transformer block is fixed): a
   query head h is its d_h rows of Q (and of K and V where each head owns its key/value head) and
   its d_h columns of the output projection; a neuron is its row of the FFN input (and gate) and
   its column of the FFN output. Removing a group removes all of its weights at once.
2. **Gradients one block at a time** (``layers_per_pass`` 1; more trade memory for time): for
   each pruned layer only that layer's projection weights require gradients, the task loss (the LM loss with labels = the input ids for a causal LM; the
   task's labels otherwise) is averaged over the sample's batches and back-propagated; autograd then
   records nothing below that layer and keeps one layer's gradients, instead of the whole model's
   (the reference's ~80 GB for a 7B model, decoders.md §6).
3. **Importance** of a weight, first order: I(w) = |w · ∂L/∂w| (the loss change when w is zeroed).
   ``aggregation`` "element" (the paper's element-wise, the reference's ``param_first``): a group's
   importance is the sum over its weights of |w · g|; "vector" (the reference's ``vectorize``): the sum
   over its weight vectors (each row of Q/K/V/up/gate, each column of out/down) of |Σ w · g|.
4. **Prune** every pruned layer at the same ratio (the reference's block-wise default): each keeps
   its top ceil((1 − p) · H) heads and ceil((1 − p) · d_ff) neurons, p the smallest ratio that meets
   the budget with the **first and last layers left whole** (``protected_first``,
   ``protected_last``; default the reference's LLaMA-7B recipe scaled to the depth: layers 4..29 of
   32 pruned, so round(L/8) first and round(L/16) last layers, at least one each, are kept whole).

Figures (no fine-tuning unless said, from ../shared/specs/decoders.md): LLaMA-7B at 20% of
parameters removed, WikiText-2 perplexity at window 128 (dense 12.62): 19.09, average zero-shot
56.7 without tuning and 59.2 with LoRA (dense 63.3); Llama-2-7B at 20% / 40%, window 1024: 17.5 /
51.1 (FLAP 10.3 / 38.9); Llama-3-8B at 17.7% removed, window 2048: 6.14 → 12.86. The reference
calibrates on 10 samples of 64 tokens; its LoRA recovery trains on Alpaca, which prunekit does
not do. The paper's vector-wise and element-wise variants are both here; which one wins is the
paper's own table, not restated.

Where the reference code (horseee/LLM-Pruner ``hf_prune.py``, ``LLMPruner/pruner/hf_llama_pruner.py``)
and this file differ:

- The reference computes all gradients in one backward pass over the whole model (its memory
  problem); here one layer's at a time, which gives the same gradients (a layer's weight
  gradient does not depend on which other weights require gradients).
- The reference's grouped-query (Llama-3) support prunes whole key/value groups; prunekit's
  units are query heads, with key/value heads kept whole and reserved at full cost (a group whose
  query heads all go takes its key/value head with it), as every method here.
- The reference's ``pruning_ratio`` is a fraction of the pruned layers' channels; prunekit picks
  the ratio that meets the model-wide budget (parameters, FLOPs or measured latency).
- Biases and norms are not part of a group's importance (they are not in the reference's
  Taylor sum for Linear layers either); the second-order variants (``param_second``,
  ``param_mix``, a diagonal Fisher) are left out.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from prunekit.core.errors import ConfigError
from prunekit.core.view import AttentionParts, FfnParts, ModelAdapter
from prunekit.methods.activations import BudgetConfig, plan_of, uniform_ratio, unit_budget
from prunekit.methods.layerwise import model_inputs
from prunekit.methods.search import SublayerId, total_cost
from prunekit.tasks.task_data import TaskData

logger = logging.getLogger(__name__)

LABEL_KEYS = ("labels", "start_positions", "end_positions")


@dataclass(frozen=True)
class LlmPrunerConfig(BudgetConfig):
    """LLM-Pruner (NeurIPS 2023) without LoRA: first-order Taylor importance of coupled groups."""

    aggregation: str = "element"  # "element" (Σ|w·g|, the paper's best) or "vector" (Σ over vectors |Σ w·g|)
    protected_first: int | None = None  # first layers left whole; None: round(L/8), at least 1
    protected_last: int | None = None  # last layers left whole; None: round(L/16), at least 1
    layers_per_pass: int = 1  # layers whose gradients one backward pass takes: memory for time

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.aggregation not in ("element", "vector"):
            raise ConfigError(f"aggregation must be 'element' or 'vector', got {self.aggregation!r}")
        for name in ("protected_first", "protected_last"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name} must be 0 or more, got {value}")
        if self.layers_per_pass < 1:
            raise ConfigError(f"layers_per_pass must be 1 or more, got {self.layers_per_pass}")


def llm_pruner(adapter: ModelAdapter, data: TaskData, config: LlmPrunerConfig) -> tuple:
    """The LLM-Pruner plan under the budget, and a log; the teacher is left unchanged (its
    requires_grad flags are put back and no gradient stays on it)."""
    layers = pruned_layers(adapter.num_layers, config)
    costs, budget, seq_len = unit_budget(adapter, data.sample, config)
    ratio, counts = uniform_ratio(adapter, costs, budget, "llm_pruner", layers)
    keep: dict[SublayerId, torch.Tensor] = {}
    order = sorted(layers)
    for start in range(0, len(order), config.layers_per_pass):
        chunk = order[start:start + config.layers_per_pass]
        for (kind, layer), scores in taylor_importance(adapter, chunk, data, config.aggregation).items():
            ranked = torch.sort(-scores, stable=True).indices  # ties: the lower index first
            keep[(kind, layer)] = torch.sort(ranked[: counts[kind]]).values
    cost = total_cost(costs, {key: int(units.numel()) for key, units in keep.items()}
                      | {key: (adapter.full_num_heads if key[0] == "attn" else adapter.full_intermediate_size)
                         for key in costs if key[1] not in layers})
    logger.info("llm_pruner: layers %s at ratio %.4f, cost %.4g of budget %.4g", sorted(layers), ratio, cost, budget)
    return plan_of(adapter, keep), {"config": asdict(config), "seq_len": seq_len, "budget_kind": config.budget_kind,
                                    "budget": budget, "pruned_layers": sorted(layers), "pruning_ratio": ratio,
                                    "kept_per_layer": counts, "search": {"cost": cost}}


def pruned_layers(num_layers: int, config: LlmPrunerConfig) -> set[int]:
    """The layers LLM-Pruner prunes: all but the protected first and last ones."""
    first = config.protected_first if config.protected_first is not None else max(1, round(num_layers / 8))
    last = config.protected_last if config.protected_last is not None else max(1, round(num_layers / 16))
    layers = set(range(first, num_layers - last))
    if not layers:
        raise ConfigError(f"llm_pruner leaves the first {first} and last {last} of {num_layers} layers whole, so "
                          "none is left to prune; lower protected_first / protected_last")
    return layers


def taylor_importance(adapter: ModelAdapter, layers: list[int], data: TaskData, aggregation: str
                      ) -> dict[SublayerId, torch.Tensor]:
    """Steps 2-3 for ``layers`` (one backward pass per batch for all of them): per query head (H,)
    and per neuron (d_ff,), the group's first-order Taylor importance from the gradient of the mean
    task loss over the sample's batches."""
    parts = {layer: (adapter.attention(layer), adapter.ffn(layer)) for layer in layers}
    linears = [lin for attn, ffn in parts.values() for lin in _linears(attn, ffn)]
    batches = data.sample.batches
    with _gradients_only_for(adapter.model, linears):
        for batch in batches:
            (_task_loss(adapter.model, batch, data.kind) / len(batches)).backward()
        salience = {id(lin): (lin.weight.detach() * lin.weight.grad).double().cpu() for lin in linears}
    scores: dict[SublayerId, torch.Tensor] = {}
    for layer, (attn, ffn) in parts.items():
        scores |= {(kind, layer): value for kind, value in _group_scores(adapter, attn, ffn, salience,
                                                                         aggregation).items()}
    return scores


def _group_scores(adapter: ModelAdapter, attn: AttentionParts | None, ffn: FfnParts | None,
                  salience: dict[int, torch.Tensor], aggregation: str) -> dict[str, torch.Tensor]:
    """Step 3 for one layer from its weights' w·g: per query head and per neuron."""
    scores: dict[str, torch.Tensor] = {}
    if attn is not None:
        rows = [attn.query] + ([] if adapter.grouped_kv else [attn.key, attn.value])  # a head's own rows
        per_dim = sum(_reduce(salience[id(lin)], 1, aggregation) for lin in rows)  # (H·d_h,)
        per_dim = per_dim + _reduce(salience[id(attn.out)], 0, aggregation)
        scores["attn"] = per_dim.view(attn.num_heads, attn.head_dim).sum(1)  # (H,)
    if ffn is not None:
        rows = [ffn.up] + ([ffn.gate] if ffn.gate is not None else [])
        scores["ffn"] = sum(_reduce(salience[id(lin)], 1, aggregation) for lin in rows) + _reduce(
            salience[id(ffn.down)], 0, aggregation)  # (d_ff,)
    return scores


def _reduce(salience: torch.Tensor, dim: int, aggregation: str) -> torch.Tensor:
    """Per row (``dim`` 1: output units of Q/K/V/up/gate) or column (``dim`` 0: input units of
    out/down) of w·g: Σ|w·g| (element) or |Σ w·g| (vector)."""
    return salience.abs().sum(dim) if aggregation == "element" else salience.sum(dim).abs()


def _linears(attn: AttentionParts | None, ffn: FfnParts | None) -> list[nn.Linear]:
    linears = []
    if attn is not None:
        linears += [attn.query, attn.key, attn.value, attn.out]
    if ffn is not None:
        linears += [ffn.up, ffn.down] + ([ffn.gate] if ffn.gate is not None else [])
    return linears


@contextmanager
def _gradients_only_for(model: nn.Module, linears: list[nn.Linear]) -> Iterator[None]:
    """Only these linears' weights require gradients inside the block (so autograd records only
    from that layer up and keeps one layer's gradients); every flag and gradient is put back."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for lin in linears:
            lin.weight.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, flag, grad in zip(params, flags, grads, strict=True):
            p.grad = grad
            p.requires_grad_(flag)


def _task_loss(model: nn.Module, batch: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """The model's own loss: the batch's labels, or for a causal LM without them the next-token
    loss of its own ids; padding positions are no targets."""
    labels = {key: batch[key] for key in LABEL_KEYS if key in batch}
    if not labels and kind == "lm":
        labels = {"labels": batch["input_ids"]}
    if not labels:
        raise ConfigError("LLM-Pruner's Taylor importance needs the task loss, but the calibration batches have no "
                          "labels; build the sample from the task's labelled training split")
    if "labels" in labels and labels["labels"].shape == batch["input_ids"].shape and "attention_mask" in batch:
        labels["labels"] = labels["labels"].masked_fill(batch["attention_mask"] == 0, -100)
    return model(**model_inputs(batch), **labels).loss
