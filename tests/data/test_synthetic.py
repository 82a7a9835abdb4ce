import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from clinadapt.data import TaskType, load_dataset, make_synthetic
from clinadapt.errors import ConfigError


@pytest.mark.parametrize(
    ("kwargs", "image_shape", "label_shape"),
    [
        ({"task": "binary"}, (28, 28), (1,)),
        ({"task": "multi-class", "num_classes": 5, "channels": 3, "size": 32}, (32, 32, 3), (1,)),
        ({"task": "multi-label", "num_classes": 3}, (28, 28), (3,)),
        ({"task": "binary", "ndim": 3, "size": 16}, (16, 16, 16), (1,)),
    ],
)
def test_shapes_and_labels(kwargs, image_shape, label_shape):
    ds = make_synthetic(n_train=20, n_val=5, n_test=10, **kwargs)
    for split, n in (("train", 20), ("val", 5), ("test", 10)):
        assert ds[split].images.shape == (n, *image_shape)
        assert ds[split].images.dtype == np.uint8
        assert ds[split].labels.shape == (n, *label_shape) and ds[split].labels.dtype == np.int64
    assert ds.info.splits == {"train": 20, "val": 5, "test": 10}
    assert ds.provenance["source"] == "synthetic" and ds.provenance["seed"] == 0


def test_seeded():
    a, b, c = (make_synthetic("binary", seed=s) for s in (0, 0, 1))
    assert np.array_equal(a["train"].images, b["train"].images)
    assert not np.array_equal(a["train"].images, c["train"].images)


@pytest.mark.parametrize(("task", "k"), [("binary", 2), ("multi-class", 4)])
def test_learnable(task, k):
    ds = make_synthetic(task, num_classes=k, seed=0)
    x = ds["train"].images.reshape(200, -1) / 255.0
    model = LogisticRegression(max_iter=500).fit(x, ds["train"].labels[:, 0])
    acc = model.score(ds["test"].images.reshape(100, -1) / 255.0, ds["test"].labels[:, 0])
    assert acc > 0.8  # about 0.9 with all data, 0.6-0.8 with 5 shots: room to compare


def test_imbalance_sets_majority_to_minority_ratio():
    ds = make_synthetic(TaskType.MULTICLASS, num_classes=3, n_train=700, imbalance=10.0)
    counts = np.bincount(ds["train"].labels[:, 0])
    assert counts[0] > counts[1] > counts[2]
    assert counts[0] / counts[2] == pytest.approx(10, rel=0.1)


def test_shift_changes_only_the_test_split():
    plain, shifted = make_synthetic("binary"), make_synthetic("binary", shift=1.0)
    assert np.array_equal(plain["train"].images, shifted["train"].images)
    assert shifted["test"].images.mean() > plain["test"].images.mean() + 20
    assert shifted["test"].images.std() < plain["test"].images.std()


def test_registered_multilabel_loads():
    ds = load_dataset("synthetic-multilabel")
    assert ds["train"].labels.shape == (200, 3) and ds.info.task is TaskType.MULTILABEL


@pytest.mark.parametrize(
    "kwargs",
    [
        {"task": "binary", "num_classes": 3},
        {"task": "multi-class", "num_classes": 1},
        {"task": "binary", "imbalance": 0.5},
        {"task": "binary", "size": 4},
        {"task": "binary", "ndim": 3, "channels": 3},
        {"task": "binary", "n_val": 0},
    ],
)
def test_bad_parameters(kwargs):
    with pytest.raises(ConfigError):
        make_synthetic(**kwargs)
