"""Kwon et al.: a fast post-training pruning framework for Transformers (NeurIPS 2022), spec
kprune_kwon.md §3 and §7.

1. Fisher information: one forward and backward pass of the task loss with the sample's labels,
   with an all-ones mask on every head and every FFN neuron; the per-batch mask gradients g_b are
   kept, and the diagonal Fisher of a unit is Σ_b g_b² (§3.2).
2. Mask search: the exact two-type knapsack under the FLOPs budget (or the layer-dropping search
   under a latency budget), once at the target C and once at the teacher-assistant budget √C
   (§3.3, §3.4; ``prunekit.methods.search``).
3. Mask rearrangement: per layer and unit type, a greedy swap search with the block-diagonal
   Fisher built from the per-batch gradients; the number of kept units does not change (§3.5).
4. Mask tuning: layer by layer, the kept units' mask values are re-fitted by damped linear least
   squares so that each sublayer's residual sum matches the teacher-assistant model's (§3.6).
5. Surgery: the tuned real-valued masks are folded into the output projections and the pruned
   units are removed (P15), so the saved model is physically smaller and computes what the
   masked model computes.

Differences from the reference code, from spec §7:
- P6: a solve that fails, or gives a scale with |x| > ``max_scale``, skips only that sublayer (its
  scales stay 1) and is logged; later layers are still tuned. The damping is a proper ridge,
  min ‖A x − b‖² + damp²·‖x − 1‖², solved in float64 by Cholesky, not LSMR on the Gram system.
- P10: the latency search resets its budget for every configuration and can drop every layer.
- P11: masks are pre-hooks on the output projections (``prunekit.core.masks``), not ``head_mask``.
- P15: the masks are folded into the weights; the reference only ever returned masks.
Kept as the reference does it: per-batch (not per-example) gradients (P8); the teacher-assistant
model at √C as the tuning target; no tuning of the first layer's attention; for sequence-level heads
(classification, regression) the last layer is fitted on the token the head reads only (the first,
[CLS], or the last non-padding one, as the adapter's ``pooled_token`` says); the MHA
system has an extra all-ones column, a shared offset whose coefficient is dropped (a constant added
to every entry of the residual sum is removed by the LayerNorm that follows). That offset is used
only where the family states such a LayerNorm (``BlockFacts.offset_absorbed``: post-norm LayerNorm);
after an RMSNorm or in a pre-norm block a constant is not removed, so the system has no offset column.
The target subtracts the output bias only where the output projection has one.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from prunekit.core.accounting import (
    budget_kind_of,
    check_budget,
    count_non_embedding_params,
    kv_head_flops,
    params_unit_budget,
    query_and_neuron_budget,
)
from prunekit.core.errors import ConfigError
from prunekit.core.masks import apply_masks, frozen_for_masks, full_masks
from prunekit.core.memory import memory_policy
from prunekit.core.preflight import check_config_values
from prunekit.core.surgery import LayerPlan, PruningPlan
from prunekit.core.view import ModelAdapter, unit_columns
from prunekit.methods.layerwise import LayerRunner, capture_residual, model_inputs
from prunekit.methods.lut import per_unit_costs, sublayer_costs
from prunekit.methods.search import SublayerId, full_widths, knapsack_search, params_costs, total_cost
from prunekit.tasks.losses import TASK_KINDS, next_token_loss
from prunekit.tasks.task_data import TaskData

logger = logging.getLogger(__name__)

LABEL_KEYS = ("labels", "start_positions", "end_positions")


@dataclass(frozen=True)
class KwonConfig:
    """Kwon et al.'s settings; defaults are the reference code's (spec §3.1, §3.6)."""

    keep_flops: float = 0.5  # fraction of the encoder FLOPs kept, in (0, 1]; unused with keep_latency
    keep_latency: float | None = None  # fraction of the latency kept (needs ``lut``); replaces keep_flops
    lut: str | None = None  # latency table JSON from `prunekit lut`, for keep_latency
    seq_len: float | None = None  # FLOPs sequence length; None: the sample's mean length
    rearrange: bool = True  # step 3, mask rearrangement
    tuning: bool = True  # step 4, least-squares mask tuning
    teacher_keep: float | None = None  # budget of the teacher-assistant masks; None: √(keep)
    damp: float = 1.0  # ridge: min ‖A x − b‖² + damp² ‖x − 1‖²
    max_scale: float = 10.0  # a tuned |scale| above this rejects that sublayer's solution
    tune_first_attention: bool = False  # the reference never tunes layer 0's attention
    keep_params: float | None = None  # fraction of the non-embedding parameters kept; replaces keep_flops
    # Sequences per Fisher gradient: None, one per calibration batch (the reference, spec P8); 1,
    # one per sequence (the paper's per-example Fisher; a causal LM's windows: many more
    # gradients from the same tokens and passes).
    fisher_rows: int | None = None

    def __post_init__(self) -> None:
        check_config_values(self)  # types, and finite numbers
        if self.fisher_rows is not None and (not isinstance(self.fisher_rows, int) or self.fisher_rows < 1):
            raise ConfigError(f"fisher_rows must be a positive integer or None, got {self.fisher_rows!r}")
        check_budget(self.keep_flops, self.keep_latency, self.lut, self.seq_len, self.keep_params)
        if self.teacher_keep is not None and not 0.0 < self.teacher_keep <= 1.0:
            raise ConfigError(f"teacher_keep must be in (0, 1] or None (√ of the budget), got {self.teacher_keep}")
        if self.damp < 0:
            raise ConfigError(f"damp must be >= 0, got {self.damp}")
        if self.max_scale <= 0:
            raise ConfigError(f"max_scale must be positive, got {self.max_scale}")

    @property
    def keep(self) -> float:
        """The budget's fraction: of parameters with ``keep_params``, of latency with
        ``keep_latency``, else of FLOPs."""
        if self.keep_params is not None:
            return self.keep_params
        return self.keep_latency if self.keep_latency is not None else self.keep_flops


@dataclass
class FisherGradients:
    """Per-batch mask gradients of the task loss: heads[l] is (num_batches, H), neurons[l] is
    (num_batches, d_ff). Depends only on the model and the sample, so one set serves every budget."""

    heads: dict[int, torch.Tensor]
    neurons: dict[int, torch.Tensor]
    num_batches: int
    seconds: float

    def grads(self, key: SublayerId) -> torch.Tensor:
        kind, layer = key
        return self.heads[layer] if kind == "attn" else self.neurons[layer]

    def scores(self) -> dict[SublayerId, torch.Tensor]:
        """Diagonal Fisher per unit, Σ_b g_b² (not normalised, as the reference)."""
        scores = {("attn", layer): (g.double() ** 2).sum(0) for layer, g in self.heads.items()}
        scores |= {("ffn", layer): (g.double() ** 2).sum(0) for layer, g in self.neurons.items()}
        return scores


def kwon(adapter: ModelAdapter, data: TaskData, config: KwonConfig) -> tuple[PruningPlan, dict]:
    """Kwon et al.'s plan for the model of ``adapter`` (left unchanged: masks only, as hooks) and a log.

    Args:
        adapter: the view of a fine-tuned model (the teacher).
        data: ``data.kind`` ("classification", "regression" or "qa") and ``data.sample``, a
            calibration sample whose batches carry labels (``labels``, or ``start_positions`` and
            ``end_positions`` for QA), plus ``num_sequences`` and ``mean_length``;
            ``data.prepared``, Fisher gradients from :func:`kwon_fisher` on this model and sample
            to reuse across budgets (computed here when None).
    """
    sample, kind, prepared = data.sample, data.kind, data.prepared
    if kind not in TASK_KINDS:
        raise ConfigError(f"unknown task kind {kind!r}; expected one of {TASK_KINDS}")
    model = adapter.model
    seq_len = config.seq_len or sample.mean_length
    costs, budget_of, full = _budget(adapter, seq_len, config)
    fisher = prepared if prepared is not None else _fisher(adapter, sample, kind, config.fisher_rows)
    _check_fisher(fisher, adapter, sample, config.fisher_rows)
    scores = fisher.scores()

    start = time.perf_counter()
    target = knapsack_search(scores, costs, budget_of(config.keep))
    teacher_keep = config.teacher_keep or math.sqrt(config.keep)
    assistant = knapsack_search(scores, costs, budget_of(teacher_keep))
    search_seconds = time.perf_counter() - start
    logger.info("kwon: search kept %d heads and %d neurons (cost %.4g of budget %.4g); teacher-assistant at %.3f",
                *_totals(target.keep), target.cost, target.budget, teacher_keep)

    kept, rearranged = dict(target.keep), []
    if config.rearrange:
        kept, rearranged = _rearrange_masks(kept, fisher)
    scales, tuning = {}, []
    if config.tuning:
        scales, tuning = _tune_masks(model, adapter, sample, kind, kept, assistant.keep, config)
    plan = _plan(adapter, kept, scales)
    log = {
        "config": asdict(config),
        "seq_len": seq_len,
        "budget_kind": budget_kind_of(config),
        "budget": target.budget,
        "full_cost": full,
        "search": {"value": target.value, "cost": target.cost, **target.details, "seconds": search_seconds},
        "teacher_assistant": {"keep": teacher_keep, "counts": _per_layer_counts(assistant.keep, adapter)},
        "fisher_seconds": fisher.seconds,
        "rearrangement": rearranged,
        "tuning": tuning,
    }
    return plan, log


def _budget(adapter: ModelAdapter, seq_len: float, config: KwonConfig):
    """The search's per-sublayer costs, the budget of a kept fraction, and the full cost."""
    if config.keep_params is not None:
        # Non-embedding parameters: everything outside the searched units stays, so the units
        # must shed (1 - keep) of the model's parameters (accounting.params_unit_budget).
        full = float(count_non_embedding_params(adapter))
        return params_costs(adapter), lambda keep: params_unit_budget(adapter, keep)[1], full
    costs = sublayer_costs(adapter, seq_len, config.lut if config.keep_latency is not None else None)
    kv = 0.0 if config.keep_latency is not None else kv_head_flops(per_unit_costs(adapter, seq_len), adapter)
    full = total_cost(costs, full_widths(adapter)) + kv
    return costs, lambda keep: query_and_neuron_budget(keep, full, kv), full


# ---- 1. Fisher information (§3.2) ------------------------------------------------------------------
def _task_loss(runner: LayerRunner, batch: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """The model's own task loss with the batch's ground-truth labels (``outputs.loss``); a causal
    LM's is computed a chunk of positions at a time (``next_token_loss``), its logits never whole."""
    labels = {key: batch[key] for key in LABEL_KEYS if key in batch}
    if not labels:
        raise ConfigError("Kwon et al.'s Fisher information needs labels, but the calibration batches have none; "
                          "build the sample from the task's labelled training split")
    if "labels" in labels and labels["labels"].shape == batch["input_ids"].shape and "attention_mask" in batch:
        # Token labels (causal LM): padding positions are no targets (-100 is the loss's ignore index).
        labels["labels"] = labels["labels"].masked_fill(batch["attention_mask"] == 0, -100)
    if kind == "lm":
        return next_token_loss(runner.outputs_from(0, None, batch, kind), labels["labels"])
    return runner.model(**model_inputs(batch), **labels).loss


def kwon_fisher(adapter: ModelAdapter, data: TaskData, config: KwonConfig | None = None
                ) -> FisherGradients:
    """Step 1, reusable across budgets (``data.prepared``): per-batch gradients of the task loss
    with respect to an all-ones mask on every head (H,) and FFN neuron (d_ff,) of every layer."""
    return _fisher(adapter, data.sample, data.kind, config.fisher_rows if config is not None else None)


def _row_chunks(batch: dict[str, torch.Tensor], rows: int | None) -> list[dict[str, torch.Tensor]]:
    """The batch itself (rows None), or its sequences ``rows`` at a time."""
    size = batch["input_ids"].shape[0]
    if rows is None or rows >= size:
        return [batch]
    return [{key: value[start : start + rows] for key, value in batch.items()} for start in range(0, size, rows)]


def _fisher(adapter: ModelAdapter, sample: Any, kind: str, rows: int | None = None) -> FisherGradients:
    model = adapter.model
    runner = LayerRunner(model, adapter)
    start = time.perf_counter()
    head_masks, neuron_masks = full_masks(adapter, requires_grad=True)
    heads: dict[int, list[torch.Tensor]] = {layer: [] for layer in head_masks}
    neurons: dict[int, list[torch.Tensor]] = {layer: [] for layer in neuron_masks}
    # A causal LM's backward pass through every layer would hold every layer's intermediates, 7 GB
    # for 4,096 tokens of SmolLM2-135M: its layers recompute them instead (the mask hooks only scale).
    # Its temporaries (a layer's intermediates, a chunk's logits: 4-70 MB each) then get mappings of
    # their own, given back on free: left on glibc's heap, the freed ones kept the Fisher pass at
    # 3.5 GB of RSS instead of 1.3 (benchmarks/results/llm_memory.md).
    recomputed = runner.recomputed_layers() if kind == "lm" else nullcontext()
    allocator = memory_policy(low_memory=True) if kind == "lm" else nullcontext()
    with frozen_for_masks(model), apply_masks(adapter, head_masks, neuron_masks), recomputed, allocator:
        for batch in tqdm(sample.batches, desc="kwon: Fisher information", leave=False):
            for chunk in _row_chunks(batch, rows):
                _task_loss(runner, chunk, kind).backward()  # a mean loss: one gradient per batch (P8) or chunk
                for store, masks in ((heads, head_masks), (neurons, neuron_masks)):
                    for layer, mask in masks.items():
                        store[layer].append(mask.grad.detach().float().cpu())
                        mask.grad = None
    fisher = FisherGradients(
        heads={layer: torch.stack(g) for layer, g in heads.items()},  # (num_batches, H)
        neurons={layer: torch.stack(g) for layer, g in neurons.items()},  # (num_batches, d_ff)
        num_batches=sum(len(_row_chunks(batch, rows)) for batch in sample.batches),
        seconds=time.perf_counter() - start,
    )
    logger.info("kwon: Fisher information from %d batches in %.1f s", fisher.num_batches, fisher.seconds)
    return fisher


def _check_fisher(fisher: FisherGradients, adapter: ModelAdapter, sample: Any, rows: int | None = None) -> None:
    expected = sum(len(_row_chunks(batch, rows)) for batch in sample.batches)
    if fisher.num_batches != expected:
        raise ValueError(f"the Fisher gradients are of {fisher.num_batches} batches, the sample has {expected} "
                         "(batches, or chunks of fisher_rows sequences)")
    for layer, shape in enumerate(adapter.layer_shapes()):
        for store, width in ((fisher.heads, shape.num_heads), (fisher.neurons, shape.intermediate_size)):
            have = store[layer].shape[1] if layer in store else 0
            if have != width:
                raise ValueError(f"the Fisher gradients were taken on another model (layer {layer}: {have} units, "
                                 f"the model has {width})")


# ---- 3. Mask rearrangement (§3.5) ------------------------------------------------------------------
def _rearrange_masks(kept: dict[SublayerId, torch.Tensor], fisher: FisherGradients
                     ) -> tuple[dict[SublayerId, torch.Tensor], list[dict]]:
    new, log = {}, []
    for key, units in sorted(kept.items(), key=lambda item: (item[0][1], item[0][0])):
        grads = fisher.grads(key).double()  # (num_batches, n)
        new[key], before, after = _rearrange(units, grads)
        log.append({"layer": key[1], "sublayer": key[0], "changed": not torch.equal(new[key], units),
                    "block_fisher_before": before, "block_fisher_after": after})
    return new, log


def _rearrange(kept: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Greedy swap search of one layer's pruned set P (same size), minimising the block-diagonal
    Fisher loss ‖Σ_{i∈P} g_i‖² over batches. Returns the kept units and the loss before and after."""
    num_batches, n = grads.shape
    is_kept = torch.zeros(n, dtype=torch.bool)
    is_kept[kept] = True
    diagonal = (grads**2).sum(0)  # (n,)
    ascending = torch.sort(diagonal, stable=True).indices
    pruned = ascending[~is_kept[ascending]]  # the search's pruned set, lowest Fisher first
    others = ascending[is_kept[ascending]]
    total = grads[:, pruned].sum(1)  # (num_batches,) Σ_{i∈P} g_i
    before = float(total @ total)
    if pruned.numel() == 0 or others.numel() == 0:
        return kept, before, before
    columns = grads.T.contiguous()  # (n, num_batches)
    for unit in others:
        candidates = torch.cat([pruned, unit.view(1)])  # P ∪ {u}
        grown = total + columns[unit]
        loss = ((grown[None, :] - columns[candidates]) ** 2).sum(1)  # (|P| + 1,) loss without each member
        drop = int(torch.argmin(loss))  # the first minimum: a fixed order among ties
        total = grown - columns[candidates[drop]]
        pruned = torch.cat([candidates[:drop], candidates[drop + 1:]])
    is_kept[:] = True
    is_kept[pruned] = False
    return torch.nonzero(is_kept).flatten(), before, float(total @ total)


# ---- 4. Mask tuning (§3.6) -------------------------------------------------------------------------
def _binary_masks(adapter: ModelAdapter, kept: dict[SublayerId, torch.Tensor]
                  ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """0/1 mask vectors ({l: (H,)}, {l: (d_ff,)}) keeping ``kept`` units."""
    heads, neurons = full_masks(adapter)
    for (kind, layer), units in kept.items():
        store = heads if kind == "attn" else neurons
        mask = torch.zeros_like(store[layer])
        mask[units.to(mask.device)] = 1.0
        store[layer] = mask
    return heads, neurons


def _rows(batch: dict[str, torch.Tensor], pooled_only: bool, pooled_token: str = "first") -> torch.Tensor:
    """(B, T) bool: the token rows a layer is fitted on (non-padding, or only the token a sequence
    head reads: the first, [CLS], or the last non-padding one, for left or right padding)."""
    mask = batch["attention_mask"].bool()
    if pooled_only:
        if pooled_token == "last":
            positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
            index = (mask * positions).argmax(1)  # (B,) the last position whose mask is 1
        else:
            index = torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
        mask = torch.zeros_like(mask)
        mask[torch.arange(mask.shape[0], device=mask.device), index] = True
    return mask


def _tune_masks(model, adapter, sample, kind, kept, assistant, config) -> tuple[dict, list[dict]]:
    """Tune the kept units' mask values layer by layer against the teacher-assistant model.

    Both models are the same weights under different masks; each is propagated one layer at a
    time from per-batch layer inputs. Returns {key: (units,) scales} for the tuned sublayers and a
    status per sublayer.
    """
    student_masks = _binary_masks(adapter, kept)
    teacher_masks = _binary_masks(adapter, assistant)
    runner = LayerRunner(model, adapter)
    batches = sample.batches
    scales: dict[SublayerId, torch.Tensor] = {}
    steps = []
    with frozen_for_masks(model), torch.no_grad():
        hidden = [runner.layer_input(0, batch) for batch in batches]  # (B, T, d): both start here
        t_hidden, s_hidden = hidden, hidden
        last = adapter.num_layers - 1
        for layer in tqdm(range(adapter.num_layers), desc="kwon: mask tuning", leave=False):
            # A sequence head reads one token in the last layer; QA and LM heads read every token.
            rows = [_rows(b, kind in ("classification", "regression") and layer == last, adapter.pooled_token)
                    for b in batches]
            with apply_masks(adapter, *teacher_masks):
                residuals, t_hidden = _teacher_layer(runner, adapter, layer, t_hidden, batches, rows)
            for sub in ("attn", "ffn"):
                step = _tune_sublayer(runner, adapter, layer, sub, s_hidden, batches, rows, residuals,
                                      kept, student_masks, config)
                if "scales" in step:
                    scales[(sub, layer)] = step.pop("scales")
                steps.append(step)
                if step["status"] != "tuned":
                    logger.info("kwon: layer %d %s not tuned: %s", layer, sub, step["status"])
            with apply_masks(adapter, *student_masks):
                s_hidden = [runner.run_layer(layer, h, b) for h, b in zip(s_hidden, batches, strict=True)]
    return scales, steps


def _teacher_layer(runner, adapter, layer, hidden, batches, rows):
    """The teacher-assistant's residual sums R = X + O (N_rows, d) per batch for both sublayers of
    ``layer``, and its layer outputs (the next layer's inputs)."""
    residuals: dict[str, list[torch.Tensor]] = {}
    outputs = []
    with ExitStack() as stack:
        captures = {}
        for sub in ("attn", "ffn"):
            if adapter.sublayer(layer, sub) is not None:
                captures[sub] = stack.enter_context(capture_residual(adapter, layer, sub))
                residuals[sub] = []
        for h, batch, r in zip(hidden, batches, rows, strict=True):
            outputs.append(runner.run_layer(layer, h, batch))
            for sub, record in captures.items():
                residuals[sub].append((record["input"] + record["output"])[r])
    return residuals, outputs


def _tune_sublayer(runner, adapter, layer, sub, hidden, batches, rows, residuals, kept, masks, config) -> dict:
    step: dict[str, Any] = {"layer": layer, "sublayer": sub}
    units = kept.get((sub, layer))
    parts = adapter.sublayer(layer, sub)
    if parts is None or units is None:
        return step | {"status": "skipped: sublayer already empty"}
    if units.numel() == 0:
        return step | {"status": "skipped: no units kept"}
    if sub == "attn" and layer == 0 and not config.tune_first_attention:
        return step | {"status": "skipped: first attention (as the reference)"}
    if adapter.facts.output_norm:  # norm(X·W) is not linear in the unit scales (BlockFacts.output_norm)
        return step | {"status": "skipped: output norm after the projection"}
    out, unit_size = parts.output, parts.unit_size
    stats = _normal_equations(runner, adapter, layer, sub, out, hidden, batches, rows, residuals[sub], masks)
    offset = sub == "attn" and adapter.facts.offset_absorbed
    gram, cross = _unit_system(stats, out.weight.detach(), units, unit_size, offset=offset)
    x, info = _solve(gram, cross, stats["y_sq"], units.numel(), config)
    step |= info
    if x is not None:
        store = masks[0] if sub == "attn" else masks[1]
        store[layer][units.to(store[layer].device)] *= x.to(store[layer])
        step["scales"] = x.float().cpu()
    return step


def _normal_equations(runner, adapter, layer, sub, out, hidden, batches, rows, residuals, masks) -> dict:
    """Accumulate, over the student's batches, the statistics of the least-squares problem for the
    output-projection input Z (N, width) and the target Y = R_teacher − b − X_student (N, d):
    ZᵀZ, ZᵀY, Σ Z, Σ Y, ‖Y‖² and the entry count, all float64."""
    width, d = out.in_features, out.out_features
    device = out.weight.device
    zz = torch.zeros(width, width, dtype=torch.float64, device=device)
    zy = torch.zeros(width, d, dtype=torch.float64, device=device)
    z_sum = torch.zeros(width, dtype=torch.float64, device=device)
    y_sum = torch.zeros((), dtype=torch.float64, device=device)
    y_sq = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    bias = out.bias.detach() if out.bias is not None else torch.zeros(d, device=device)
    record: dict[str, torch.Tensor] = {}

    def take_input(module, args):
        record["x"] = args[0]

    def take_z(module, args):
        record["z"] = args[0]  # registered after the masks: the current (masked) contribution

    with apply_masks(adapter, *masks):
        handles = [adapter.sublayer_module(layer, sub).register_forward_pre_hook(take_input),
                   out.register_forward_pre_hook(take_z)]
        try:
            for h, batch, r, target in zip(hidden, batches, rows, residuals, strict=True):
                runner.run_layer(layer, h, batch)
                # Products in float32 at least: a half model's (GPU) ZᵀZ would keep 8 bits of each sum.
                z = record["z"][r].float()  # (N, width)
                y = (target - record["x"][r] - bias).float()  # (N, d)
                zz += (z.T @ z).double()
                zy += (z.T @ y).double()
                z_sum += z.sum(0).double()
                y_sum += y.sum().double()
                y_sq += (y * y).sum().double()
                count += y.numel()
        finally:
            for handle in handles:
                handle.remove()
    return {"zz": zz, "zy": zy, "z_sum": z_sum, "y_sum": y_sum, "y_sq": y_sq, "count": count}


def _unit_system(stats, weight, units, unit_size, offset: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram matrix G = AᵀA and right-hand side c = Aᵀb of the unit-scale problem, without forming A.

    Column u of A is unit u's contribution to the residual sum, Z_u W_uᵀ flattened over (tokens, d),
    so G_uv = Σ_{a∈u, b∈v} (ZᵀZ)_ab (WᵀW)_ab and c_u = Σ_{a∈u} Σ_r (ZᵀY)_ar W_ra. With ``offset``
    an all-ones column is appended (§3.6).
    """
    n = units.numel()
    columns = unit_columns(units, unit_size).to(weight.device)  # (n·s,)
    w = weight.double()[:, columns]  # (d, n·s)
    zz = stats["zz"][columns][:, columns]  # (n·s, n·s)
    gram = (zz * (w.T @ w)).view(n, unit_size, n, unit_size).sum((1, 3))  # (n, n)
    cross = (stats["zy"][columns] * w.T).sum(1).view(n, unit_size).sum(1)  # (n,)
    if offset:
        with_ones = (stats["z_sum"][columns] * w.sum(0)).view(n, unit_size).sum(1)  # (n,) Σ of each column of A
        count = torch.tensor([[float(stats["count"])]], dtype=torch.float64, device=gram.device)
        gram = torch.cat([torch.cat([gram, with_ones[:, None]], 1), torch.cat([with_ones[None, :], count], 1)], 0)
        cross = torch.cat([cross, stats["y_sum"].view(1)])
    return gram, cross


def _solve(gram, cross, y_sq, n, config) -> tuple[torch.Tensor | None, dict]:
    """Ridge solve for the scales x: min ‖A x − b‖² + damp² ‖x − x0‖², x0 = 1 (0 for the offset)."""
    x0 = torch.zeros(gram.shape[0], dtype=torch.float64, device=gram.device)
    x0[:n] = 1.0

    def residual(x: torch.Tensor) -> float:
        return float(x @ gram @ x - 2 * x @ cross + y_sq)

    system = gram + (config.damp**2) * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    try:
        factor = torch.linalg.cholesky(system)
        x = x0 + torch.cholesky_solve((cross - gram @ x0)[:, None], factor)[:, 0]
    except RuntimeError as err:  # torch.linalg.LinAlgError included
        return None, {"status": f"failed: {str(err).splitlines()[0]}"}
    if not torch.isfinite(x).all():
        return None, {"status": "failed: solution not finite"}
    scale = x[:n]
    info = {"residual_before": residual(x0), "residual_after": residual(x),
            "max_abs_scale": float(scale.abs().max())}
    if info["max_abs_scale"] > config.max_scale:
        return None, info | {"status": f"rejected: |scale| {info['max_abs_scale']:.3g} > {config.max_scale}"}
    return scale, info | {"status": "tuned"}


# ---- 5. The plan ----------------------------------------------------------------------------------
def _plan(adapter: ModelAdapter, kept: dict[SublayerId, torch.Tensor], scales: dict[SublayerId, torch.Tensor]
          ) -> PruningPlan:
    """Kept units per layer, with the tuned scales over all of the layer's current units (1 where
    not tuned); surgery folds them into the output projection (P15)."""
    plan = PruningPlan(layers=[LayerPlan() for _ in range(adapter.num_layers)])
    for (kind, layer), units in kept.items():
        step = plan.layers[layer]
        full_scale = None
        if (kind, layer) in scales:
            full_scale = torch.ones(adapter.sublayer(layer, kind).num_units, dtype=torch.float64)
            full_scale[units] = scales[(kind, layer)].double()
        if kind == "attn":
            step.heads, step.head_scales = units.tolist(), full_scale
        else:
            step.neurons, step.neuron_scales = units.tolist(), full_scale
    return plan


def _totals(keep: dict[SublayerId, torch.Tensor]) -> tuple[int, int]:
    heads = sum(int(units.numel()) for (kind, _), units in keep.items() if kind == "attn")
    neurons = sum(int(units.numel()) for (kind, _), units in keep.items() if kind == "ffn")
    return heads, neurons


def _per_layer_counts(keep: dict[SublayerId, torch.Tensor], adapter: ModelAdapter) -> list[dict[str, int]]:
    return [{"heads": int(keep.get(("attn", layer), torch.zeros(0)).numel()),
             "neurons": int(keep.get(("ffn", layer), torch.zeros(0)).numel())} for layer in range(adapter.num_layers)]

