"""The user's own arrays in MedMNIST's npz layout: ``train_images``, ``train_labels``, ``val_*``
and ``test_*``, the way a large dataset (100,000 images and more) is best brought in.

The file is read like a MedMNIST release: each array is extracted once into ``.npy`` files keyed
by the npz's md5 and memory-mapped from there, so memory grows with the batch read, not with
the dataset. The task and classes come from the labels: ``(N,)`` or ``(N, 1)`` class indices
(binary for two classes, else multi-class), or ``(N, C)`` 0/1 columns (multi-label).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clinadapt.data import files
from clinadapt.data.checks import check_labels, check_pixels
from clinadapt.data.dataset import SPLITS, Dataset, Split
from clinadapt.data.info import DatasetInfo, TaskType
from clinadapt.data.medmnist import open_arrays
from clinadapt.errors import DataError

LAYOUT = (
    "an npz with train_images, train_labels, val_images, val_labels, test_images and "
    "test_labels (numpy.savez), images uint8 (N, H, W), (N, H, W, 3) or (N, D, H, W) volumes"
)


def load_npz(path: Path) -> Dataset:
    """``path`` as a classification dataset named after the file."""
    md5 = files.md5_file(path)
    arrays = open_arrays(path, md5, remedy=f"Save it again as {LAYOUT}.")
    images = {s: arrays[f"{s}_images"] for s in SPLITS}
    item = images["train"].shape[1:]
    for split, array in images.items():
        if array.shape[1:] != item:
            raise DataError(
                f"{path}: {split}_images has items of shape {array.shape[1:]}, train_images "
                f"{item}; every split needs one shape"
            )
        check_pixels(array, f"{path}: {split}_images")
    ndim, channels = _layout(item, path)
    task, num_classes = _task(arrays, path)
    labels = {
        s: check_labels(arrays[f"{s}_labels"], task, num_classes, f"{path}: {s}_labels")
        for s in SPLITS
    }
    for split in SPLITS:
        if len(labels[split]) != len(images[split]):
            raise DataError(
                f"{path}: {split}_images holds {len(images[split])} images but {split}_labels "
                f"holds {len(labels[split])} labels"
            )
    size = item[0]
    info = DatasetInfo(
        name=path.stem.lower(),
        task=task,
        labels=tuple(str(c) for c in range(num_classes)),
        channels=channels,
        ndim=ndim,
        splits={s: len(labels[s]) for s in SPLITS},
        sizes=(size,),
        description=f"arrays from {path}",
    )
    provenance = {
        "source": str(path),
        "md5": md5,
        "expected_md5": None,
        "verified": None,
        "size": size,
    }
    splits = {s: Split(images=images[s], labels=labels[s]) for s in SPLITS}
    return Dataset(info=info, splits=splits, size=size, provenance=provenance)


def _layout(item: tuple[int, ...], path: Path) -> tuple[int, int]:
    """(ndim, channels) of items shaped ``item``: (H, W), (H, W, 3) or (D, H, W)."""
    if len(item) == 2:
        return 2, 1
    if len(item) == 3 and item[-1] == 3:
        return 2, 3
    if len(item) == 3 and item[-1] not in (1, 4):
        return 3, 1
    raise DataError(
        f"{path}: train_images holds items of shape {item}; expected {LAYOUT.split(', ', 1)[1]}"
    )


def _task(arrays: dict[str, np.ndarray], path: Path) -> tuple[TaskType, int]:
    """The task and class count the labels of every split imply."""
    shapes = {np.shape(arrays[f"{s}_labels"])[1:] or (1,) for s in SPLITS}
    if len(shapes) > 1:
        raise DataError(f"{path}: the splits' labels differ in shape per example: {shapes}")
    (shape,) = shapes
    if len(shape) == 1 and shape[0] > 1:
        return TaskType.MULTILABEL, shape[0]
    for split in SPLITS:
        values = arrays[f"{split}_labels"]
        if values.dtype.kind not in "biuf" or not np.isfinite(values).all():
            raise DataError(f"{path}: {split}_labels must be integers, got {values.dtype} values")
    top = max(int(np.max(arrays[f"{s}_labels"], initial=0)) for s in SPLITS)
    num_classes = max(top + 1, 2)
    return (TaskType.BINARY if num_classes == 2 else TaskType.MULTICLASS), num_classes
