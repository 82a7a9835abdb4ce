import numpy as np
import pytest

from clinadapt.adapt import create_method
from clinadapt.data.info import TaskType


def _unit(v):
    return v / np.linalg.norm(v)


def _naive_prototype(x, y, query, task, temperature):
    """SimpleShot by hand: centre on the support mean, normalise, average, compare by cosine."""
    mean = x.mean(axis=0)
    z = [_unit(row - mean) for row in x]
    out = []
    for q in query:
        zq = _unit(q - mean)
        if task.single_label:
            protos = [
                _unit(np.mean([z[i] for i in range(len(z)) if y[i, 0] == c], axis=0))
                for c in range(4)
            ]
            logits = np.array([zq @ p / temperature for p in protos])
            e = np.exp(logits - logits.max())
            out.append(e / e.sum())
        else:
            row = []
            for c in range(y.shape[1]):
                pos = _unit(np.mean([z[i] for i in range(len(z)) if y[i, c] == 1], axis=0))
                neg = _unit(np.mean([z[i] for i in range(len(z)) if y[i, c] == 0], axis=0))
                e_pos, e_neg = np.exp(zq @ pos / temperature), np.exp(zq @ neg / temperature)
                row.append(e_pos / (e_pos + e_neg))
            out.append(row)
    return np.array(out)


@pytest.mark.parametrize("task", [TaskType.MULTICLASS, TaskType.MULTILABEL])
@pytest.mark.parametrize("temperature", [0.1, 1.0])
def test_matches_a_naive_implementation(task, temperature, separable_data):
    x, y = separable_data(task, 40, seed=0, shift=1.0)
    x += 3.0  # an offset that centring must remove
    xq, _ = separable_data(task, 10, seed=1, shift=1.0)
    method = create_method("prototype", {"temperature": temperature}).fit(x, y, task, 4)
    expected = _naive_prototype(x, y, xq, task, temperature)
    np.testing.assert_allclose(method.predict_proba(xq), expected, rtol=1e-10, atol=1e-12)


def test_centring_makes_a_shared_offset_irrelevant(separable_data):
    x, y = separable_data(TaskType.MULTICLASS, 40, seed=0)
    method = create_method("prototype")
    before = method.fit(x, y, TaskType.MULTICLASS, 4).predict_proba(x)
    after = method.fit(x + 100.0, y, TaskType.MULTICLASS, 4).predict_proba(x + 100.0)
    np.testing.assert_allclose(before, after, atol=1e-9)
