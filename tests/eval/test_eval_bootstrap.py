import math
import time

import numpy as np
import pytest

from clinadapt.data.info import CLASSIFICATION_TASKS, TaskType
from clinadapt.errors import ConfigError
from clinadapt.eval import bootstrap_ci, evaluate

ALL = ("auc", "acc", "balanced_accuracy", "macro_f1", "ece")


@pytest.fixture
def informative(predictions):
    """Predictions that carry signal, so that the metrics are away from their bounds."""

    def make(task, n, seed):
        labels, scores = predictions(task, n, seed)
        if task.single_label:
            scores = scores + 0.3 * np.eye(scores.shape[1])[labels[:, 0]]
            return labels, scores / scores.sum(axis=1, keepdims=True)
        return labels, 0.5 * scores + 0.4 * labels

    return make


@pytest.mark.parametrize("task", CLASSIFICATION_TASKS)
def test_interval_equals_a_naive_resampling_loop(task, informative):
    labels, scores = informative(task, 80, 0)
    ci = bootstrap_ci(labels, scores, task, metrics=ALL, n_resamples=60, seed=3)
    rng = np.random.default_rng(3)
    values = {m: [] for m in ALL}
    for _ in range(60):
        idx = rng.integers(0, 80, 80)
        result = evaluate(labels[idx], scores[idx], task)
        for m in ALL:
            if not math.isnan(result[m]):
                values[m].append(result[m])
    for m in ALL:
        np.testing.assert_allclose(ci[m], np.percentile(values[m], [2.5, 97.5]), atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 81])
def test_resamples_drawn_as_blocks_equal_one_draw_per_resample(n, informative, monkeypatch):
    """Chunks of 7 resamples of an odd-sized, even-sized and single-example test set draw the
    same indices as the documented loop of ``rng.integers(0, N, N)``, one resample at a time."""
    monkeypatch.setattr("clinadapt.eval.metrics._CHUNK_ELEMENTS", 7 * n)
    labels, scores = informative(TaskType.MULTICLASS, 81, 4)
    labels, scores = labels[:n], scores[:n]
    ci = bootstrap_ci(labels, scores, "multi-class", metrics=ALL[1:], n_resamples=30, seed=5)
    rng = np.random.default_rng(5)
    values = {m: [] for m in ALL[1:]}
    for _ in range(30):
        idx = rng.integers(0, n, n)
        result = evaluate(labels[idx], scores[idx], "multi-class")
        for m in values:
            values[m].append(result[m])
    for m, v in values.items():
        v = np.asarray(v)[~np.isnan(v)]
        np.testing.assert_allclose(ci[m], np.percentile(v, [2.5, 97.5]), atol=1e-12)


@pytest.mark.parametrize("task", CLASSIFICATION_TASKS)
def test_interval_contains_estimate_and_narrows_with_more_data(task, informative):
    small = informative(task, 100, 1)
    large = informative(task, 2000, 1)
    ci_small = bootstrap_ci(*small, task, n_resamples=300)
    ci_large = bootstrap_ci(*large, task, n_resamples=300)
    point = evaluate(*large, task)
    for m, (low, high) in ci_large.items():
        assert low <= point[m] <= high
        assert high - low < ci_small[m][1] - ci_small[m][0]


def test_reproducible_for_a_seed(informative):
    labels, scores = informative(TaskType.MULTICLASS, 200, 2)
    first = bootstrap_ci(labels, scores, "multi-class", seed=7, n_resamples=200)
    assert first == bootstrap_ci(labels, scores, "multi-class", seed=7, n_resamples=200)
    assert first != bootstrap_ci(labels, scores, "multi-class", seed=8, n_resamples=200)


def test_undefined_resamples_are_skipped():
    labels = np.array([[1]] + [[0]] * 9)
    scores = np.random.default_rng(0).dirichlet([1, 1], 10)
    ci = bootstrap_ci(labels, scores, "binary", n_resamples=200)
    assert all(math.isfinite(x) for x in ci["auc"] + ci["acc"])
    one_class = bootstrap_ci(labels[1:], scores[1:], "binary", n_resamples=20)
    assert all(math.isnan(x) for x in one_class["auc"])


def test_thousand_resamples_of_thousand_examples_are_fast(informative):
    labels, scores = informative(TaskType.MULTICLASS, 1000, 3)
    start = time.perf_counter()
    bootstrap_ci(labels, scores, "multi-class", metrics=ALL, n_resamples=1000)
    assert time.perf_counter() - start < 5


def test_options_are_validated(informative):
    labels, scores = informative(TaskType.BINARY, 20, 0)
    with pytest.raises(ConfigError, match="Did you mean 'auc'"):
        bootstrap_ci(labels, scores, "binary", metrics=("aucc",))
    with pytest.raises(ConfigError, match="alpha"):
        bootstrap_ci(labels, scores, "binary", alpha=1.5)


def test_memory_of_a_large_test_set_stays_small(informative):
    import tracemalloc

    labels, scores = informative(TaskType.BINARY, 50_000, 0)
    tracemalloc.start()
    try:
        bootstrap_ci(labels, scores, "binary", metrics=ALL, n_resamples=200, seed=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 128 * 2**20  # a few resamples at a time (before: 300 MB)
