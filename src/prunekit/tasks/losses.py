"""Distillation losses of the retraining-free methods (spec §1.4), one per kind of task head.

- classification: T² · KL(p_T ‖ p_S), batch mean, p = softmax(z / T);
- regression: mean squared error with matching shapes (the reference broadcasts B x 1 against B,
  spec P3; prunekit does not);
- qa: ½ (T² · KL_start + T² · KL_end), softmax over positions; padding positions are masked
  (to -1e9) before the softmax when ``mask_padding`` is set (spec P13), else included as the reference does.
  A ``p_mask`` (B, T) also masks the positions where it is 1: question and special tokens and
  padding, keeping context tokens and [CLS], the no-answer position (P13's "and special tokens").
- lm (causal LM): KL(p_T ‖ p_S) of each non-padding position's next-token distribution, averaged over
  positions. The teacher's side is sparse: its ``top_k`` most probable tokens and the mass of all the
  others as one outcome (the *tail*), so the targets cost O(tokens · k), not O(tokens · vocabulary);
  the KL over these k + 1 outcomes is exact for them and a lower bound of the full KL.

A causal LM's logits are never made whole in the methods: at a vocabulary of 49,152 they are 0.8 GB
per 4,096 tokens in float32, and a softmax and its gradient several times that (issue 21). The
methods pass :class:`LmOutputs` (the final hidden states and the output head) instead of the model's
output, and the targets, the KL and the cross-entropy below make the logits a chunk of positions at
a time; in the backward pass each chunk's logits are made again (``torch.utils.checkpoint``) rather
than kept. Each position's value is the one the whole logits give, up to the rounding of the matmul.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

TASK_KINDS = ("classification", "regression", "qa", "lm")
DEFAULT_LM_TOP_K = 32  # teacher tokens kept per position in the sparse causal-LM targets
_TAIL_FLOOR = 1e-12  # a tail probability below this is treated as this (log of 0 guarded)
# Logits entries made at once from hidden states (64 MB in float32): positions per chunk = this // V,
# 341 at SmolLM2's vocabulary of 49,152, 130 at Llama 3's 128,256. Large enough that the head's
# matmul runs at full speed, small against the model's own activations.
LM_CHUNK_ENTRIES = 2**24


@dataclass
class LmOutputs:
    """A causal LM's output before its logits: the final hidden states ``hidden`` (B, T, d) and the
    output ``head`` that makes logits (..., V) from them (``ModelAdapter.causal_lm_parts``).
    ``chunk_rows``: positions whose logits are made at once (None: ``LM_CHUNK_ENTRIES // V``)."""

    hidden: torch.Tensor
    head: nn.Module
    chunk_rows: int | None = None

    def rows_per_chunk(self) -> int:
        if self.chunk_rows is not None:
            return self.chunk_rows
        return max(1, LM_CHUNK_ENTRIES // self.head.weight.shape[0])  # weight (V, d)


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
        if isinstance(outputs, LmOutputs):
            return _chunked_targets(outputs, attention_mask, temperature, top_k, generator)
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


def _chunked_targets(outputs: LmOutputs, attention_mask: torch.Tensor | None, temperature: float,
                     top_k: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """:func:`sparse_next_token_targets` of the logits of ``outputs``, made a chunk of positions at a
    time (the targets are constants: no graph is kept)."""
    rows = _lm_rows(outputs.hidden, attention_mask)  # (N, d)
    with torch.no_grad():
        chunks = [sparse_next_token_targets(outputs.head(chunk), temperature, top_k, generator)
                  for chunk in rows.split(outputs.rows_per_chunk())]
    return {key: torch.cat([chunk[key] for chunk in chunks]) for key in chunks[0]}


def sparse_target_bytes(targets: Mapping[str, torch.Tensor]) -> int:
    """Bytes held by one batch's sparse causal-LM targets (for the memory-bound checks)."""
    return sum(t.numel() * t.element_size() for t in targets.values())


def _lm_logits(outputs: Any, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Next-token logits (N, V) of the non-padding positions, in batch order."""
    return _lm_rows(outputs.logits, attention_mask)  # (B, T, V) -> (N, V)


def _lm_rows(values: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The non-padding positions' rows (N, ...) of per-position values (B, T, ...), in batch order."""
    if attention_mask is None:
        return values.reshape(-1, *values.shape[2:])
    return values[attention_mask.bool()]


def _sparse_kl(logits: torch.Tensor, targets: Mapping[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """Mean over positions of KL(teacher ‖ student) on the top-k + tail outcomes (module docstring)."""
    return _sparse_kl_terms(logits, targets["probs"], targets["index"], targets["tail"], temperature).mean().float()


def _sparse_kl_terms(logits: torch.Tensor, probs: torch.Tensor, index: torch.Tensor, p_tail: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """Each position's KL(teacher ‖ student) on the top-k + tail outcomes, (N,) float64."""
    scaled = logits.float() / temperature  # (N, V)
    log_q = scaled - torch.logsumexp(scaled, dim=-1, keepdim=True)
    log_q_top = log_q.gather(-1, index.long())  # (N, k)
    # The student's mass outside the teacher's top-k, in float64 so a small tail keeps its digits.
    q_tail = (1.0 - torch.exp(log_q_top.double()).sum(-1)).clamp_min(_TAIL_FLOOR)
    p, p_tail = probs.double(), p_tail.double()
    top = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-300)) - log_q_top.double()), torch.zeros_like(p))
    tail = torch.where(p_tail > 0, p_tail * (torch.log(p_tail.clamp_min(_TAIL_FLOOR)) - torch.log(q_tail)),
                       torch.zeros_like(p_tail))
    return top.sum(-1) + tail  # (N,)


def _chunk_kl_sum(head: nn.Module, rows: torch.Tensor, probs: torch.Tensor, index: torch.Tensor,
                  tail: torch.Tensor, temperature: float) -> torch.Tensor:
    return _sparse_kl_terms(head(rows), probs, index, tail, temperature).sum()


def _chunked_sparse_kl(outputs: LmOutputs, targets: Mapping[str, torch.Tensor], temperature: float,
                       attention_mask: torch.Tensor | None) -> torch.Tensor:
    """:func:`_sparse_kl` of the logits of ``outputs``, made a chunk of positions at a time, in the
    backward pass too (each chunk's logits are made again there, not kept from the forward)."""
    rows = _lm_rows(outputs.hidden, attention_mask)  # (N, d)
    n = outputs.rows_per_chunk()
    total = rows.new_zeros((), dtype=torch.float64)
    for start in range(0, rows.shape[0], n):
        part = slice(start, start + n)
        total = total + _checkpointed(_chunk_kl_sum, outputs.head, rows[part], targets["probs"][part],
                                      targets["index"][part], targets["tail"][part], temperature)
    return (total / rows.shape[0]).float()


def _checkpointed(function, *args):
    """``function(*args)``, its intermediate tensors made again in the backward pass instead of kept
    (nothing random runs in it: no RNG state to save); a plain call when no gradient is recorded."""
    if not torch.is_grad_enabled():
        return function(*args)
    return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=False)


def _chunk_nll(head: nn.Module, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """-log q(token) per position (N,) float32 from the hidden states ``rows`` (N, d)."""
    log_q = torch.log_softmax(head(rows).float(), dim=-1)  # (N, V)
    return -log_q.gather(-1, tokens[:, None]).squeeze(-1)


def _chunk_nll_sum(head: nn.Module, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(rows).float(), tokens, reduction="sum")


def next_token_nll(outputs: LmOutputs, input_ids: torch.Tensor) -> torch.Tensor:
    """-log p(input_ids[:, t + 1] | tokens up to t) of every position but the last, (B, T - 1)
    float32, the logits made a chunk of positions at a time (for evaluation: no gradient)."""
    b, t = input_ids.shape
    rows = outputs.hidden[:, :-1].reshape(b * (t - 1), -1)  # (B·(T-1), d)
    tokens = input_ids[:, 1:].reshape(-1)  # (B·(T-1),)
    n = outputs.rows_per_chunk()
    with torch.no_grad():
        nll = [_chunk_nll(outputs.head, rows[i : i + n], tokens[i : i + n]) for i in range(0, rows.shape[0], n)]
    return torch.cat(nll).view(b, t - 1)


def next_token_loss(outputs: LmOutputs, labels: torch.Tensor) -> torch.Tensor:
    """The causal LM's own training loss, as Hugging Face's ``*ForCausalLM`` computes it from
    ``labels`` (B, T) (the model shifts: position t predicts labels[:, t + 1]; -100 marks no
    target): the mean cross-entropy over the targets, the logits made a chunk of positions at a time,
    in the backward pass too."""
    targets = labels[:, 1:]  # (B, T-1)
    valid = targets != -100
    rows = outputs.hidden[:, :-1][valid]  # (N, d)
    tokens = targets[valid]  # (N,)
    n = outputs.rows_per_chunk()
    total = rows.new_zeros((), dtype=torch.float64)
    for start in range(0, rows.shape[0], n):
        part = slice(start, start + n)
        total = total + _checkpointed(_chunk_nll_sum, outputs.head, rows[part], tokens[part]).double()
    return (total / rows.shape[0]).float()


def sampled_nll(outputs: Any, targets: Mapping[str, torch.Tensor], temperature: float,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """T² times the sum over positions of -log q(y), y the teacher's sampled next tokens.

    Its gradient is the KL's (E_y[-∇ log q(y)] = ∇ KL(p ‖ q)) plus noise whose second moment is
    the Fisher information of the teacher's own distribution: so, unlike the KL's, its squared
    gradient is not zero where the student still equals the teacher, and estimates the curvature
    of the KL there (the first sublayer's blind spot, spec P9). Summed, not averaged: the squared
    gradient of a sum over N positions divided by N estimates the Fisher information per position,
    whatever the batch size."""
    tokens = targets["sampled"].long()  # (N,)
    t2 = temperature * temperature
    if isinstance(outputs, LmOutputs):  # the logits a chunk of positions at a time, in backward too
        rows = _lm_rows(outputs.hidden, attention_mask)  # (N, d)
        n = outputs.rows_per_chunk()
        total = rows.new_zeros((), dtype=torch.float32)
        for start in range(0, rows.shape[0], n):
            part = slice(start, start + n)
            total = total + _checkpointed(_chunk_scaled_nll_sum, outputs.head, rows[part], tokens[part], temperature)
        return t2 * total
    scaled = _lm_logits(outputs, attention_mask).float() / temperature  # (N, V)
    return t2 * F.cross_entropy(scaled, tokens, reduction="sum")


def _chunk_scaled_nll_sum(head: nn.Module, rows: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.cross_entropy(head(rows).float() / temperature, tokens, reduction="sum")


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
        if isinstance(outputs, LmOutputs):
            return t2 * _chunked_sparse_kl(outputs, targets, temperature, attention_mask)
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
