import numpy as np
import pytest

from clinadapt.data import TaskType, few_shot_indices
from clinadapt.errors import ConfigError, DataError


def single_labels(counts, seed=0):
    labels = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(seed).permutation(labels)[:, None]


def test_exactly_n_per_class_sorted_subset_and_reproducible():
    labels = single_labels([30, 12, 50])
    idx, actual = few_shot_indices(labels, TaskType.MULTICLASS, 3, 5, seed=3)
    assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < len(labels)
    assert np.bincount(labels[idx, 0], minlength=3).tolist() == [5, 5, 5]
    assert actual == {"0": 5, "1": 5, "2": 5}
    again, _ = few_shot_indices(labels, TaskType.MULTICLASS, 3, 5, seed=3)
    other, _ = few_shot_indices(labels, TaskType.MULTICLASS, 3, 5, seed=4)
    assert np.array_equal(idx, again) and not np.array_equal(idx, other)


def test_all_and_string_shots():
    labels = single_labels([7, 3])
    idx, actual = few_shot_indices(labels[:, 0], "binary", 2, "all", seed=0)
    assert np.array_equal(idx, np.arange(10)) and actual == {"0": 7, "1": 3}
    idx, _ = few_shot_indices(labels, "binary", 2, "2", seed=0)
    assert len(idx) == 4


def test_too_few_examples_names_the_class():
    labels = single_labels([20, 3])
    with pytest.raises(DataError) as err:
        few_shot_indices(labels, TaskType.BINARY, 2, 5, 0, class_names=["benign", "malignant"])
    message = str(err.value)
    assert "class 1" in message and "'malignant'" in message and "only 3" in message
    assert "allow_fewer_shots=true" in message


def test_allow_fewer_takes_what_there_is():
    labels = single_labels([20, 3, 0])
    idx, actual = few_shot_indices(
        labels, TaskType.MULTICLASS, 3, 5, 0, allow_fewer=True, class_names=["a", "b", "c"]
    )
    assert actual == {"a": 5, "b": 3, "c": 0}
    assert np.bincount(labels[idx, 0], minlength=3).tolist() == [5, 3, 0]


def test_multilabel_gets_n_positives_per_label():
    rng = np.random.default_rng(0)
    labels = (rng.random((200, 4)) < [0.5, 0.3, 0.1, 0.05]).astype(np.int64)
    idx, actual = few_shot_indices(labels, TaskType.MULTILABEL, 4, 3, seed=1)
    positives = labels[idx].sum(axis=0)
    assert np.all(positives >= 3) and len(idx) <= 12
    assert actual == {str(c): int(positives[c]) for c in range(4)}


@pytest.mark.parametrize("shots", [0, "0"])
def test_zero_shots_is_an_empty_support(shots):
    idx, actual = few_shot_indices(single_labels([5, 5]), TaskType.BINARY, 2, shots, 0)
    assert idx.dtype == np.int64 and len(idx) == 0 and actual == {"0": 0, "1": 0}


@pytest.mark.parametrize("shots", [-1, "five", True, 2.5])
def test_invalid_shots(shots):
    with pytest.raises(ConfigError, match="shots"):
        few_shot_indices(single_labels([5, 5]), TaskType.BINARY, 2, shots, 0)


def test_invalid_labels_and_names():
    with pytest.raises(DataError, match="outside"):
        few_shot_indices(np.array([[0], [2]]), TaskType.BINARY, 2, 1, 0)
    with pytest.raises(ConfigError, match="class names"):
        few_shot_indices(single_labels([2, 2]), TaskType.BINARY, 2, 1, 0, class_names=["a"])
