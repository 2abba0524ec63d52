"""Tests of prunekit.tasks.metrics (GLUE): hand-computed cases, ties, edge cases and the 0-100 scale."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prunekit.core.errors import ConfigError, DataError
from prunekit.tasks.metrics import (
    METRICS,
    accuracy,
    average_ranks,
    binary_f1,
    compute_metrics,
    matthews_corrcoef,
    pearson,
    spearman,
)
from prunekit.tasks.spec import TASKS


def test_accuracy_hand_computed() -> None:
    assert accuracy([1, 0, 1, 1], [1, 0, 0, 1]) == 0.75
    assert accuracy(np.array([2, 2, 2]), np.array([0, 1, 2])) == pytest.approx(1 / 3)


def test_binary_f1_hand_computed() -> None:
    # TP=2 (idx 0, 3), FP=1 (idx 2), FN=1 (idx 4): F1 = 4 / (4 + 1 + 1)
    assert binary_f1([1, 0, 1, 1, 0], [1, 0, 0, 1, 1]) == pytest.approx(4 / 6)
    assert binary_f1([0, 0], [0, 0]) == 0.0  # no positives anywhere: defined as 0
    assert binary_f1([1, 1], [1, 1]) == 1.0
    assert binary_f1([0, 1], [1, 0], positive=0) == 0.0


def test_matthews_hand_computed() -> None:
    # TP=2, TN=2, FP=1, FN=1: (2·2 − 1·1) / sqrt(3·3·3·3) = 1/3
    assert matthews_corrcoef([1, 1, 0, 0, 0, 1], [1, 1, 1, 0, 0, 0]) == pytest.approx(1 / 3)
    assert matthews_corrcoef([0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)
    assert matthews_corrcoef([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    assert matthews_corrcoef([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0  # constant prediction: undefined -> 0


def test_matthews_binary_formula_on_random_data() -> None:
    rng = np.random.default_rng(0)
    pred, gold = rng.integers(0, 2, 500), rng.integers(0, 2, 500)
    tp = np.sum((pred == 1) & (gold == 1))
    tn = np.sum((pred == 0) & (gold == 0))
    fp = np.sum((pred == 1) & (gold == 0))
    fn = np.sum((pred == 0) & (gold == 1))
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert matthews_corrcoef(pred, gold) == pytest.approx(expected, abs=1e-12)


def test_pearson_against_numpy() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=200)
    y = 0.5 * x + rng.normal(size=200)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0  # constant: undefined -> 0


def test_average_ranks_with_ties() -> None:
    assert average_ranks([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert average_ranks([3, 1, 3, 3, 2]).tolist() == [4.0, 1.0, 4.0, 4.0, 2.0]
    assert average_ranks([5.0]).tolist() == [1.0]


def test_spearman_with_ties_hand_computed() -> None:
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 3, 2, 4]; centred: [-1.5, 0, 0, 1.5], [-1.5, .5, -.5, 1.5]
    # r = 4.5 / sqrt(4.5 · 5) = 0.948683...
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)  # monotone, not linear


def test_correlations_against_scipy_with_ties() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(2)
    x = rng.integers(0, 6, 300).astype(float)  # many ties, like STS-B's 0.2 steps
    y = x + rng.normal(scale=1.5, size=300).round(1)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)


def test_matthews_and_f1_against_sklearn() -> None:
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    pred, gold = rng.integers(0, 2, 300), rng.integers(0, 2, 300)
    assert matthews_corrcoef(pred, gold) == pytest.approx(sk.matthews_corrcoef(gold, pred), abs=1e-12)
    assert binary_f1(pred, gold) == pytest.approx(sk.f1_score(gold, pred), abs=1e-12)
    pred3, gold3 = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
    assert matthews_corrcoef(pred3, gold3) == pytest.approx(sk.matthews_corrcoef(gold3, pred3), abs=1e-12)


def test_registry_and_task_metrics() -> None:
    assert set(METRICS) == {"accuracy", "f1", "matthews_correlation", "pearson", "spearman"}
    assert all(spec.higher_is_better and spec.name == name for name, spec in METRICS.items())
    for task in TASKS.values():
        if task.kind == "glue":
            assert set(task.metrics) <= set(METRICS), task.name


def test_compute_metrics_scale_and_inputs() -> None:
    assert compute_metrics("sst2", [1, 0, 1, 1], [1, 0, 0, 1]) == {"accuracy": 75.0}
    assert compute_metrics("mrpc", [1, 0, 1, 1, 0], [1, 0, 0, 1, 1]) == pytest.approx(
        {"accuracy": 60.0, "f1": 400 / 6}
    )
    cola = compute_metrics("cola", [1, 1, 0, 0, 0, 1], [1, 1, 1, 0, 0, 0])
    assert cola == pytest.approx({"matthews_correlation": 100 / 3, "accuracy": 200 / 3})
    logits = np.array([[0.1, 0.9, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # (N, C) -> argmax
    assert compute_metrics("mnli", logits, [1, 0, 0]) == pytest.approx({"accuracy": 200 / 3})
    stsb = compute_metrics("stsb", np.array([[1.0], [2.0], [2.0], [3.0]]), [1.0, 3.0, 2.0, 4.0])
    assert stsb["spearman"] == pytest.approx(100 * 4.5 / math.sqrt(22.5))
    assert set(stsb) == {"pearson", "spearman"}
    assert compute_metrics("sst2", np.array([1.0, 0.0]), np.array([1, 0])) == {"accuracy": 100.0}


def test_compute_metrics_errors() -> None:
    with pytest.raises(DataError, match="3 predictions but 2 labels"):
        compute_metrics("sst2", [1, 0, 1], [1, 0])
    with pytest.raises(DataError, match="zero examples"):
        accuracy([], [])
    with pytest.raises(DataError, match="must be class ids"):
        compute_metrics("sst2", [0.3, 0.7], [0, 1])
    with pytest.raises(DataError, match="NaN or infinite"):
        compute_metrics("stsb", [float("nan"), 1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="unknown task 'stsbb'.*Did you mean 'stsb'"):
        compute_metrics("stsbb", [1.0], [1.0])
    with pytest.raises(ConfigError, match="use prunekit.tasks.metrics.squad_scores"):
        compute_metrics(TASKS["squad"], [1], [1])
