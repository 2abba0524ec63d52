"""Distillation losses of the retraining-free methods (spec §1.4), one per kind of task head.

- classification: T² · KL(p_T ‖ p_S), batch mean, p = softmax(z / T);
- regression: mean squared error with matching shapes (the reference broadcasts B x 1 against B,
  spec P3; prunekit does not);
- qa: ½ (T² · KL_start + T² · KL_end), softmax over positions; padding positions are masked
  (to -1e9) before the softmax when ``mask_padding`` is set (spec P13), else included as the reference does.
  A ``p_mask`` (B, T) also masks the positions where it is 1: question and special tokens and
  padding, keeping context tokens and [CLS], the no-answer position (P13's "and special tokens").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

TASK_KINDS = ("classification", "regression", "qa")


def teacher_targets(kind: str, outputs: Any, temperature: float, attention_mask: torch.Tensor | None = None,
                    mask_padding: bool = False, p_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """What the student is matched against, computed once from the teacher's outputs.

    ``p_mask`` (qa only): (B, T), 1 where no answer can be; those positions leave the softmax."""
    if kind == "classification":
        return {"probs": F.softmax(outputs.logits.float() / temperature, dim=-1)}  # (B, C)
    if kind == "regression":
        return {"values": outputs.logits.float().reshape(-1)}  # (B,)
    if kind == "qa":
        start, end = _qa_logits(outputs, attention_mask, mask_padding, p_mask)
        return {"start": F.softmax(start / temperature, dim=-1), "end": F.softmax(end / temperature, dim=-1)}
    raise ValueError(f"unknown task kind {kind!r}; expected one of {TASK_KINDS}")


def distill_loss(kind: str, outputs: Any, targets: Mapping[str, torch.Tensor], temperature: float,
                 attention_mask: torch.Tensor | None = None, mask_padding: bool = False,
                 p_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The predictive loss of the student's outputs against the teacher's targets (a scalar)."""
    t2 = temperature * temperature
    if kind == "classification":
        log_p = F.log_softmax(outputs.logits.float() / temperature, dim=-1)
        return t2 * F.kl_div(log_p, targets["probs"], reduction="batchmean")
    if kind == "regression":
        return F.mse_loss(outputs.logits.float().reshape(-1), targets["values"])
    if kind == "qa":
        start, end = _qa_logits(outputs, attention_mask, mask_padding, p_mask)
        kl_start = F.kl_div(F.log_softmax(start / temperature, dim=-1), targets["start"], reduction="batchmean")
        kl_end = F.kl_div(F.log_softmax(end / temperature, dim=-1), targets["end"], reduction="batchmean")
        return 0.5 * t2 * (kl_start + kl_end)
    raise ValueError(f"unknown task kind {kind!r}; expected one of {TASK_KINDS}")


def _qa_logits(outputs: Any, attention_mask: torch.Tensor | None, mask_padding: bool,
               p_mask: torch.Tensor | None = None):
    start, end = outputs.start_logits.float(), outputs.end_logits.float()  # (B, T) each
    masked = None
    if mask_padding and attention_mask is not None:
        masked = attention_mask == 0  # (B, T)
    if p_mask is not None:
        masked = p_mask.bool() if masked is None else masked | p_mask.bool()  # (B, T)
    if masked is not None:
        # A large finite value rather than -inf: 0 · log(0) terms of the KL must stay 0, not NaN.
        start = start.masked_fill(masked, -1e9)
        end = end.masked_fill(masked, -1e9)
    return start, end
