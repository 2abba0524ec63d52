"""CoFi's entry point, stage by stage as in the paper: set up the student and its gates, prune
(train the gates under the Lagrangian with distillation), cut the student by its deterministic
gates, fine-tune the small model. The stages' parts live in the package's other modules."""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.core.accounting import count_flops, count_prunable_params, full_flops, full_prunable_params
from prunekit.core.errors import ConfigError
from prunekit.core.masks import apply_gates
from prunekit.core.surgery import PruningPlan, apply_plan
from prunekit.core.view import ModelAdapter
from prunekit.methods.cofi.checkpoint import STATE_FILE, RunState, has_state, load_tensors, save_checkpoint
from prunekit.methods.cofi.config import CofiConfig, check_cofi_schedule
from prunekit.methods.cofi.distill import LABEL_KEYS, default_teacher_layers, identity_map
from prunekit.methods.cofi.l0 import CofiGates, GateValues
from prunekit.methods.cofi.plan import gate_plan, narrow_transform
from prunekit.methods.cofi.size import SizeModel, gate_summary
from prunekit.methods.cofi.student import CofiStudent
from prunekit.methods.cofi.target import project_to_target
from prunekit.methods.cofi.train import train_stage
from prunekit.tasks.task_data import TaskData, TrainingData

logger = logging.getLogger(__name__)


def cofi(adapter: ModelAdapter, data: TaskData, config: CofiConfig) -> tuple[PruningPlan, dict[str, Any]]:
    """CoFi's plan for the teacher of ``adapter`` (left unchanged) and a log.

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
    teacher = adapter.model
    student = adapter.of(copy.deepcopy(data.student_init if data.student_init is not None else teacher))
    with _requires_grad_kept(teacher):
        return _cofi(adapter, student, data, config)


@dataclass
class _Setting:
    """What every stage of one run reads: the trainer, the frozen teacher, the data and the sizes."""

    accelerator: Any
    teacher: nn.Module
    teacher_view: ModelAdapter
    data: TrainingData
    config: CofiConfig
    sizer: SizeModel
    teacher_layers: tuple[int, ...]
    checkpoint_dir: str | Path | None


def _cofi(teacher: ModelAdapter, student: ModelAdapter, task: TaskData, config: CofiConfig
          ) -> tuple[PruningPlan, dict[str, Any]]:
    _check_inputs(task, config)
    setting = _set_up(teacher, student, task, config)
    run = RunState.load(task.checkpoint_dir) if task.resume else RunState()
    if task.resume:
        logger.info("resuming CoFi at stage %s, step %d, from %s", run.stage, run.step, task.checkpoint_dir)
    log: dict[str, Any] = {"teacher_layers": list(setting.teacher_layers), "target_kind": config.target_kind,
                           "target_sparsity": config.target_sparsity, "seq_len": task.seq_len}
    started = time.perf_counter()
    if run.stage == "prune":
        wrapper, plan = _prune(setting, student, run, task.resume, log)
        run = _begin_finetune(setting, wrapper, plan, log)
        resume_finetune = False
    else:
        wrapper, plan = _resumed_finetune(setting, log)
        resume_finetune = True
    _finetune(setting, wrapper, run, resume_finetune, log)
    view = setting.accelerator.unwrap_model(wrapper).view
    model = view.model.eval()
    _log_outcome(view, task.seq_len, log)
    log["train_seconds"] = time.perf_counter() - started
    # Every weight was trained: the plan carries the pruned student's, so it replays on the teacher.
    plan.weights = {key: value.detach().clone() for key, value in model.state_dict().items()}
    return plan, log


# ---- set-up ----------------------------------------------------------------------------------------------
def _check_inputs(task: TaskData, config: CofiConfig) -> None:
    if config.save_steps and task.checkpoint_dir is None:
        raise ConfigError("save_steps needs a checkpoint folder (checkpoint_dir / --checkpoint-dir)")
    if task.resume and not has_state(task.checkpoint_dir):
        raise ConfigError(f"nothing to resume: no {STATE_FILE} in {task.checkpoint_dir}; run without --resume first")
    if task.training is None:
        raise ConfigError("CoFi trains: it needs the task's training data (TaskData.training)")
    if task.seq_len is None:
        raise ConfigError("CoFi needs the FLOPs sequence length (TaskData.seq_len)")


def _set_up(teacher_view: ModelAdapter, student: ModelAdapter, task: TaskData, config: CofiConfig) -> _Setting:
    """The trainer (Accelerate: CPU, one GPU or several), the seed, the teacher frozen on the
    trainer's device and the size model the budget is measured with."""
    from accelerate import Accelerator  # training only; keeps `import prunekit` light

    cpu = task.device is not None and torch.device(task.device).type == "cpu"
    accelerator = Accelerator(cpu=cpu, mixed_precision=config.mixed_precision,
                              gradient_accumulation_steps=config.gradient_accumulation_steps)
    torch.manual_seed(config.seed)
    teacher = teacher_view.model.to(accelerator.device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    sizer = SizeModel(student, config.target_kind, task.seq_len)
    teacher_layers = config.teacher_layers or default_teacher_layers(teacher_view.num_layers)
    return _Setting(accelerator, teacher, teacher_view, task.training, config, sizer, tuple(teacher_layers), task.checkpoint_dir)


@contextmanager
def _requires_grad_kept(teacher: nn.Module) -> Iterator[None]:
    """The teacher is frozen while it teaches; the caller's flags come back."""
    flags = [p.requires_grad for p in teacher.parameters()]
    try:
        yield
    finally:
        for p, flag in zip(teacher.parameters(), flags, strict=True):
            p.requires_grad_(flag)


# ---- pruning -----------------------------------------------------------------------------------------------
def _prune(s: _Setting, student: ModelAdapter, run: RunState, resume: bool, log: dict[str, Any]
           ) -> tuple[CofiStudent, PruningPlan]:
    """Gates on every structure, trained with distillation under the Lagrangian; then the student
    cut by its deterministic gates (met onto the budget). Returns the cut student and the plan."""
    started = time.perf_counter()
    check_cofi_schedule(s.config, len(s.data.features), s.accelerator.num_processes)
    adapter = student
    wrapper = _gated_student(student, s.config)
    if resume:
        load_tensors(wrapper, Path(s.checkpoint_dir) / "prune")
    with apply_gates(adapter, wrapper.holder):
        train_stage(s.accelerator, wrapper, s.teacher, s.data, s.config, run, s.sizer, s.teacher_layers,
                    s.checkpoint_dir, resume)
        log["prune_seconds"] = time.perf_counter() - started
        values = _final_gates(wrapper, s.sizer, s.config, log)
        check = _surgery_check_batch(s.data, s.accelerator.device)
        gated_out = _outputs(wrapper, check, values)
    plan = gate_plan(adapter, values)
    apply_plan(adapter, plan)
    transform = narrow_transform(wrapper.transform, plan)
    # Surgery is exact: the cut model computes what the gated one did.
    log["surgery_max_abs_diff"] = float((gated_out - _outputs(wrapper, check, None)).abs().max())
    log["prune_history"] = run.history
    return CofiStudent(adapter, None, transform), plan


def _gated_student(adapter: ModelAdapter, config: CofiConfig) -> CofiStudent:
    """The student with L0 gates on its heads, neurons, sublayers and hidden dims, and W_layer
    (the identity) when distilling layerwise."""
    shapes = adapter.layer_shapes()
    gates = CofiGates([s.num_heads for s in shapes], [s.intermediate_size for s in shapes], adapter.hidden_size,
                      prune_hidden=config.prune_hidden, prune_layers=config.prune_layers,
                      init=config.init_log_alpha, neuron_init=config.neuron_init_log_alpha)
    transform = identity_map(adapter.hidden_size) if config.distill == "layer" else None
    return CofiStudent(adapter, gates, transform)


def _final_gates(wrapper: CofiStudent, sizer: SizeModel, config: CofiConfig, log: dict[str, Any]) -> GateValues:
    """The deterministic gate values, projected onto the budget: the saved model meets it even when
    training ends off target (cofi.md §8.5)."""
    wrapper.gated = True
    wrapper.eval()
    gates = wrapper.gates
    values = gates.deterministic()
    log["expected_sparsity"] = float(sizer.expected_sparsity(gates).detach())  # a log value, not a loss term
    log["deterministic_sparsity"] = sizer.sparsity(values)
    values, log["target_projection"] = project_to_target(gates, values, sizer, wrapper.view,
                                                         config.target_sparsity, config.sparsity_epsilon)
    log["gates"] = gate_summary(values)
    return values


def _surgery_check_batch(data: TrainingData, device: torch.device) -> dict[str, torch.Tensor]:
    batch = data.collate(data.features[: min(8, len(data.features))])
    return {k: v.to(device) for k, v in batch.items() if k not in LABEL_KEYS}


def _outputs(wrapper: CofiStudent, batch: dict[str, torch.Tensor], values: GateValues | None) -> torch.Tensor:
    """The student's task outputs on ``batch`` under gate ``values`` (None: ungated)."""
    with torch.no_grad():
        wrapper.holder.values = values
        outputs = wrapper.model(**batch)
    wrapper.holder.values = None
    return outputs.logits if hasattr(outputs, "logits") else torch.cat([outputs.start_logits, outputs.end_logits], -1)


# ---- fine-tuning -------------------------------------------------------------------------------------------
def _begin_finetune(s: _Setting, wrapper: CofiStudent, plan: PruningPlan, log: dict[str, Any]) -> RunState:
    """The fine-tuning stage's fresh state; checkpointed at once, since the pruned model's shapes
    (and the pruning log) are what a resumed run starts from."""
    run = RunState("finetune")
    s.accelerator.free_memory()  # forget the pruning stage's objects: checkpoints hold the new stage's only
    if s.checkpoint_dir is not None:
        save_checkpoint(s.accelerator, wrapper, run, s.checkpoint_dir, plan=plan, new_stage=True)
        if s.accelerator.is_main_process:
            (Path(s.checkpoint_dir) / "finetune" / "prune_log.json").write_text(json.dumps(log))
    return run


def _resumed_finetune(s: _Setting, log: dict[str, Any]) -> tuple[CofiStudent, PruningPlan]:
    """The pruned student, its plan and the pruning log, as the fine-tuning checkpoint holds them."""
    from prunekit.io.folders import load_plan, load_pruned

    folder = Path(s.checkpoint_dir) / "finetune"
    student = s.teacher_view.of(load_pruned(folder / "model"))
    transform = identity_map(student.hidden_size) if s.config.distill == "layer" else None
    wrapper = CofiStudent(student, None, transform)
    load_tensors(wrapper, folder)
    plan = load_plan(folder)
    log.update(json.loads((folder / "prune_log.json").read_text()))
    return wrapper, plan


def _finetune(s: _Setting, wrapper: CofiStudent, run: RunState, resume: bool, log: dict[str, Any]) -> None:
    """The pruned student trained with the same distillation loss, no gates (cofi.md §5)."""
    if s.config.finetune_epochs > 0:
        started = time.perf_counter()
        train_stage(s.accelerator, wrapper, s.teacher, s.data, s.config, run, None, s.teacher_layers,
                    s.checkpoint_dir, resume)
        log["finetune_seconds"] = time.perf_counter() - started
    log["finetune_history"] = run.history


def _log_outcome(model: ModelAdapter, seq_len: float, log: dict[str, Any]) -> None:
    log["final_prunable_params"] = count_prunable_params(model)
    log["achieved_param_sparsity"] = 1.0 - count_prunable_params(model) / full_prunable_params(model)
    log["achieved_flops_kept"] = count_flops(model, seq_len) / full_flops(model, seq_len)


def cofi_report_fields(config: CofiConfig, log: dict[str, Any]) -> dict[str, Any]:
    """CoFi's lines of the prune report: its budget and the sparsity it reached."""
    return {
        "keep_params": config.keep_params,
        "prunable_params_kept": 1.0 - log["achieved_param_sparsity"],
        "target_sparsity": config.target_sparsity,
        "achieved_sparsity": (log["achieved_param_sparsity"] if config.target_kind == "params"
                              else 1.0 - log["achieved_flops_kept"]),
        # The budget asked for and what the saved model keeps (projected onto it, methods.cofi.target).
        "target_keep": config.keep_params if config.target_kind == "params" else config.keep_flops,
        "achieved_keep": (1.0 - log["achieved_param_sparsity"] if config.target_kind == "params"
                          else log["achieved_flops_kept"]),
    }
