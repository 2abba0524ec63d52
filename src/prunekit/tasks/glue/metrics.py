"""GLUE metrics in NumPy: accuracy, binary F1, Matthews correlation, Pearson and Spearman.

This module owns the metric functions of the GLUE tasks, the `METRICS` registry (each metric
with `higher_is_better`, style.md §3 and §5) and `compute_metrics`, which scores one task's
predictions on the 0-100 scale that prunekit reports. The metric functions themselves return
the natural scale (accuracy and F1 in [0, 1], correlations in [-1, 1]).

Conventions, chosen to match the usual scikit-learn / SciPy results without depending on them:
- F1 is binary with class 1 positive (MRPC, QQP); with no true and no predicted positives it is 0.
- Matthews correlation uses the multiclass (Gorodkin) formula, which equals the binary one for
  two classes; an undefined value (a constant prediction or label vector) is 0.
- Spearman is Pearson on ranks, with tied values given their average rank.
- A correlation of a constant vector is undefined; it is reported as 0 with a warning, so a
  collapsed pruned model scores worst instead of producing NaN in a report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from prunekit.core.errors import ConfigError, DataError
from prunekit.tasks.spec import TaskSpec, get_task

logger = logging.getLogger(__name__)

__all__ = [
    "METRICS",
    "MetricSpec",
    "accuracy",
    "binary_f1",
    "compute_metrics",
    "matthews_corrcoef",
    "pearson",
    "spearman",
    "average_ranks",
]

ArrayLike = Sequence[float] | np.ndarray


def _pair(predictions: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as 1-D arrays of equal, non-zero length."""
    pred = np.asarray(predictions)
    gold = np.asarray(labels)
    if pred.ndim > 1 and pred.shape[-1] == 1:
        pred = pred.reshape(pred.shape[:-1])  # (N, 1) regression output -> (N,)
    pred, gold = pred.ravel(), gold.ravel()
    if pred.shape != gold.shape:
        raise DataError(f"{pred.size} predictions but {gold.size} labels; they must pair one to one")
    if pred.size == 0:
        raise DataError("cannot compute a metric on zero examples")
    return pred, gold


def accuracy(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of predictions equal to the label, in [0, 1]."""
    pred, gold = _pair(predictions, labels)
    return float(np.mean(pred == gold))


def binary_f1(predictions: ArrayLike, labels: ArrayLike, positive: int = 1) -> float:
    """F1 of the positive class, 2·TP / (2·TP + FP + FN), in [0, 1]; 0 when undefined."""
    pred, gold = _pair(predictions, labels)
    pred_pos, gold_pos = pred == positive, gold == positive
    tp = int(np.sum(pred_pos & gold_pos))
    fp = int(np.sum(pred_pos & ~gold_pos))
    fn = int(np.sum(~pred_pos & gold_pos))
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


def matthews_corrcoef(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Matthews correlation coefficient in [-1, 1] (multiclass form); 0 when undefined.

    With the confusion matrix C (rows true, columns predicted), t = row sums, p = column sums,
    c = trace and s = total: MCC = (c·s − t·p) / sqrt((s² − p·p)(s² − t·t)).
    """
    pred, gold = _pair(predictions, labels)
    classes, encoded = np.unique(np.concatenate([gold, pred]), return_inverse=True)
    k = len(classes)
    gold_ids, pred_ids = encoded[: gold.size], encoded[gold.size :]
    confusion = np.zeros((k, k), dtype=np.float64)  # (classes, classes)
    np.add.at(confusion, (gold_ids, pred_ids), 1.0)
    t, p = confusion.sum(axis=1), confusion.sum(axis=0)
    c, s = np.trace(confusion), confusion.sum()
    denominator = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - t @ p) / denominator) if denominator > 0 else 0.0


def _finite_floats(values: np.ndarray, what: str) -> np.ndarray:
    out = values.astype(np.float64)
    if not np.all(np.isfinite(out)):
        raise DataError(f"{what} contain NaN or infinite values; a correlation needs finite numbers")
    return out


def pearson(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Pearson correlation in [-1, 1]; 0 (with a warning) when either side is constant."""
    pred, gold = _pair(predictions, labels)
    x = _finite_floats(pred, "predictions")
    y = _finite_floats(gold, "labels")
    x = x - x.mean()
    y = y - y.mean()
    denominator = np.sqrt((x @ x) * (y @ y))
    if denominator == 0:
        logger.warning("correlation of a constant vector is undefined; reporting 0")
        return 0.0
    return float(np.clip((x @ y) / denominator, -1.0, 1.0))


def average_ranks(values: ArrayLike) -> np.ndarray:
    """1-based ranks of `values`, tied values sharing the mean of their ranks (float64, (N,))."""
    x = np.asarray(values).ravel()
    order = np.argsort(x, kind="stable")
    ordered = x[order]
    starts_group = np.empty(x.size, dtype=bool)
    starts_group[:1] = True
    starts_group[1:] = ordered[1:] != ordered[:-1]
    group = np.cumsum(starts_group) - 1  # group id of each sorted position
    starts = np.flatnonzero(starts_group)
    ends = np.append(starts[1:], x.size)  # exclusive
    mean_rank = (starts + ends + 1) / 2.0  # mean of the 1-based positions starts+1 .. ends
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = mean_rank[group]
    return ranks


def spearman(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Spearman rank correlation in [-1, 1]: Pearson of the average ranks."""
    pred, gold = _pair(predictions, labels)
    x = _finite_floats(pred, "predictions")
    y = _finite_floats(gold, "labels")
    return pearson(average_ranks(x), average_ranks(y))


@dataclass(frozen=True)
class MetricSpec:
    """A registered metric: how to compute it and which way is better."""

    name: str
    compute: Callable[[Any, Any], float]  # (predictions, labels) -> natural-scale value
    higher_is_better: bool
    description: str


# The registry, filled here only (style.md §3). Every GLUE task's `metrics` names entries of it.
# SQuAD's exact match and token F1 are computed per prediction set by `squad_scores`
# (metrics/squad.py), not through this table.
METRICS: dict[str, MetricSpec] = {
    "accuracy": MetricSpec("accuracy", accuracy, True, "fraction of exact class matches"),
    "f1": MetricSpec("f1", binary_f1, True, "binary F1 of class 1 (MRPC, QQP)"),
    "matthews_correlation": MetricSpec(
        "matthews_correlation", matthews_corrcoef, True, "Matthews correlation coefficient (CoLA)"
    ),
    "pearson": MetricSpec("pearson", pearson, True, "Pearson correlation (STS-B)"),
    "spearman": MetricSpec("spearman", spearman, True, "Spearman rank correlation, average ranks for ties (STS-B)"),
}


def compute_metrics(task: TaskSpec | str, predictions: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """Score predictions with every metric of a GLUE task, on a 0-100 scale.

    Args:
        task: TaskSpec or task name.
        predictions: (N,) class ids, or (N, C) logits (argmax is taken), or (N,) / (N, 1) floats
            for a regression task.
        labels: (N,) class ids or float scores.

    Returns:
        {metric name: value × 100}, e.g. {"accuracy": 88.65}; values are not rounded.
    """
    spec = get_task(task)
    if spec.kind != "glue":
        raise ConfigError(
            f"compute_metrics scores GLUE tasks; task {spec.name!r} is of kind {spec.kind!r}"
            + (" (use prunekit.tasks.metrics.squad_scores)" if spec.kind == "squad" else "")
        )
    pred = np.asarray(predictions)
    if not spec.is_regression:
        if pred.ndim == 2 and pred.shape[1] > 1:
            pred = pred.argmax(axis=1)  # (N, C) logits -> (N,) class ids
        pred = _class_ids(pred, "predictions")
        gold = _class_ids(np.asarray(labels), "labels")
    else:
        gold = np.asarray(labels)
    results = {}
    for name in spec.metrics:
        if name not in METRICS:
            raise ConfigError(f"task {spec.name!r} names metric {name!r}, which is not in METRICS ({', '.join(METRICS)})")
        results[name] = 100.0 * METRICS[name].compute(pred, gold)
    return results


def _class_ids(values: np.ndarray, what: str) -> np.ndarray:
    if values.dtype.kind in "iub":
        return values.astype(np.int64)
    if values.dtype.kind == "f" and np.all(np.isfinite(values)) and np.all(values == np.round(values)):
        return values.astype(np.int64)
    raise DataError(f"{what} of a classification task must be class ids (integers), got dtype {values.dtype}")
