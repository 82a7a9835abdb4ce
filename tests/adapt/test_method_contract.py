"""Every registered method honours the FrozenFeatureMethod contract on every task type (those
that also take class text in tests/adapt/test_vl_methods.py)."""

import numpy as np
import pytest

from clinadapt.adapt import METHODS, create_method
from clinadapt.data.info import CLASSIFICATION_TASKS, TaskType
from clinadapt.errors import DataError
from clinadapt.eval import evaluate

FROZEN = [
    n
    for n in METHODS.names()
    if METHODS.get(n).kind == "frozen" and not getattr(METHODS.get(n), "needs_text", False)
]
CASES = [(m, t) for m in FROZEN for t in CLASSIFICATION_TASKS]


@pytest.fixture
def fitted(separable_data, num_classes):
    def fit(name, task, seed=0):
        x, y = separable_data(task, 60, seed=1)
        val = separable_data(task, 40, seed=2)
        method = create_method(name)
        assert method.fit(x, y, task, num_classes[task], val=val, seed=seed) is method
        return method

    return fit


@pytest.mark.parametrize(("name", "task"), CASES)
def test_probabilities_are_well_formed_and_informative(
    name, task, fitted, separable_data, num_classes
):
    xq, yq = separable_data(task, 80, seed=3)
    p = fitted(name, task).predict_proba(xq)
    assert p.shape == (80, num_classes[task])
    assert np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()
    if task.single_label:
        np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert evaluate(yq, p, task)["auc"] > 0.9


@pytest.mark.parametrize(("name", "task"), CASES)
def test_deterministic_given_seed(name, task, fitted, separable_data):
    xq, _ = separable_data(task, 30, seed=3)
    first = fitted(name, task, seed=5).predict_proba(xq)
    np.testing.assert_array_equal(first, fitted(name, task, seed=5).predict_proba(xq))


@pytest.mark.parametrize("name", FROZEN)
def test_inputs_are_validated(name, separable_data):
    x, y = separable_data(TaskType.MULTICLASS, 20, seed=0)
    method = create_method(name)
    with pytest.raises(RuntimeError, match="fit"):
        method.predict_proba(x)
    with pytest.raises(DataError, match="rows"):
        method.fit(x, y[:-1], TaskType.MULTICLASS, 4)
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(DataError, match="NaN"):
        method.fit(bad, y, TaskType.MULTICLASS, 4)
    with pytest.raises(DataError, match="outside"):
        method.fit(x, y + 4, TaskType.MULTICLASS, 4)
    with pytest.raises(DataError, match="validation"):
        method.fit(x, y, TaskType.MULTICLASS, 4, val=(x[:, :3], y))
    method.fit(x, y[:, 0], TaskType.MULTICLASS, 4)  # (N,) labels are accepted too
    with pytest.raises(DataError, match="dimension"):
        method.predict_proba(x[:, :5])
    with pytest.raises(DataError, match="NaN"):
        method.predict_proba(bad)


@pytest.mark.parametrize("name", FROZEN)
def test_support_missing_a_class_predicts_over_all_classes(name, separable_data):
    x, y = separable_data(TaskType.MULTICLASS, 40, seed=0)
    keep = y[:, 0] != 2
    method = create_method(name).fit(x[keep], y[keep], TaskType.MULTICLASS, 4)
    p = method.predict_proba(x)
    assert p.shape == (40, 4)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert (p[:, 2] < 1e-3).all()


@pytest.mark.parametrize("name", FROZEN)
def test_multi_label_support_with_a_constant_label(name, separable_data):
    x, y = separable_data(TaskType.MULTILABEL, 30, seed=0)
    y[:, 1], y[:, 3] = 0, 1
    p = create_method(name).fit(x, y, TaskType.MULTILABEL, 4).predict_proba(x)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p[:, 1], 0.0, atol=1e-6)
    np.testing.assert_allclose(p[:, 3], 1.0, atol=1e-6)
