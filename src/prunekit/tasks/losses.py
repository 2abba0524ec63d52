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

TASK_KINDS = ("classification", "regression", "qa", "lm")
DEFAULT_LM_TOP_K = 32  # teacher tokens kept per position in the sparse causal-LM targets
_TAIL_FLOOR = 1e-12  # a tail probability below this is treated as this (log of 0 guarded)


def teacher_targets(kind: str, outputs: Any, temperature: float, attention_mask: torch.Tensor | None = None,
                    mask_padding: bool = False, p_mask: torch.Tensor | None = None,
                    top_k: int = DEFAULT_LM_TOP_K, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """What the student is matched against, computed once from the teacher's outputs.

    ``p_mask`` (qa only): (B, T), 1 where no answer can be; those positions leave the softmax.
    ``top_k`` (lm only): teacher tokens kept per position (see the module docstring).
    ``generator`` (lm only): also draw one next token per position from the teacher's
    distribution (``sampled``, for :func:`sampled_nll`)."""
    if kind == "classification":
        return {"probs": F.softmax(outputs.logits.float() / temperature, dim=-1)}  # (B, C)
    if kind == "regression":
        return {"values": outputs.logits.float().reshape(-1)}  # (B,)
    if kind == "qa":
        start, end = _qa_logits(outputs, attention_mask, mask_padding, p_mask)
        return {"start": F.softmax(start / temperature, dim=-1), "end": F.softmax(end / temperature, dim=-1)}
    if kind == "lm":
        return sparse_next_token_targets(_lm_logits(outputs, attention_mask), temperature, top_k, generator)
    raise ValueError(f"unknown task kind {kind!r}; expected one of {TASK_KINDS}")


def sparse_next_token_targets(logits: torch.Tensor, temperature: float, top_k: int,
                              generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Sparse teacher targets from next-token logits (N, V) of N positions: ``probs`` (N, k) float32
    and ``index`` (N, k) int32 of the k most probable tokens, and ``tail`` (N,) float32, the mass of
    every other token (computed from the other tokens' own logits, not as 1 - top mass). With a
    ``generator``, also ``sampled`` (N,) int32: one token per position drawn from the whole
    (tempered) distribution, the tail included."""
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    scaled = logits.float() / temperature  # (N, V)
    k = min(top_k, scaled.shape[-1])
    log_z = torch.logsumexp(scaled, dim=-1)  # (N,)
    top, index = scaled.topk(k, dim=-1)  # (N, k)
    probs = torch.exp(top - log_z[:, None])
    if k < scaled.shape[-1]:
        rest = scaled.scatter(-1, index, float("-inf"))  # the other tokens' logits
        tail = torch.exp(torch.logsumexp(rest, dim=-1) - log_z)
    else:
        tail = torch.zeros_like(log_z)
    targets = {"probs": probs, "index": index.to(torch.int32), "tail": tail}
    if generator is not None:
        # Gumbel-max: argmax(z + g), g ~ Gumbel(0, 1), is a draw from softmax(z), one per position.
        uniform = torch.rand(scaled.shape, generator=generator, device=scaled.device).clamp_(1e-20, 1.0)
        targets["sampled"] = (scaled - torch.log(-torch.log(uniform))).argmax(-1).to(torch.int32)
    return targets


def sparse_target_bytes(targets: Mapping[str, torch.Tensor]) -> int:
    """Bytes held by one batch's sparse causal-LM targets (for the memory-bound checks)."""
    return sum(t.numel() * t.element_size() for t in targets.values())


def _lm_logits(outputs: Any, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Next-token logits (N, V) of the non-padding positions, in batch order."""
    logits = outputs.logits  # (B, T, V)
    if attention_mask is None:
        return logits.reshape(-1, logits.shape[-1])
    return logits[attention_mask.bool()]


def _sparse_kl(logits: torch.Tensor, targets: Mapping[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """Mean over positions of KL(teacher ‖ student) on the top-k + tail outcomes (module docstring)."""
    scaled = logits.float() / temperature  # (N, V)
    log_q = scaled - torch.logsumexp(scaled, dim=-1, keepdim=True)
    log_q_top = log_q.gather(-1, targets["index"].long())  # (N, k)
    # The student's mass outside the teacher's top-k, in float64 so a small tail keeps its digits.
    q_tail = (1.0 - torch.exp(log_q_top.double()).sum(-1)).clamp_min(_TAIL_FLOOR)
    p, p_tail = targets["probs"].double(), targets["tail"].double()
    top = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-300)) - log_q_top.double()), torch.zeros_like(p))
    tail = torch.where(p_tail > 0, p_tail * (torch.log(p_tail.clamp_min(_TAIL_FLOOR)) - torch.log(q_tail)),
                       torch.zeros_like(p_tail))
    return (top.sum(-1) + tail).mean().float()


def sampled_nll(outputs: Any, targets: Mapping[str, torch.Tensor], temperature: float,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """T² times the sum over positions of -log q(y), y the teacher's sampled next tokens.

    Its gradient is the KL's (E_y[-∇ log q(y)] = ∇ KL(p ‖ q)) plus noise whose second moment is
    the Fisher information of the teacher's own distribution: so, unlike the KL's, its squared
    gradient is not zero where the student still equals the teacher, and estimates the curvature
    of the KL there (the first sublayer's blind spot, spec P9). Summed, not averaged: the squared
    gradient of a sum over N positions divided by N estimates the Fisher information per position,
    whatever the batch size."""
    scaled = _lm_logits(outputs, attention_mask).float() / temperature  # (N, V)
    log_q = scaled.gather(-1, targets["sampled"].long()[:, None]).squeeze(-1) - torch.logsumexp(scaled, dim=-1)
    return -temperature * temperature * log_q.sum()


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
    if kind == "lm":
        return t2 * _sparse_kl(_lm_logits(outputs, attention_mask), targets, temperature)
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
