"""The user's own npz of arrays (MedMNIST's layout), and synthetic data written chunk by chunk:
read memory-mapped, task and classes from the labels, bad files named."""

from __future__ import annotations

import tracemalloc
import zipfile

import numpy as np
import pytest

from clinadapt.data import TaskType, load_dataset
from clinadapt.data.synthetic import write_synthetic_npz
from clinadapt.errors import ConfigError, DataError

from .toy import toy_arrays


def test_loads_by_path_memory_mapped_with_task_from_labels(tmp_path, write_npz):
    arrays = toy_arrays(num_classes=3)
    arrays["train_labels"] = arrays["train_labels"][:, 0]  # (N,) as in re-saved copies
    path = write_npz(tmp_path / "Mine.npz", arrays)
    ds = load_dataset(str(path))
    assert ds.info.name == "mine" and ds.info.task is TaskType.MULTICLASS
    assert ds.info.labels == ("0", "1", "2") and (ds.info.ndim, ds.info.channels) == (2, 1)
    assert isinstance(ds["train"].images, np.memmap) and ds.size == 28
    np.testing.assert_array_equal(ds["test"].images, arrays["test_images"])
    assert ds["train"].labels.shape == (6, 1) and ds["train"].labels.dtype == np.int64
    assert ds.provenance["source"] == str(path) and ds.provenance["verified"] is None
    assert len(ds.provenance["md5"]) == 32


@pytest.mark.parametrize(
    ("options", "task", "ndim", "channels"),
    [
        ({}, TaskType.BINARY, 2, 1),
        ({"channels": 3, "size": 16}, TaskType.BINARY, 2, 3),
        ({"multilabel": True, "num_classes": 4}, TaskType.MULTILABEL, 2, 1),
        ({"ndim": 3, "size": 8}, TaskType.BINARY, 3, 1),
    ],
)
def test_layouts(tmp_path, write_npz, options, task, ndim, channels):
    path = write_npz(tmp_path / "data.npz", **options)
    info = load_dataset(str(path)).info
    assert (info.task, info.ndim, info.channels) == (task, ndim, channels)


def test_bad_files_are_named(tmp_path, write_npz):
    arrays = toy_arrays()
    del arrays["val_labels"]
    with pytest.raises(DataError, match=r"lacks the arrays \['val_labels'\].*numpy.savez"):
        load_dataset(str(write_npz(tmp_path / "a" / "d.npz", arrays)))
    arrays = {**toy_arrays(), "test_images": toy_arrays(size=32)["test_images"]}
    with pytest.raises(DataError, match="test_images has items of shape"):
        load_dataset(str(write_npz(tmp_path / "b" / "d.npz", arrays)))
    arrays = {**toy_arrays(), "val_labels": np.full((6, 1), 0.5)}
    with pytest.raises(DataError, match="labels must be integers"):
        load_dataset(str(write_npz(tmp_path / "c" / "d.npz", arrays)))
    arrays = {**toy_arrays(), "val_labels": np.zeros((5, 1), np.uint8)}
    with pytest.raises(DataError, match="6 images but val_labels holds 5"):
        load_dataset(str(write_npz(tmp_path / "d" / "d.npz", arrays)))
    (tmp_path / "e.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable npz"):
        load_dataset(str(tmp_path / "e.npz"))


def test_synthetic_npz_is_learnable_seeded_and_loads(tmp_path):
    path = write_synthetic_npz(tmp_path / "s.npz", n_train=90, n_val=20, n_test=30, chunk=16)
    (tmp_path / "new").write_text("")  # the mode any new file gets, not the temp file's 0600
    assert path.stat().st_mode == (tmp_path / "new").stat().st_mode
    with zipfile.ZipFile(path) as archive:  # stored, so extracting it is a plain copy
        assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_STORED}
    ds = load_dataset(str(path))
    assert ds.info.task is TaskType.BINARY
    assert ds.info.splits == {"train": 90, "val": 20, "test": 30}
    assert ds["train"].images.shape == (90, 28, 28) and ds["train"].images.dtype == np.uint8
    assert np.bincount(ds["train"].labels[:, 0]).tolist() == [45, 45]
    # the classes differ where their blobs sit: the class means are far apart
    x, y = np.asarray(ds["train"].images, dtype=np.float64), ds["train"].labels[:, 0]
    gap = np.abs(x[y == 0].mean(0) - x[y == 1].mean(0)).max()
    assert gap > 20
    again = write_synthetic_npz(tmp_path / "t.npz", n_train=90, n_val=20, n_test=30, chunk=16)
    assert again.read_bytes() == path.read_bytes()
    other = write_synthetic_npz(tmp_path / "u.npz", n_train=90, n_val=20, n_test=30, seed=1)
    assert other.read_bytes() != path.read_bytes()
    with pytest.raises(ConfigError, match="chunk"):
        write_synthetic_npz(tmp_path / "v.npz", chunk=0)
    assert not list(tmp_path.glob(".*.tmp"))


def test_synthetic_npz_is_written_a_chunk_at_a_time(tmp_path):
    n, size = 4000, 64  # 16 MiB of uint8 images, 64 MiB while rendered as float32
    tracemalloc.start()
    try:
        write_synthetic_npz(tmp_path / "big.npz", n_train=n, n_val=1, n_test=1, size=size, chunk=64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20
    assert (tmp_path / "big.npz").stat().st_size > n * size * size
