"""CoFi (Xia, Zhong and Chen, ACL 2022): training-based structured pruning with L0 gates at every
granularity, a Lagrangian sparsity controller and layerwise distillation (spec cofi.md).

Algorithm (cofi.md §0-§5), as run by :func:`cofi` (``algorithm``):

    student ← copy of the teacher (or --student-init); gates g (heads, attention sublayers,
        FFN neurons, FFN sublayers, hidden dims), log α ~ N(10, 0.01²) (neurons N(0, 0.01²));
        W_layer ← identity; λ₁ = λ₂ = 0                                           (l0, distill)
    for step s = 1 .. S_prune:                                                    (train)
        z ~ HardConcrete(log α)                   (one sample per micro-batch, shared by the batch)
        L = α_pred · T²·KL(p_T ‖ p_S) + α_layer · Σ_{i∈T} min_j MSE(W_layer H_S^j, H_T^i)   (distill)
        if s > S_pre:                             (pre-pruning distillation first, if any)
            t = t_final · min(1, (s − S_pre) / W)      ŝ = 1 − E[size | log α] / M       (size)
            L += λ₁ (ŝ − t) + λ₂ (ŝ − t)²
        θ, log α ← AdamW descent on L;  λ ← AdamW ascent on L;  clamp log α to [log 0.01, log 100]
        every k steps: evaluate with deterministic gates; keep the best state once ŝ ≥ t_final − ε
    project the deterministic gates onto the budget when they miss it            (target)
    fold the deterministic gate values into the weights; remove closed heads, neurons, whole
        sublayers and hidden dims (prunekit.core.surgery)                         (plan)
    fine-tune the small model with the same distillation loss, keeping the best dev state

Size is the expected number of prunable encoder parameters (``keep_params``, CoFi's sparsity is
1 − keep_params) or, beyond the paper, the expected encoder FLOPs from ``prunekit.core.accounting``
(``keep_flops``). Training runs on Hugging Face Accelerate, so the same code runs on CPU, a GPU or
(with ``accelerate launch``) several, with mixed precision, gradient accumulation, checkpoints
and resume (``checkpoint``). The model is reached only through the adapter, the gates only through
``prunekit.core.masks.apply_gates``.

Modules: ``config`` (CofiConfig, the schedule and its check), ``l0`` (hard-concrete gates),
``size`` (the size model), ``distill`` (the distillation loss and layer mapping), ``train`` (the
training loop and the Lagrangian), ``checkpoint`` (run state, save and resume), ``target`` (the
projection onto the budget), ``plan`` (deterministic gates -> PruningPlan), ``algorithm`` (the
entry point, stage by stage).
"""

from __future__ import annotations

from prunekit.methods.cofi.algorithm import cofi, cofi_report_fields
from prunekit.methods.cofi.config import CofiConfig, CofiSchedule, check_cofi_schedule, cofi_schedule
from prunekit.methods.cofi.distill import default_teacher_layers, layer_distill_loss, match_layers
from prunekit.methods.cofi.plan import gate_plan, narrow_transform
from prunekit.methods.cofi.size import SizeModel
from prunekit.methods.cofi.student import CofiStudent

__all__ = [
    "CofiConfig",
    "CofiSchedule",
    "CofiStudent",
    "SizeModel",
    "check_cofi_schedule",
    "cofi",
    "cofi_report_fields",
    "cofi_schedule",
    "default_teacher_layers",
    "gate_plan",
    "layer_distill_loss",
    "match_layers",
    "narrow_transform",
]
