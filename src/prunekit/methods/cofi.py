"""CoFi (Xia, Zhong and Chen, ACL 2022): training-based structured pruning with L0 gates at every
granularity, a Lagrangian sparsity controller and layerwise distillation (spec cofi.md).

Algorithm (cofi.md §0-§5), as run by :func:`cofi`:

    student ← copy of the teacher (or --student-init); gates g (heads, attention sublayers,
        FFN neurons, FFN sublayers, hidden dims), log α ~ N(10, 0.01²) (neurons N(0, 0.01²));
        W_layer ← identity; λ₁ = λ₂ = 0
    for step s = 1 .. S_prune:
        z ~ HardConcrete(log α)                   (one sample per micro-batch, shared by the batch)
        L = α_pred · T²·KL(p_T ‖ p_S) + α_layer · Σ_{i∈T} min_j MSE(W_layer H_S^j, H_T^i)
        if s > S_pre:                             (pre-pruning distillation first, if any)
            t = t_final · min(1, (s − S_pre) / W)      ŝ = 1 − E[size | log α] / M
            L += λ₁ (ŝ − t) + λ₂ (ŝ − t)²
        θ, log α ← AdamW descent on L;  λ ← AdamW ascent on L;  clamp log α to [log 0.01, log 100]
        every k steps: evaluate with deterministic gates; keep the best state once ŝ ≥ t_final − ε
    fold the deterministic gate values into the weights; remove closed heads, neurons, whole
        sublayers and hidden dims (prunekit.core.surgery)
    fine-tune the small model with the same distillation loss, keeping the best dev state

Size is the expected number of prunable encoder parameters (``keep_params``, CoFi's sparsity is
1 − keep_params) or, beyond the paper, the expected encoder FLOPs from ``prunekit.core.accounting``
(``keep_flops``). Training runs on Hugging Face Accelerate, so the same code runs on CPU, a GPU or
(with ``accelerate launch``) several, with mixed precision, gradient accumulation, checkpoints
and resume. The model is reached only through the adapter, the gates only through
``prunekit.core.masks.apply_gates``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.core.accounting import (
    count_flops,
    count_prunable_params,
    full_flops,
    full_prunable_params,
    unit_costs,
)
from prunekit.core.errors import ConfigError, ModelError
from prunekit.core.masks import GateHolder, apply_gates
from prunekit.core.preflight import check_cofi_schedule
from prunekit.core.surgery import LayerPlan, PruningPlan, apply_plan, slice_linear
from prunekit.families import ModelAdapter, get_adapter, view_of
from prunekit.methods.cofi_target import project_to_target
from prunekit.methods.l0 import CofiGates, GateValues
from prunekit.tasks.losses import distill_loss, teacher_targets
from prunekit.tasks.task_data import TaskData, TrainingData

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
LABEL_KEYS = ("labels", "start_positions", "end_positions")  # distillation only: the student never sees labels


@dataclass
class CofiConfig:
    """CoFi's hyperparameters; defaults follow the reference recipe for large GLUE tasks (cofi.md §5)
    except where noted."""

    keep_params: float | None = None  # fraction of prunable encoder parameters kept (sparsity = 1 - F)
    keep_flops: float | None = None  # or: fraction of encoder FLOPs kept (expected FLOPs, not in the paper)
    epochs: float = 20.0  # pruning epochs, pre-pruning included
    prepruning_epochs: float = 0.0  # distillation without gates first; 0 as the student starts from the teacher
    warmup_epochs: float = 2.0  # linear warm-up of the target sparsity
    finetune_epochs: float = 20.0  # after surgery
    lr: float = 2e-5  # model weights while pruning, linear decay
    finetune_lr: float = 2e-5  # after surgery, constant
    reg_lr: float = 0.01  # gates (descent) and Lagrange multipliers (ascent)
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    max_length: int | None = None  # tokens; None -> the task's
    doc_stride: int | None = None  # SQuAD; None -> the task's
    max_grad_norm: float = 1.0  # model weights only (not gates or multipliers)
    distill: str = "layer"  # "layer": prediction + layerwise; "pred": prediction layer only
    temperature: float = 2.0
    distill_pred_weight: float = 0.1
    distill_layer_weight: float = 0.9
    layer_mapping: str = "free"  # "free" (argmin per teacher layer, v3) or "ordered" (top-down, v4)
    teacher_layers: tuple[int, ...] | None = None  # 1-based; default the quarter points, e.g. 3,6,9,12
    prune_hidden: bool = True
    prune_layers: bool = True  # gates on whole attention and FFN sublayers
    init_log_alpha: float = 10.0
    neuron_init_log_alpha: float = 0.0  # the reference's droprate_init 0.5 (cofi.md §2)
    freeze_embeddings: bool = True  # embeddings are never trained in the reference
    eval_steps: int = 500  # evaluate (deterministic gates) every N optimiser steps; 0 = only at the end
    sparsity_epsilon: float = 0.01  # best-state selection starts once ŝ >= target - epsilon
    seq_len: float | None = None  # FLOPs length; None -> the task's
    mixed_precision: str = "no"  # "no", "fp16" or "bf16" (GPU)
    save_steps: int = 0  # checkpoint every N optimiser steps (0: never); needs checkpoint_dir
    max_steps: int | None = None  # stop after N optimiser steps in all (for short runs and tests)
    max_train_samples: int | None = None  # first N training examples only
    max_eval_samples: int | None = None  # first N dev examples in the periodic evaluation
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.keep_params is None) == (self.keep_flops is None):
            raise ConfigError("CoFi needs one budget: keep_params (e.g. 0.1 for 90% sparsity) or keep_flops")
        for name in ("keep_params", "keep_flops"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                raise ConfigError(f"{name} must be in (0, 1), the fraction kept; got {value}")
        for name in ("epochs", "finetune_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.epochs <= self.prepruning_epochs:
            raise ConfigError(f"epochs ({self.epochs}) must exceed prepruning_epochs ({self.prepruning_epochs}): "
                              "the pruning epochs include the pre-pruning ones")
        if self.warmup_epochs < 0 or self.prepruning_epochs < 0:
            raise ConfigError("warmup_epochs and prepruning_epochs must be >= 0")
        if self.distill not in ("layer", "pred"):
            raise ConfigError(f"distill must be 'layer' or 'pred', got {self.distill!r}")
        if self.layer_mapping not in ("free", "ordered"):
            raise ConfigError(f"layer_mapping must be 'free' or 'ordered', got {self.layer_mapping!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        for name in ("lr", "finetune_lr", "reg_lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ConfigError("batch_size and gradient_accumulation_steps must be >= 1")
        if isinstance(self.teacher_layers, list):
            self.teacher_layers = tuple(self.teacher_layers)

    @property
    def target_kind(self) -> str:
        return "params" if self.keep_params is not None else "flops"

    @property
    def target_sparsity(self) -> float:
        return 1.0 - (self.keep_params if self.keep_params is not None else self.keep_flops)


# ---- size ---------------------------------------------------------------------------------------
class SizeModel:
    """The size CoFi constrains, as a function of kept units: prunable encoder parameters (cofi.md §2:
    4·d_h per kept (head, hidden dim) pair, 2 per kept (neuron, hidden dim) pair, plus the units'
    biases, against all encoder weights and biases) or encoder FLOPs (the core's accounting, linear
    in the kept hidden size)."""

    def __init__(self, adapter: ModelAdapter, kind: str, seq_len: float) -> None:
        self.kind = kind
        self.hidden = adapter.hidden_size
        if adapter.grouped_kv:
            raise ModelError(f"CoFi gates query heads only; {adapter.family} shares key/value heads between "
                             "query heads, which its size model and gates do not cover yet")
        facts = adapter.facts
        if kind == "params":
            # (fixed, per kept hidden dim): a head owns 4·d_h weights per hidden dim (Q, K, V rows,
            # O columns) and d_h biases for each of Q, K, V that has one; a neuron 2 weights per
            # hidden dim (3 with a gate) and its FFN-in (and gate) bias where there is one. The
            # spec's formula drops the biases; with them a fully open model counts ~0 sparsity.
            head_biases = sum(facts.has_bias(name) for name in ("query", "key", "value"))
            ffn_in = ("up", "gate") if facts.gated_ffn else ("up",)
            neuron_biases = sum(facts.has_bias(name) for name in ffn_in)
            self.full = float(full_prunable_params(adapter))
            self.head = [(float(head_biases * adapter.head_dim), float(4 * adapter.head_dim))] * adapter.num_layers
            self.neuron = [(float(neuron_biases), float(len(ffn_in) + 1))] * adapter.num_layers
        else:
            self.full = full_flops(adapter, seq_len)
            self.head, self.neuron = [], []
            for layer in range(adapter.num_layers):
                at0 = unit_costs(adapter, layer, seq_len, hidden_size=0)
                at1 = unit_costs(adapter, layer, seq_len, hidden_size=1)
                self.head.append((at0.head, at1.head - at0.head))
                self.neuron.append((at0.neuron, at1.neuron - at0.neuron))

    def size(self, heads: Sequence[Any], neurons: Sequence[Any], hidden: Any) -> Any:
        """Size for (expected or actual) kept counts; works on tensors (differentiable) and floats."""
        hidden = self.hidden if hidden is None else hidden
        total = 0.0
        for layer, (h, n) in enumerate(zip(heads, neurons, strict=True)):
            total = total + h * (self.head[layer][0] + self.head[layer][1] * hidden)
            total = total + n * (self.neuron[layer][0] + self.neuron[layer][1] * hidden)
        return total

    def expected_sparsity(self, gates: CofiGates) -> torch.Tensor:
        counts = gates.expected_counts()
        return 1.0 - self.size(counts["heads"], counts["neurons"], counts["hidden"]) / self.full

    def sparsity(self, values: GateValues) -> float:
        """Sparsity of the deterministic structure (closed units and sublayers removed)."""
        kept = _gate_summary(values)
        return 1.0 - float(self.size(kept["heads"], kept["neurons"], kept["hidden"])) / self.full


# ---- the student -----------------------------------------------------------------------------------
class CofiStudent(nn.Module):
    """The student model with its gates and the layer-distillation map W_layer, as one module so
    that data parallelism sees every trained parameter. Gates act through hooks installed by
    :func:`prunekit.core.masks.apply_gates` reading ``holder``."""

    def __init__(self, model: nn.Module, gates: CofiGates | None, transform: nn.Linear | None) -> None:
        super().__init__()
        self.model = model
        self.gates = gates
        self.transform = transform
        self.holder = GateHolder()
        self.gated = False  # False before pruning starts: the model runs ungated

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        if self.gates is not None and self.gated:
            self.holder.values = self.gates.sample() if self.training else self.gates.deterministic()
        else:
            self.holder.values = None
        return self.model(**batch, output_hidden_states=True)


def default_teacher_layers(num_layers: int) -> tuple[int, ...]:
    """The quarter points of the teacher, 1-based: 3, 6, 9, 12 for 12 layers (TinyBERT's choice),
    2, 3, 5, 6 for 6."""
    return tuple(sorted({max(1, int(num_layers * k / 4 + 0.5)) for k in range(1, 5)}))


def match_layers(costs: torch.Tensor, candidates: Sequence[int], ordered: bool) -> list[int | None]:
    """The student layer matched to each teacher layer (cofi.md §4).

    Args:
        costs: (n_teacher, n_student) distances D[i, j].
        candidates: student layers that exist (a sublayer is left); others are never matched.
        ordered: False: argmin over candidates per teacher layer (v3). True: top-down, each teacher
            layer takes the closest candidate strictly below the previous match (v4); when none is
            left it reuses the previous match.
    Returns:
        per teacher layer, a student layer index, or None when there is no candidate at all.
    """
    if not candidates:
        return [None] * costs.shape[0]
    allowed = torch.full((costs.shape[1],), False)
    allowed[list(candidates)] = True
    costs = costs.detach().float().cpu().masked_fill(~allowed, math.inf)  # (n_teacher, n_student)
    if not ordered:
        return [int(row.argmin()) for row in costs]
    matches: list[int | None] = [None] * costs.shape[0]
    last = costs.shape[1]
    for i in reversed(range(costs.shape[0])):
        below = costs[i, :last]
        if below.numel() and torch.isfinite(below).any():
            last = int(below.argmin())
        matches[i] = last if last < costs.shape[1] else None
    return matches


def layer_distill_loss(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                       transform: nn.Linear, teacher_layers: Sequence[int], candidates: Sequence[int],
                       ordered: bool) -> tuple[torch.Tensor, list[int | None]]:
    """Σ over teacher layers i of MSE(W_layer H_S^{m(i)}, H_T^i), with m the dynamic mapping.

    ``student_hidden``/``teacher_hidden`` are the models' hidden-state tuples (embeddings first);
    layer indices are 1-based as in the spec; ``candidates`` are 1-based student layers."""
    student = torch.stack([transform(h.float()) for h in student_hidden[1:]])  # (L_s, B, T, d)
    teacher = torch.stack([teacher_hidden[i].float() for i in teacher_layers])  # (n_t, B, T, d)
    # D[i, j]: mean over batch, positions (padding included, as the reference) and dims.
    costs = ((teacher[:, None] - student[None]) ** 2).mean(dim=(2, 3, 4))  # (n_t, L_s)
    matches = match_layers(costs, [c - 1 for c in candidates], ordered)
    terms = [costs[i, j] for i, j in enumerate(matches) if j is not None]
    loss = torch.stack(terms).sum() if terms else costs.sum() * 0.0
    return loss, [None if j is None else j + 1 for j in matches]


# ---- surgery ----------------------------------------------------------------------------------------
def gate_plan(model: nn.Module | ModelAdapter, values: GateValues) -> PruningPlan:
    """The plan that folds deterministic gate values into ``model``'s weights and removes what they
    close (applied by :func:`prunekit.core.surgery.apply_plan`, the one surgery path).

    Layer gates scale the output projection and its bias (what the gated model computes); head and
    neuron values are folded as unit scales; a sublayer that is off is removed (the identity);
    hidden dims whose gate is 0 are cut everywhere (their kept values are exactly 1).
    """
    adapter = view_of(model)
    plan = PruningPlan(layers=[LayerPlan() for _ in range(adapter.num_layers)])
    for layer in range(adapter.num_layers):
        step = plan.layers[layer]
        for kind, units, gate, on in (("attn", values.head[layer], values.mha[layer], values.attn_on[layer]),
                                      ("ffn", values.neuron[layer], values.ffn[layer], values.ffn_on[layer])):
            if units is None:
                continue  # no gates here (already removed or empty)
            if not on:
                if kind == "attn":
                    step.attention_removed = True
                else:
                    step.ffn_removed = True
                continue
            scales = units.detach()
            keep = torch.nonzero(scales).flatten().tolist()
            gate = gate.detach() if gate is not None else None
            if kind == "attn":
                step.heads, step.head_scales, step.attention_gate = keep, scales, gate
            else:
                step.neurons, step.neuron_scales, step.ffn_gate = keep, scales, gate
    if values.hidden is not None:
        keep = torch.nonzero(values.hidden).flatten().cpu()
        if keep.numel() < values.hidden.numel():
            plan.hidden = keep.tolist()
    return plan


def narrow_transform(transform: nn.Linear | None, plan: PruningPlan) -> nn.Linear | None:
    """W_layer narrowed to the plan's kept hidden dims (its inputs are the student's hidden states)."""
    if transform is None or plan.hidden is None:
        return transform
    return slice_linear(transform, torch.as_tensor(plan.hidden), dim=1)


# ---- training ----------------------------------------------------------------------------------------
class _Run:
    """One CoFi run's mutable state: the stage, step counters, the Lagrange multipliers and the
    best state so far. Saved as JSON (plus tensors) in every checkpoint."""

    def __init__(self) -> None:
        self.stage = "prune"
        self.step = 0  # optimiser steps in the current stage
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.history: list[dict[str, Any]] = []
        self.best_state: dict[str, torch.Tensor] | None = None  # in memory only; on disk as best.pt

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "step": self.step, "best_metric": self.best_metric,
                "best_step": self.best_step, "history": self.history}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> _Run:
        run = cls()
        run.__dict__.update(data)
        return run


def cofi(model: nn.Module | ModelAdapter, data: TaskData, config: CofiConfig) -> tuple[PruningPlan, dict[str, Any]]:
    """CoFi's plan for ``model`` (the teacher, left unchanged) and a log.

    The student, a copy of ``data.student_init`` or of the teacher, is trained with gates, cut by
    the gate plan (:func:`gate_plan`, applied by :func:`prunekit.core.surgery.apply_plan`), then
    fine-tuned. Since every weight is trained, the returned plan carries, besides the kept units,
    removals, hidden dims and gates, the trained weights of the pruned student
    (``plan.weights``): ``apply_plan(teacher, plan)`` rebuilds it.

    ``data`` holds the training features and dev scorer (``data.training``, from
    :func:`prunekit.tasks.build_training_data`), the FLOPs length ``seq_len`` and the device;
    ``data.checkpoint_dir`` receives a checkpoint every ``save_steps`` steps and at the end of each
    stage; with ``data.resume`` the run continues from the checkpoint found there (same config and
    data).
    """
    teacher = view_of(model).model
    student = copy.deepcopy(data.student_init if data.student_init is not None else teacher)
    flags = [p.requires_grad for p in teacher.parameters()]
    try:
        plan, log = _cofi(teacher, student, data.training, config, data.seq_len, data.device, data.checkpoint_dir,
                          data.resume)
    finally:  # the teacher is frozen while it teaches; the caller's flags come back
        for p, flag in zip(teacher.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    return plan, log


def _cofi(teacher: nn.Module, student: nn.Module, data: TrainingData, config: CofiConfig, seq_len: float,
          device: torch.device | str | None, checkpoint_dir: str | Path | None, resume: bool
          ) -> tuple[PruningPlan, dict[str, Any]]:
    from accelerate import Accelerator  # training only; keeps `import prunekit` light

    if config.save_steps and checkpoint_dir is None:
        raise ConfigError("save_steps needs a checkpoint folder (checkpoint_dir / --checkpoint-dir)")
    if resume and (checkpoint_dir is None or not (Path(checkpoint_dir) / STATE_FILE).is_file()):
        raise ConfigError(f"nothing to resume: no {STATE_FILE} in {checkpoint_dir}; run without --resume first")
    if data is None:
        raise ConfigError("CoFi trains: it needs the task's training data (TaskData.training)")
    if seq_len is None:
        raise ConfigError("CoFi needs the FLOPs sequence length (TaskData.seq_len)")
    cpu = device is not None and torch.device(device).type == "cpu"
    accelerator = Accelerator(cpu=cpu, mixed_precision=config.mixed_precision,
                              gradient_accumulation_steps=config.gradient_accumulation_steps)
    torch.manual_seed(config.seed)
    teacher = teacher.to(accelerator.device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    adapter = get_adapter(student)
    sizer = SizeModel(adapter, config.target_kind, seq_len)
    teacher_layers = config.teacher_layers or default_teacher_layers(get_adapter(teacher).num_layers)
    run = _Run()
    if resume:
        run = _Run.from_dict(json.loads((Path(checkpoint_dir) / STATE_FILE).read_text()))
        logger.info("resuming CoFi at stage %s, step %d, from %s", run.stage, run.step, checkpoint_dir)
    log: dict[str, Any] = {"teacher_layers": list(teacher_layers), "target_kind": config.target_kind,
                           "target_sparsity": config.target_sparsity, "seq_len": seq_len}
    started = time.perf_counter()

    if run.stage == "prune":
        check_cofi_schedule(config, len(data.features), accelerator.num_processes)
        shapes = adapter.layer_shapes()
        gates = CofiGates([s.num_heads for s in shapes], [s.intermediate_size for s in shapes], adapter.hidden_size,
                          prune_hidden=config.prune_hidden, prune_layers=config.prune_layers,
                          init=config.init_log_alpha, neuron_init=config.neuron_init_log_alpha)
        transform = _identity(adapter.hidden_size) if config.distill == "layer" else None
        wrapper = CofiStudent(student, gates, transform)
        if resume:
            _load_tensors(wrapper, Path(checkpoint_dir) / "prune")
        with apply_gates(adapter, wrapper.holder):
            _train_stage(accelerator, wrapper, teacher, data, config, run, sizer, teacher_layers, checkpoint_dir,
                         resume)
            log["prune_seconds"] = time.perf_counter() - started
            wrapper.gated = True
            wrapper.eval()
            values = gates.deterministic()
            log["expected_sparsity"] = float(sizer.expected_sparsity(gates))
            log["deterministic_sparsity"] = sizer.sparsity(values)
            # The saved model meets the budget even when training ends off target (cofi.md §8.5).
            values, log["target_projection"] = project_to_target(gates, values, sizer, adapter,
                                                                 config.target_sparsity, config.sparsity_epsilon)
            log["gates"] = _gate_summary(values)
            check = _surgery_check_batch(data, accelerator.device)
            with torch.no_grad():
                wrapper.holder.values = values
                gated_out = _first_output(student(**check))
        wrapper.holder.values = None
        plan = gate_plan(adapter, values)
        apply_plan(adapter, plan)
        transform = narrow_transform(transform, plan)
        with torch.no_grad():
            pruned_out = _first_output(student(**check))
        log["surgery_max_abs_diff"] = float((gated_out - pruned_out).abs().max())
        log["prune_history"] = run.history
        wrapper = CofiStudent(student, None, transform)
        run = _Run()
        run.stage = "finetune"
        accelerator.free_memory()  # forget the pruning stage's objects: checkpoints hold the new stage's only
        if checkpoint_dir is not None:
            _save_checkpoint(accelerator, wrapper, run, checkpoint_dir, plan=plan, new_stage=True)
            if accelerator.is_main_process:
                (Path(checkpoint_dir) / "finetune" / "prune_log.json").write_text(json.dumps(log))
        resume_finetune = False
    else:
        from prunekit.core.io import load_plan, load_pruned

        folder = Path(checkpoint_dir) / "finetune"
        student = load_pruned(folder / "model")
        transform = _identity(get_adapter(student).hidden_size) if config.distill == "layer" else None
        wrapper = CofiStudent(student, None, transform)
        _load_tensors(wrapper, folder)
        plan = load_plan(folder)
        log.update(json.loads((folder / "prune_log.json").read_text()))
        resume_finetune = True

    if config.finetune_epochs > 0:
        finetune_start = time.perf_counter()
        _train_stage(accelerator, wrapper, teacher, data, config, run, None, teacher_layers, checkpoint_dir,
                     resume_finetune)
        log["finetune_seconds"] = time.perf_counter() - finetune_start
    log["finetune_history"] = run.history
    model = accelerator.unwrap_model(wrapper).model.eval()
    log["final_prunable_params"] = count_prunable_params(model)
    log["achieved_param_sparsity"] = 1.0 - count_prunable_params(model) / full_prunable_params(model)
    log["achieved_flops_kept"] = count_flops(model, seq_len) / full_flops(model, seq_len)
    log["train_seconds"] = time.perf_counter() - started
    # Every weight was trained: the plan carries the pruned student's, so it replays on the teacher.
    plan.weights = {key: value.detach().clone() for key, value in model.state_dict().items()}
    return plan, log


def cofi_report_fields(config: CofiConfig, log: dict[str, Any]) -> dict[str, Any]:
    """CoFi's lines of the prune report: its budget and the sparsity it reached."""
    return {
        "keep_params": config.keep_params,
        "prunable_params_kept": 1.0 - log["achieved_param_sparsity"],
        "target_sparsity": config.target_sparsity,
        "achieved_sparsity": (log["achieved_param_sparsity"] if config.target_kind == "params"
                              else 1.0 - log["achieved_flops_kept"]),
        # The budget asked for and what the saved model keeps (projected onto it, cofi_target).
        "target_keep": config.keep_params if config.target_kind == "params" else config.keep_flops,
        "achieved_keep": (1.0 - log["achieved_param_sparsity"] if config.target_kind == "params"
                          else log["achieved_flops_kept"]),
    }


def _identity(width: int) -> nn.Linear:
    transform = nn.Linear(width, width)
    with torch.no_grad():
        transform.weight.copy_(torch.eye(width))
        transform.bias.zero_()
    return transform


def _first_output(outputs: Any) -> torch.Tensor:
    return outputs.logits if hasattr(outputs, "logits") else torch.cat([outputs.start_logits, outputs.end_logits], -1)


def _surgery_check_batch(data: TrainingData, device: torch.device) -> dict[str, torch.Tensor]:
    batch = data.collate(data.features[: min(8, len(data.features))])
    return {k: v.to(device) for k, v in batch.items() if k not in LABEL_KEYS}


def _gate_summary(values: GateValues) -> dict[str, Any]:
    return {
        "heads": [int((u != 0).sum()) if u is not None and on else 0 for u, on in zip(values.head, values.attn_on, strict=True)],
        "neurons": [int((u != 0).sum()) if u is not None and on else 0
                    for u, on in zip(values.neuron, values.ffn_on, strict=True)],
        "attention_removed": [u is not None and not on for u, on in zip(values.head, values.attn_on, strict=True)],
        "ffn_removed": [u is not None and not on for u, on in zip(values.neuron, values.ffn_on, strict=True)],
        "hidden": int((values.hidden != 0).sum()) if values.hidden is not None else None,
    }  # fmt: skip


def _model_parameters(wrapper: CofiStudent, freeze_embeddings: bool) -> list[nn.Parameter]:
    frozen = set()
    if freeze_embeddings:
        frozen = {id(p) for p in get_adapter(wrapper.model).embedding_parameters()}
    params = [p for p in wrapper.model.parameters() if id(p) not in frozen]
    for p in wrapper.model.parameters():
        p.requires_grad_(id(p) not in frozen)
    if wrapper.transform is not None:
        params += list(wrapper.transform.parameters())
    return params


def _train_stage(accelerator, wrapper: CofiStudent, teacher: nn.Module, data: TrainingData, config: CofiConfig,
                 run: _Run, sizer: SizeModel | None, teacher_layers: Sequence[int],
                 checkpoint_dir: str | Path | None, resume: bool) -> None:
    """One training stage: pruning (``sizer`` given: gates + Lagrangian) or fine-tuning."""
    from torch.utils.data import DataLoader

    pruning = sizer is not None
    batches_per_epoch = math.ceil(len(data.features) / (config.batch_size * accelerator.num_processes))
    steps_per_epoch = max(1, batches_per_epoch // config.gradient_accumulation_steps)
    epochs = config.epochs if pruning else config.finetune_epochs
    total = max(1, int(round(epochs * steps_per_epoch)))
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    pre_steps = int(round(config.prepruning_epochs * steps_per_epoch)) if pruning else 0
    warmup = max(1, int(round(config.warmup_epochs * steps_per_epoch)))
    target = config.target_sparsity

    params = _model_parameters(wrapper, config.freeze_embeddings)
    lr = config.lr if pruning else config.finetune_lr
    model_opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # Pruning decays linearly over the steps left once gates are on (the reference re-creates
    # the optimiser then); fine-tuning uses a constant rate (cofi.md §5).
    decay_steps = max(1, total - pre_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        model_opt, (lambda s: max(0.0, 1.0 - max(0, s - pre_steps) / decay_steps)) if pruning else (lambda s: 1.0))
    lambdas = nn.Parameter(torch.zeros(2, device=accelerator.device))
    gate_opt = lambda_opt = None
    if pruning:
        gate_opt = torch.optim.AdamW(wrapper.gates.parameters(), lr=config.reg_lr, weight_decay=0.0)
        # Ascent on λ: maximize=True, never a negative learning rate (cofi.md §8, pitfall 8).
        lambda_opt = torch.optim.AdamW([lambdas], lr=config.reg_lr, weight_decay=0.0, maximize=True)
    prepared = accelerator.prepare(wrapper, model_opt, schedule, *(o for o in (gate_opt, lambda_opt) if o))
    wrapped, model_opt, schedule = prepared[:3]
    if pruning:
        gate_opt, lambda_opt = prepared[3:]
    student = accelerator.unwrap_model(wrapped)
    extra = {"lambdas": lambdas}
    if resume:
        _load_training_state(accelerator, checkpoint_dir, run.stage, extra)
    if pruning:
        student.gated = run.step >= pre_steps

    def evaluate_now() -> dict[str, Any]:
        student.eval()
        student.holder.values = student.gates.deterministic() if pruning and student.gated else None
        metrics = data.evaluate(student.model)
        student.holder.values = None
        student.train()
        return metrics

    bar = tqdm(total=total, initial=run.step, desc=f"cofi {run.stage}", unit="step",
               disable=not accelerator.is_local_main_process)
    epoch, skip = divmod(run.step * config.gradient_accumulation_steps, batches_per_epoch)
    student.train()
    teacher.eval()
    while run.step < total:
        generator = torch.Generator().manual_seed(config.seed + 1000 * epoch + (0 if pruning else 7))
        loader = accelerator.prepare(DataLoader(data.features, batch_size=config.batch_size, shuffle=True,
                                                generator=generator, collate_fn=data.collate))
        if skip:
            loader = accelerator.skip_first_batches(loader, skip)
            skip = 0
        for batch in loader:
            with accelerator.accumulate(wrapped):
                if pruning and not student.gated and run.step >= pre_steps:
                    student.gated = True
                loss, terms = _losses(wrapped, student, teacher, batch, data.kind, config, teacher_layers)
                if pruning and student.gated:
                    t = target * min(1.0, (run.step - pre_steps) / warmup)
                    s_hat = sizer.expected_sparsity(student.gates)
                    gap = s_hat - t
                    loss = loss + lambdas[0] * gap + lambdas[1] * gap * gap
                    terms.update(expected_sparsity=float(s_hat.detach()), target=t, lambda1=float(lambdas[0].detach()),
                                 lambda2=float(lambdas[1].detach()))
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                model_opt.step()
                schedule.step()
                model_opt.zero_grad(set_to_none=True)
                if pruning and student.gated:
                    gate_opt.step()
                    lambda_opt.step()
                    student.gates.clamp_()
                if pruning:
                    gate_opt.zero_grad(set_to_none=True)
                    lambda_opt.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            run.step += 1
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in terms.items() if k != "mapping"})
            last = run.step >= total
            if (config.eval_steps and run.step % config.eval_steps == 0) or last:
                metrics = evaluate_now()
                row = {"step": run.step, **{k: v for k, v in terms.items() if k != "mapping"}, **metrics}
                if pruning and student.gated:
                    row["deterministic_sparsity"] = sizer.sparsity(student.gates.deterministic())
                run.history.append(row)
                logger.info("cofi %s step %d: %s", run.stage, run.step, json.dumps(row))
                eligible = not pruning or (student.gated and row.get("expected_sparsity", 0.0)
                                           >= target - config.sparsity_epsilon)
                score = metrics[data.main_metric]
                if eligible and (run.best_metric is None or score > run.best_metric):
                    run.best_metric, run.best_step = score, run.step
                    _keep_best(student, run, checkpoint_dir)
            if checkpoint_dir is not None and ((config.save_steps and run.step % config.save_steps == 0) or last):
                _save_checkpoint(accelerator, student, run, checkpoint_dir, extra=extra)
            if last:
                break
        epoch += 1
    bar.close()
    if run.best_step is not None:
        _restore_best(student, run, checkpoint_dir)
        logger.info("cofi %s: best %s %.2f at step %d", run.stage, data.main_metric, run.best_metric, run.best_step)
    student.eval()


def _losses(wrapped, student: CofiStudent, teacher: nn.Module, batch: dict[str, torch.Tensor], kind: str,
            config: CofiConfig, teacher_layers: Sequence[int]) -> tuple[torch.Tensor, dict[str, Any]]:
    """The distillation loss of one batch (no hard labels: cofi.md §4) and its terms for the log."""
    inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
    with torch.no_grad():
        teacher_out = teacher(**inputs, output_hidden_states=config.distill == "layer")
    targets = teacher_targets(kind, teacher_out, config.temperature, inputs.get("attention_mask"))
    student_out = wrapped(inputs)
    pred = distill_loss(kind, student_out, targets, config.temperature, inputs.get("attention_mask"))
    terms: dict[str, Any] = {"pred": pred}
    total = pred
    if config.distill == "layer":
        values = student.holder.values
        adapter = get_adapter(student.model)
        candidates = [layer + 1 for layer in range(adapter.num_layers)
                      if _layer_exists(adapter, values, layer)]  # fmt: skip
        layer_loss, mapping = layer_distill_loss(student_out.hidden_states, teacher_out.hidden_states,
                                                 student.transform, teacher_layers, candidates,
                                                 config.layer_mapping == "ordered")
        terms.update(layer=layer_loss, mapping=mapping)
        total = config.distill_pred_weight * pred + config.distill_layer_weight * layer_loss
    return total, {k: (float(v.detach()) if isinstance(v, torch.Tensor) else v) for k, v in terms.items()}


def _layer_exists(adapter: ModelAdapter, values: GateValues | None, layer: int) -> bool:
    """A layer is a candidate for layer distillation while one of its sublayers is left (#53)."""
    if values is not None:
        return values.attn_on[layer] or values.ffn_on[layer] or (
            values.head[layer] is None and not adapter.is_removed(layer, "attn")
        ) or (values.neuron[layer] is None and not adapter.is_removed(layer, "ffn"))
    return not (adapter.is_removed(layer, "attn") and adapter.is_removed(layer, "ffn"))


# ---- checkpoints ---------------------------------------------------------------------------------------
def _tensors(student: CofiStudent) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in student.state_dict().items()}


def _keep_best(student: CofiStudent, run: _Run, checkpoint_dir: str | Path | None) -> None:
    """Keep the best state in memory, and on disk when checkpointing (so a resumed run has it)."""
    run.best_state = _tensors(student)
    if checkpoint_dir is not None:
        folder = Path(checkpoint_dir) / run.stage
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(run.best_state, folder / "best.pt")


def _restore_best(student: CofiStudent, run: _Run, checkpoint_dir: str | Path | None) -> None:
    state = run.best_state
    best_file = Path(checkpoint_dir) / run.stage / "best.pt" if checkpoint_dir is not None else None
    if state is None and best_file is not None and best_file.is_file():
        state = torch.load(best_file, weights_only=True)
    if state is not None:
        student.load_state_dict(state)
    run.best_state = None


def _save_checkpoint(accelerator, student: CofiStudent, run: _Run, checkpoint_dir: str | Path,
                     extra: dict[str, torch.Tensor] | None = None, plan: PruningPlan | None = None,
                     new_stage: bool = False) -> None:
    """Write the checkpoint: weights, gates and W_layer (``<stage>/tensors.pt``), optimiser,
    scheduler and RNG states (Accelerate's ``<stage>/accelerate``) and the run state (JSON).
    The fine-tuning stage also stores the pruned model as a prunekit folder, since its shapes differ
    from the teacher's. The JSON is written last, so a checkpoint is complete when it names it."""
    if not accelerator.is_main_process:
        return
    folder = Path(checkpoint_dir) / run.stage
    folder.mkdir(parents=True, exist_ok=True)
    if run.stage == "finetune" and (new_stage or not (folder / "model").is_dir()):
        from prunekit.core.io import as_pruned_model, save_plan

        model = as_pruned_model(student.model)
        shutil.rmtree(folder / "model", ignore_errors=True)
        model.save_pretrained(folder / "model")
        if plan is not None:
            save_plan(plan, folder)
    torch.save(_tensors(student), folder / "tensors.pt")
    if not new_stage:
        accelerator.save_state(str(folder / "accelerate"))
        torch.save({k: v.detach().cpu() for k, v in (extra or {}).items()}, folder / "extra.pt")
    (Path(checkpoint_dir) / STATE_FILE).write_text(json.dumps(run.to_dict(), indent=1))


def _load_tensors(student: CofiStudent, folder: Path) -> None:
    if (folder / "tensors.pt").is_file():
        student.load_state_dict(torch.load(folder / "tensors.pt", weights_only=True))


def _load_training_state(accelerator, checkpoint_dir: str | Path, stage: str, extra: dict[str, torch.Tensor]) -> None:
    folder = Path(checkpoint_dir) / stage
    if not (folder / "accelerate").is_dir():
        return  # the stage had just begun: nothing trained yet
    accelerator.load_state(str(folder / "accelerate"))
    saved = torch.load(folder / "extra.pt", weights_only=True)
    with torch.no_grad():
        for name, tensor in extra.items():
            tensor.copy_(saved[name].to(tensor.device))
