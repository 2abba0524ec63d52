"""CoFi's distillation objective (cofi.md §4): the prediction-layer KL and the layerwise MSE with its
dynamic teacher-to-student layer mapping. Hard labels are never used."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from prunekit.core.view import ModelAdapter
from prunekit.methods.cofi.config import CofiConfig
from prunekit.methods.cofi.l0 import GateValues
from prunekit.methods.cofi.student import CofiStudent
from prunekit.tasks.losses import distill_loss, teacher_targets

LABEL_KEYS = ("labels", "start_positions", "end_positions")  # distillation only: the student never sees labels


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


def distillation_loss(wrapped: nn.Module, student: CofiStudent, teacher: nn.Module, batch: dict[str, torch.Tensor],
                      kind: str, config: CofiConfig, teacher_layers: Sequence[int]
                      ) -> tuple[torch.Tensor, dict[str, Any]]:
    """L_distil of one batch, α_pred · T²·KL(p_T ‖ p_S) + α_layer · L_layer (or the prediction
    term alone), and its terms for the log. ``wrapped`` is ``student`` as Accelerate prepared it."""
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
        adapter = student.view
        candidates = [layer + 1 for layer in range(adapter.num_layers)
                      if layer_exists(adapter, values, layer)]  # fmt: skip
        layer_loss, mapping = layer_distill_loss(student_out.hidden_states, teacher_out.hidden_states,
                                                 student.transform, teacher_layers, candidates,
                                                 config.layer_mapping == "ordered")
        terms.update(layer=layer_loss, mapping=mapping)
        total = config.distill_pred_weight * pred + config.distill_layer_weight * layer_loss
    return total, {k: (float(v.detach()) if isinstance(v, torch.Tensor) else v) for k, v in terms.items()}


def layer_exists(adapter: ModelAdapter, values: GateValues | None, layer: int) -> bool:
    """A layer is a candidate for layer distillation while one of its sublayers is left (#53)."""
    if values is not None:
        return values.attn_on[layer] or values.ffn_on[layer] or (
            values.head[layer] is None and not adapter.is_removed(layer, "attn")
        ) or (values.neuron[layer] is None and not adapter.is_removed(layer, "ffn"))
    return not (adapter.is_removed(layer, "attn") and adapter.is_removed(layer, "ffn"))


def identity_map(width: int) -> nn.Linear:
    """W_layer at the start: the identity, so the layer loss first compares hidden states as they are."""
    transform = nn.Linear(width, width)
    with torch.no_grad():
        transform.weight.copy_(torch.eye(width))
        transform.bias.zero_()
    return transform
