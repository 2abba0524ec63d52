"""The calibration sample (kprune_kwon.md §1.2): a seeded draw of training sequences (or SQuAD
features), padded once into fixed batches. Shared by every task family; the families only say how
to read, tokenize and collate their data."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from prunekit.core.errors import ConfigError
from prunekit.tasks.spec import TaskSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationSample:
    """A seeded draw of training sequences, padded once into fixed batches.

    Every pass of a pruning method iterates the same batches in the same order with the same
    padding, because cached teacher outputs are aligned to them (kprune_kwon.md §1.2).

    Attributes:
        task: the task name.
        batches: each with input_ids, attention_mask, token_type_ids (if the tokenizer gives
            them), all (B, T_batch) int64, and labels (B,).
        num_sequences: N_seq, the number of drawn sequences (duplicates counted).
        num_tokens: N_tok, the sum of all attention masks (non-padding tokens).
        mean_length: num_tokens / num_sequences.
        seed: the seed of the draw.
        batch_size: sequences per batch (the last batch may be smaller).
        max_length: the truncation length used.
        indices: training-set index of every sequence, in batch order.
        batch_order: "length" (sequences of similar length batched together, batches shuffled)
            or "draw" (batches in draw order, as the Kprune reference code makes them).
    """

    task: str
    batches: list[dict[str, torch.Tensor]]
    num_sequences: int
    num_tokens: int
    mean_length: float
    seed: int
    batch_size: int
    max_length: int
    indices: tuple[int, ...] = field(default=(), repr=False)
    batch_order: str = "length"

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.batches)

    def iter_batches(self, device: torch.device | str | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Yield the batches one at a time, moved to `device` (None: where they are)."""
        for batch in self.batches:
            yield batch if device is None else {k: v.to(device) for k, v in batch.items()}

    def to(self, device: torch.device | str) -> CalibrationSample:
        """A copy whose batches all live on `device`."""
        return dataclasses.replace(self, batches=list(self.iter_batches(device)))

    def summary(self) -> dict[str, Any]:
        """JSON-serializable description for reports (everything but the tensors)."""
        return {
            "task": self.task,
            "num_sequences": self.num_sequences,
            "num_tokens": self.num_tokens,
            "mean_length": self.mean_length,
            "num_batches": len(self.batches),
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            "seed": self.seed,
            "batch_order": self.batch_order,
        }


def check_sample_options(num_tokens: int, num_sequences: int | None, batch_size: int) -> None:
    """Reject sample sizes that cannot make a sample, before any data is read."""
    if num_tokens < 1:
        raise ConfigError(f"num_tokens must be a positive token budget, got {num_tokens}")
    if num_sequences is not None and num_sequences < 1:
        raise ConfigError(f"num_sequences must be >= 1 (or None to derive it from num_tokens), got {num_sequences}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")


def draw_indices(
    spec: TaskSpec, available: int, num_tokens: int, num_sequences: int | None, seed: int, replace: bool, unit: str
) -> tuple[np.random.Generator, np.ndarray]:
    """How many units to draw and which: min(floor(num_tokens / avg_seq_len), available) unless
    ``num_sequences`` is given, drawn with ``default_rng(seed).choice`` (with replacement, as the
    reference, by default). Returns the generator (the batch order draws from it too) and the
    indices (N_seq,)."""
    if num_sequences is None:
        count = min(math.floor(num_tokens / spec.avg_seq_len), available)
        if count < 1:
            raise ConfigError(
                f"num_tokens={num_tokens} is below one average {spec.name} {unit} "
                f"({spec.avg_seq_len} tokens); raise num_tokens or pass num_sequences"
            )
    else:
        count = num_sequences
        if not replace and count > available:
            raise ConfigError(
                f"cannot draw {count} distinct {unit}s from {available} available; "
                "lower num_sequences or pass replace=True"
            )
    if num_sequences is not None and count > available:
        logger.warning("num_sequences %d is more than the %d %ss of %s: each is drawn about %.0f times (with "
                       "replacement); pass at most %d for distinct ones", count, available, unit, spec.name,
                       count / max(available, 1), available)
    rng = np.random.default_rng(seed)
    return rng, rng.choice(available, size=count, replace=replace)


def batch_sample(
    spec: TaskSpec,
    features: Sequence[dict[str, Any]],
    indices: Sequence[int],
    rng: np.random.Generator,
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    batch_size: int,
    max_length: int,
    seed: int,
    sort_by_length: bool,
) -> CalibrationSample:
    """Cut the drawn ``features`` (one per index, in draw order) into fixed batches.

    With ``sort_by_length`` the features are sorted by length (stable) before cutting, so each
    batch holds ``batch_size`` features with far less padding than a random batch, and the batches
    are then put in a seeded random order so no running statistic sees a length trend. Without it,
    batches follow the draw order, as in the reference.
    """
    count = len(features)
    order = list(range(count))
    if sort_by_length:
        order.sort(key=lambda i: len(features[i]["input_ids"]))  # list.sort is stable
    groups = [order[start : start + batch_size] for start in range(0, count, batch_size)]
    if sort_by_length:
        groups = [groups[i] for i in rng.permutation(len(groups))]
    batches = [collate_fn([features[i] for i in group]) for group in groups]
    total = int(sum(int(b["attention_mask"].sum()) for b in batches))
    sample = CalibrationSample(
        task=spec.name,
        batches=batches,
        num_sequences=count,
        num_tokens=total,
        mean_length=total / count,
        seed=seed,
        batch_size=batch_size,
        max_length=max_length,
        indices=tuple(int(indices[i]) for group in groups for i in group),
        batch_order="length" if sort_by_length else "draw",
    )
    logger.info("calibration sample for %s: %d sequences, %d tokens (mean length %.2f), %d batches of %d, %s order",
                spec.name, count, total, sample.mean_length, len(batches), batch_size,
                sample.batch_order)  # fmt: skip
    return sample
