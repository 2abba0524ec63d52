"""Metrics of prunekit's tasks, on the 0-100 scale that reports use.

GLUE metrics and the `METRICS` registry live in `prunekit.metrics.glue`; SQuAD's exact match
and F1 live in `prunekit.metrics.squad`. Both are re-exported here.
"""

from prunekit.metrics.glue import (
    METRICS,
    MetricSpec,
    accuracy,
    average_ranks,
    binary_f1,
    compute_metrics,
    matthews_corrcoef,
    pearson,
    spearman,
)
from prunekit.metrics.squad import squad_scores

__all__ = [
    "METRICS",
    "MetricSpec",
    "accuracy",
    "average_ranks",
    "binary_f1",
    "compute_metrics",
    "matthews_corrcoef",
    "pearson",
    "spearman",
    "squad_scores",
]
