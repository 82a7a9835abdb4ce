"""Random labels and predictions for every task type."""

import numpy as np
import pytest

from clinadapt.data.info import TaskType

NUM_CLASSES = {
    TaskType.BINARY: 2,
    TaskType.MULTICLASS: 5,
    TaskType.ORDINAL: 4,
    TaskType.MULTILABEL: 6,
}


def random_predictions(task: TaskType, n: int, seed: int, ties: bool = False):
    """Labels in the dataset convention and probability scores, optionally with many ties."""
    rng = np.random.default_rng(seed)
    c = NUM_CLASSES[task]
    if task is TaskType.MULTILABEL:
        labels = (rng.random((n, c)) < 0.3).astype(np.int64)
        scores = rng.random((n, c))
    else:
        labels = rng.integers(0, c, size=(n, 1))
        scores = rng.dirichlet(np.ones(c), size=n)
    if ties:
        scores = np.round(scores, 1)
    return labels, scores


@pytest.fixture
def predictions():
    """``random_predictions(task, n, seed, ties=False) -> (labels, scores)``."""
    return random_predictions


@pytest.fixture
def num_classes():
    return NUM_CLASSES
