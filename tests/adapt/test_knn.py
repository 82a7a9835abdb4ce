import math

import numpy as np
import pytest

from clinadapt.adapt import create_method
from clinadapt.data.info import TaskType


def _naive_knn(support, targets, query, k, temperature):
    """One query at a time, plain Python: cosine similarity, top-k, exp(sim / T) votes."""
    unit = [s / np.linalg.norm(s) for s in support]
    out = []
    for q in query:
        q = q / np.linalg.norm(q)
        sims = [float(np.dot(q, s)) for s in unit]
        top = sorted(range(len(sims)), key=lambda i: -sims[i])[: min(k, len(sims))]
        weights = {i: math.exp(sims[i] / temperature) for i in top}
        total = sum(weights.values())
        out.append(
            [sum(weights[i] * targets[i][c] for i in top) / total for c in range(targets.shape[1])]
        )
    return np.array(out)


@pytest.mark.parametrize("task", [TaskType.MULTICLASS, TaskType.MULTILABEL])
@pytest.mark.parametrize(("k", "temperature"), [(1, 0.07), (5, 0.07), (20, 0.5), (1000, 0.1)])
def test_matches_a_naive_loop(task, k, temperature, separable_data):
    x, y = separable_data(task, 50, seed=0, shift=1.0)
    xq, _ = separable_data(task, 15, seed=1, shift=1.0)
    targets = np.eye(4)[y[:, 0]] if task.single_label else y
    method = create_method("knn", {"k": k, "temperature": temperature}).fit(x, y, task, 4)
    expected = _naive_knn(x, targets, xq, k, temperature)
    np.testing.assert_allclose(method.predict_proba(xq), expected, rtol=1e-10, atol=1e-12)


def test_query_blocks_do_not_change_the_result(monkeypatch, separable_data):
    x, y = separable_data(TaskType.MULTICLASS, 40, seed=0, shift=1.0)
    method = create_method("knn", {"k": 7}).fit(x, y, TaskType.MULTICLASS, 4)
    whole = method.predict_proba(x)
    monkeypatch.setattr("clinadapt.adapt.knn._BLOCK_ELEMENTS", 3 * 40)
    np.testing.assert_allclose(method.predict_proba(x), whole, rtol=1e-12, atol=1e-15)


def test_low_temperature_does_not_overflow(separable_data):
    x, y = separable_data(TaskType.BINARY, 30, seed=0)
    method = create_method("knn", {"temperature": 1e-4}).fit(x, y, TaskType.BINARY, 2)
    assert np.isfinite(method.predict_proba(x)).all()
