"""Small MedMNIST-style records and arrays for the reader tests."""

from __future__ import annotations

import numpy as np

from clinadapt.data.info import DatasetInfo, TaskType


def toy_info(
    task: TaskType = TaskType.BINARY,
    num_classes: int = 2,
    channels: int = 1,
    ndim: int = 2,
    urls: dict[int, str] | None = None,
    md5: dict[int, str] | None = None,
) -> DatasetInfo:
    """A MedMNIST-like record for files the tests create."""
    return DatasetInfo(
        name="toymnist",
        task=task,
        labels=tuple(f"c{i}" for i in range(num_classes)),
        channels=channels,
        ndim=ndim,
        sizes=(28, 64),
        urls=urls or {},
        md5=md5 or {},
    )


def toy_arrays(
    n: int = 6,
    size: int = 28,
    channels: int = 1,
    ndim: int = 2,
    num_classes: int = 2,
    multilabel: bool = False,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (size,) * ndim + ((3,) if channels == 3 else ())
    out = {}
    for split in ("train", "val", "test"):
        out[f"{split}_images"] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        if multilabel:
            out[f"{split}_labels"] = rng.integers(0, 2, (n, num_classes), dtype=np.uint8)
        else:
            out[f"{split}_labels"] = rng.integers(0, num_classes, (n, 1), dtype=np.uint8)
    return out
