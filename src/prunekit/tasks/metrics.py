"""Metrics of prunekit's tasks, on the 0-100 scale that reports use.

GLUE metrics and the `METRICS` registry live in `prunekit.tasks.glue.metrics`; SQuAD's exact match
and F1 live in `prunekit.tasks.qa.metrics`. Both are re-exported here.
"""

from prunekit.tasks.glue.metrics import (
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
from prunekit.tasks.qa.metrics import squad_scores

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
