"""SQuAD answers: from the start/end logits of evaluation features to one answer per question.

`postprocess_predictions` searches the n-best start/end pairs of every feature, keeps the best
span over all features of an example, and applies the v2.0 null-answer threshold. The metric
that scores the answers lives in `prunekit.tasks.qa.metrics`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from prunekit.core.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["postprocess_predictions"]


def postprocess_predictions(
    examples: Sequence[Mapping],
    features: Sequence[Mapping],
    start_logits: Sequence[Any] | np.ndarray | torch.Tensor,
    end_logits: Sequence[Any] | np.ndarray | torch.Tensor,
    n_best: int = 20,
    max_answer_length: int = 30,
    version_2: bool = False,
    null_threshold: float = 0.0,
) -> dict[str, str]:
    """Turn start/end logits of evaluation features into one answer text per question.

    For every feature, the `n_best` highest start and end positions are paired; a pair is a
    candidate when both tokens are context tokens, end >= start and the span has at most
    `max_answer_length` tokens. Its score is start logit + end logit, and its text is the
    context between the first token's start and the last token's end character. The best
    candidate over all features of an example wins, which is how overlapping windows are
    merged. With `version_2`, the null score is the lowest start+end logit at the CLS token over
    the example's features, and the answer is empty when null score - best score >
    `null_threshold`.

    Args:
        examples: dicts from `load_squad` (only "id" and "context" are read).
        features: evaluation features from `prepare_features(..., for_training=False)`, in the
            same order as the logits.
        start_logits, end_logits: per feature, a 1-D array of token logits at least as long as
            the feature (padding positions beyond it are ignored); a list of arrays or tensors,
            or a (N_features, T) array or tensor.
        n_best: start and end positions considered per feature.
        max_answer_length: longest answer, in tokens.
        version_2: allow the empty answer (SQuAD v2.0).
        null_threshold: margin the null score must exceed the best span score by.

    Returns:
        question id -> answer text ("" for no answer), for every example.
    """
    if len(start_logits) != len(features) or len(end_logits) != len(features):
        raise DataError(
            f"Got {len(features)} features but {len(start_logits)} start and {len(end_logits)} end logit rows; "
            "pass one row per feature, in feature order."
        )
    if n_best < 1 or max_answer_length < 1:
        raise DataError(f"n_best ({n_best}) and max_answer_length ({max_answer_length}) must be >= 1.")
    contexts = {ex["id"]: ex["context"] for ex in examples}
    # Per example: best span (score, char start, char end) and the lowest null score.
    best: dict[str, tuple[float, int, int]] = {}
    null_score: dict[str, float] = {}
    for f_idx, feature in enumerate(tqdm(features, desc="SQuAD answers", disable=len(features) < 10_000)):
        if "offset_mapping" not in feature:
            raise DataError(
                f"Feature {f_idx} has no 'offset_mapping'; post-process features made with for_training=False."
            )
        qid = feature["example_id"]
        if qid not in contexts:
            raise DataError(
                f"Feature {f_idx} belongs to question {qid!r}, which is not among the examples passed."
            )
        offsets = feature["offset_mapping"]
        n_tok = len(offsets)
        start = _as_row(start_logits[f_idx], n_tok, f_idx)  # (n_tok,)
        end = _as_row(end_logits[f_idx], n_tok, f_idx)  # (n_tok,)

        cls = feature.get("cls_index", 0)
        null = float(start[cls] + end[cls])
        null_score[qid] = min(null, null_score.get(qid, null))

        span = _best_span(start, end, offsets, n_best, max_answer_length)
        if span is not None and (qid not in best or span[0] > best[qid][0]):
            best[qid] = span

    answers: dict[str, str] = {}
    n_no_span = 0
    for ex in examples:
        qid = ex["id"]
        if qid not in best:
            if qid in null_score:  # had features, but none with a valid span
                n_no_span += 1
            answers[qid] = ""
            continue
        score, char_start, char_end = best[qid]
        if version_2 and null_score[qid] - score > null_threshold:
            answers[qid] = ""
        else:
            answers[qid] = contexts[qid][char_start:char_end]
    missing = sum(1 for ex in examples if ex["id"] not in null_score)
    if missing:
        logger.warning("%d examples have no features and get the empty answer.", missing)
    if n_no_span:
        logger.warning("%d examples have no valid answer span and get the empty answer.", n_no_span)
    return answers


def _as_row(logits: Any, n_tok: int, f_idx: int) -> np.ndarray:
    """One feature's logits as a float64 numpy row cut to the feature's length."""
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().float().cpu().numpy()
    row = np.asarray(logits, dtype=np.float64)
    if row.ndim != 1 or row.shape[0] < n_tok:
        raise DataError(
            f"Logits of feature {f_idx} have shape {row.shape}, expected a 1-D row of at least {n_tok} "
            "values (one per token of the feature)."
        )
    return row[:n_tok]


def _best_span(
    start: np.ndarray,
    end: np.ndarray,
    offsets: Sequence[tuple[int, int] | None],
    n_best: int,
    max_answer_length: int,
) -> tuple[float, int, int] | None:
    """(score, char start, char end) of the best valid span among the n-best starts and ends."""
    is_context = np.array([off is not None for off in offsets])  # (n_tok,)
    # Stable sort on the negated logits: ties resolve to the earlier token, reproducibly.
    top_start = np.argsort(-start, kind="stable")[:n_best]  # (k,)
    top_end = np.argsort(-end, kind="stable")[:n_best]  # (k,)
    s_idx, e_idx = np.meshgrid(top_start, top_end, indexing="ij")  # (k, k) each
    length = e_idx - s_idx + 1
    valid = is_context[s_idx] & is_context[e_idx] & (length >= 1) & (length <= max_answer_length)
    if not valid.any():
        return None
    scores = np.where(valid, start[s_idx] + end[e_idx], -np.inf)  # (k, k)
    flat = int(np.argmax(scores))
    s, e = int(s_idx.flat[flat]), int(e_idx.flat[flat])
    return float(scores.flat[flat]), offsets[s][0], offsets[e][1]
