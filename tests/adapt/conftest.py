"""Shared fixtures: one torch thread for tiny models, and synthetic frozen features (well-separated
Gaussian clusters for every task type)."""

import numpy as np
import pytest

from clinadapt.data.info import TaskType

NUM_CLASSES = {
    TaskType.BINARY: 2,
    TaskType.MULTICLASS: 4,
    TaskType.ORDINAL: 3,
    TaskType.MULTILABEL: 4,
}


def separable(task: TaskType, n: int, seed: int, dim: int = 16, shift: float = 4.0):
    """Features (n, dim) and labels in the dataset convention; class c (or label c) moves the
    features by ``shift`` along axis c, with unit Gaussian noise."""
    rng = np.random.default_rng(seed)
    c = NUM_CLASSES[task]
    if task is TaskType.MULTILABEL:
        labels = (rng.random((n, c)) < 0.4).astype(np.int64)
        labels[:2] = [[0] * c, [1] * c]  # both values of every label occur
        signal = labels.astype(float)
    else:
        labels = (np.arange(n) % c).reshape(n, 1).astype(np.int64)
        signal = np.eye(c)[labels[:, 0]]
    features = rng.normal(size=(n, dim))
    features[:, :c] += shift * signal
    return features, labels


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here fits tiny models."""


@pytest.fixture
def separable_data():
    """``separable(task, n, seed, dim=16, shift=4.0) -> (features, labels)``."""
    return separable


@pytest.fixture
def num_classes():
    return NUM_CLASSES
