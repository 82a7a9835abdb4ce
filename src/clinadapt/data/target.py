"""The user's own target data (an image folder or a CSV manifest, in the layouts ``load_dataset``
reads) as the test split of a trained dataset: its classes mapped onto the dataset's, its images
read at the dataset's size and channels, so the model sees them as it saw its training images."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from clinadapt.data.dataset import SPLITS, Dataset, Split
from clinadapt.data.info import DatasetInfo, TaskType
from clinadapt.data.lazy import LazySource, infer_channels, load_image
from clinadapt.data.local import load_image_folder, load_manifest
from clinadapt.data.segmentation import segmentation_layout
from clinadapt.data.volumes import read_volume
from clinadapt.errors import DataError
from clinadapt.registry import did_you_mean


def load_target(path: Path, dataset: Dataset) -> tuple[Split, dict[str, Any]]:
    """(test split, provenance) of the target at ``path`` for ``dataset``. A target that gives
    its splits (train/test folders, a split column) contributes its test split; otherwise all
    of its images are test images."""
    info, size = dataset.info, dataset.size
    if size is None:
        raise DataError(f"{info.name} has images of several sizes; a target needs one size")
    if path.is_dir() and segmentation_layout(path) is None:
        target = load_image_folder(path, image_size=size, volume_size=size)
    elif path.is_file() and path.suffix.lower() == ".csv":
        target = load_manifest(path, image_size=size, volume_size=size)
    else:
        raise DataError(
            f"target {path}: give an image folder (<class>/<images>) or a .csv manifest "
            "(path,label[,split]) holding images labelled like the dataset"
        )
    if target.info.ndim != info.ndim:
        kinds = {2: "2D images", 3: "3D volumes"}
        raise DataError(
            f"target {path} holds {kinds[target.info.ndim]} but {info.name} holds "
            f"{kinds[info.ndim]}; a model cannot be tested on the other kind"
        )
    given = bool(target.provenance.get("splits_given"))
    parts = [target["test"]] if given else [target[s] for s in SPLITS]
    paths = [p for part in parts for p in part.images.paths]
    order = sorted(range(len(paths)), key=lambda i: str(paths[i]))  # independent of the seed
    found = np.concatenate([np.asarray(part.labels) for part in parts])[order]
    paths = [paths[i] for i in order]
    classes = _class_map(target.info, info, path)
    labels = _relabel(found, target.info, info, classes)
    if info.ndim == 3:
        loader, shape, dtype = partial(read_volume, size=size), (size,) * 3, np.float32
        channels_found = 1
    else:
        loader = partial(load_image, size=size, channels=info.channels)
        shape = (size, size) if info.channels == 1 else (size, size, 3)
        dtype, channels_found = np.uint8, infer_channels(paths)
    provenance = {
        "source": target.provenance["source"],
        "md5": target.provenance["md5"],
        "md5_of": target.provenance["md5_of"],
        "splits_given": given,
        "classes": classes,
        "read_as": {"size": size, "channels": info.channels, "ndim": info.ndim},
        "channels_found": channels_found,
    }
    return Split(LazySource(paths, loader, shape, dtype), labels), provenance


def _class_map(target: DatasetInfo, info: DatasetInfo, path: Path) -> dict[str, int]:
    """Target class name -> the dataset's class index: by name (any case), else an integer
    name is the index itself (MedMNIST's labels are numbered ``0..K-1`` in its files)."""
    names = {name.lower(): i for i, name in enumerate(info.labels)}
    mapping = {}
    for name in target.labels:
        if name.lower() in names:
            mapping[name] = names[name.lower()]
        elif name.isdigit() and int(name) < info.num_classes:
            mapping[name] = int(name)
        else:
            raise DataError(
                f"target {path}: class {name!r} is neither a class of {info.name} "
                f"({', '.join(repr(n) for n in info.labels)}) nor a class index 0.."
                f"{info.num_classes - 1}.{did_you_mean(name, list(info.labels))} Name the "
                "target's classes like the dataset's"
            )
    return mapping


def _relabel(
    labels: np.ndarray, target: DatasetInfo, info: DatasetInfo, classes: dict[str, int]
) -> np.ndarray:
    """The target's labels in the dataset's label format (see ``DatasetInfo``)."""
    index = np.array([classes[name] for name in target.labels], dtype=np.int64)
    if info.task is not TaskType.MULTILABEL:
        if target.task is TaskType.MULTILABEL:
            raise DataError(
                f"target {target.name}: rows with several labels (a|b), but {info.name} gives "
                "each image one class"
            )
        return index[labels[:, :1]]
    out = np.zeros((len(labels), info.num_classes), dtype=np.int64)
    if target.task is TaskType.MULTILABEL:
        rows, cols = np.nonzero(labels)
        out[rows, index[cols]] = 1
    else:
        out[np.arange(len(labels)), index[labels[:, 0]]] = 1
    return out
