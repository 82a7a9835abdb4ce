"""Synthetic datasets for tests and offline demos: learnable, seeded, any task and shape.

Each class has its own blob position and stripe frequency; jitter and noise keep the task
from being trivial. ``imbalance`` skews class frequencies and ``shift`` changes the test split's
intensity and contrast, to exercise imbalance handling and test-time adaptation.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from clinadapt.data.dataset import SPLITS, Dataset, Split
from clinadapt.data.info import DatasetInfo, TaskType
from clinadapt.errors import ConfigError
from clinadapt.paths import share_like_new_file

# Registered names and their small defaults; load_dataset("synthetic-binary") works offline.
PRESETS: dict[str, dict] = {
    "synthetic-binary": {"task": TaskType.BINARY, "num_classes": 2},
    "synthetic-multiclass": {"task": TaskType.MULTICLASS, "num_classes": 4},
    "synthetic-multilabel": {"task": TaskType.MULTILABEL, "num_classes": 3},
    "synthetic-3d": {"task": TaskType.BINARY, "num_classes": 2, "ndim": 3},
}
DEFAULT_SPLITS = {"train": 200, "val": 50, "test": 100}


def synthetic_info(
    name: str,
    task: TaskType,
    num_classes: int,
    channels: int,
    ndim: int,
    splits: dict[str, int],
    sizes: tuple[int, ...],
) -> DatasetInfo:
    return DatasetInfo(
        name=name,
        task=task,
        labels=tuple(f"class {i}" for i in range(num_classes)),
        channels=channels,
        ndim=ndim,
        splits=dict(splits),
        sizes=sizes,
        description=f"synthetic {task.value} data: class-dependent blobs and stripes plus noise",
        license="CC0-1.0",
        modality="synthetic",
    )


def make_synthetic(
    task: TaskType | str,
    *,
    n_train: int = 200,
    n_val: int = 50,
    n_test: int = 100,
    num_classes: int = 2,
    size: int = 28,
    channels: int = 1,
    ndim: int = 2,
    imbalance: float = 1.0,
    shift: float = 0.0,
    seed: int = 0,
    name: str | None = None,
) -> Dataset:
    """A uint8 dataset shaped like MedMNIST: (N, S, S), (N, S, S, 3) or (N, S, S, S)."""
    task = TaskType(task)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    _check(task, counts, num_classes, size, channels, ndim, imbalance)
    priors = _priors(num_classes, imbalance)
    centres = _centres(num_classes, ndim)
    splits = {}
    for i, split in enumerate(SPLITS):
        rng = np.random.default_rng([seed, i])
        onehot = _draw_labels(rng, task, counts[split], priors)
        images = _render(
            rng, onehot, centres, size, ndim, channels, shift if split == "test" else 0
        )
        labels = onehot if task is TaskType.MULTILABEL else onehot.argmax(axis=1)[:, None]
        splits[split] = Split(images=images, labels=labels.astype(np.int64))
    info = synthetic_info(
        name or f"synthetic-{task.value}", task, num_classes, channels, ndim, counts, (size,)
    )
    params = {"imbalance": imbalance, "shift": shift, "size": size, "channels": channels}
    provenance = {
        "source": "synthetic",
        "seed": seed,
        "md5": None,
        "expected_md5": None,
        "verified": None,
        "size": size,
        "params": params,
    }
    return Dataset(info=info, splits=splits, size=size, provenance=provenance)


def write_synthetic_npz(
    path: str | Path,
    task: TaskType | str = TaskType.BINARY,
    *,
    n_train: int = 200,
    n_val: int = 50,
    n_test: int = 100,
    num_classes: int = 2,
    size: int = 28,
    seed: int = 0,
    chunk: int = 1024,
) -> Path:
    """``make_synthetic``'s kind of grayscale images written as an npz in MedMNIST's layout
    (uncompressed), ``chunk`` images at a time: a dataset larger than memory can be made, and
    ``load_dataset(path)`` reads it memory-mapped. Each chunk has its own seed, so the images
    differ from ``make_synthetic``'s with the same seed."""
    task = TaskType(task)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    _check(task, counts, num_classes, size, 1, 2, 1.0)
    if chunk < 1:
        raise ConfigError(f"chunk must be at least 1, got {chunk}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    priors, centres = _priors(num_classes, 1.0), _centres(num_classes, 2)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for i, split in enumerate(SPLITS):
                onehot = _draw_labels(np.random.default_rng([seed, i]), task, counts[split], priors)
                shape = (len(onehot), size, size)
                with archive.open(f"{split}_images.npy", "w", force_zip64=True) as out:
                    np.lib.format.write_array_header_1_0(
                        out, {"descr": "|u1", "fortran_order": False, "shape": shape}
                    )
                    for c, start in enumerate(range(0, len(onehot), chunk)):
                        rng = np.random.default_rng([seed, i, c])
                        part = onehot[start : start + chunk]
                        out.write(_render(rng, part, centres, size, 2, 1, 0).tobytes())
                labels = onehot if task is TaskType.MULTILABEL else onehot.argmax(axis=1)[:, None]
                with archive.open(f"{split}_labels.npy", "w") as out:
                    np.lib.format.write_array(out, labels.astype(np.uint8), allow_pickle=False)
        share_like_new_file(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _check(
    task: TaskType,
    counts: dict[str, int],
    num_classes: int,
    size: int,
    channels: int,
    ndim: int,
    imbalance: float,
) -> None:
    if task is TaskType.BINARY and num_classes != 2:
        raise ConfigError(f"a binary task has 2 classes, got num_classes={num_classes}")
    if num_classes < 2 or min(counts.values()) < 1 or size < 8 or imbalance < 1:
        raise ConfigError(
            "synthetic data needs num_classes >= 2, at least 1 example per split, size >= 8 "
            f"and imbalance >= 1; got {num_classes}, {counts}, {size}, {imbalance}"
        )
    if ndim not in (2, 3) or channels not in (1, 3) or (ndim == 3 and channels != 1):
        raise ConfigError(
            f"use ndim 2 with 1 or 3 channels, or ndim 3 with 1; got {ndim}, {channels}"
        )


def _priors(num_classes: int, imbalance: float) -> np.ndarray:
    """Majority class 0 down to minority class K-1, the two differing by ``imbalance``."""
    return float(imbalance) ** (-np.arange(num_classes) / (num_classes - 1))


def _centres(num_classes: int, ndim: int) -> np.ndarray:
    """Class blob centres on a circle in (H, W), alternating above/below the middle in depth."""
    angles = 2 * np.pi * np.arange(num_classes) / num_classes
    hw = 0.45 * np.stack([np.sin(angles), np.cos(angles)], axis=1)
    if ndim == 2:
        return hw
    depth = np.where(np.arange(num_classes) % 2 == 0, -0.3, 0.3)[:, None]
    return np.concatenate([depth, hw], axis=1)


def _draw_labels(
    rng: np.random.Generator, task: TaskType, n: int, priors: np.ndarray
) -> np.ndarray:
    """(n, K) 0/1. Single-label: class counts follow ``priors`` exactly, each class at least once
    when n allows; multi-label: label j is positive with probability 0.5 * priors[j] / max."""
    k = len(priors)
    if task is TaskType.MULTILABEL:
        return (rng.random((n, k)) < 0.5 * priors / priors.max()).astype(np.int64)
    counts = np.floor(n * priors / priors.sum()).astype(int)
    if n >= k:
        counts = np.maximum(counts, 1)
    while counts.sum() > n:
        counts[counts.argmax()] -= 1
    counts[0] += n - counts.sum()
    classes = rng.permutation(np.repeat(np.arange(k), counts))
    return np.eye(k, dtype=np.int64)[classes]


def _render(
    rng: np.random.Generator,
    onehot: np.ndarray,
    centres: np.ndarray,
    size: int,
    ndim: int,
    channels: int,
    shift: float,
) -> np.ndarray:
    n, k = onehot.shape
    axes = np.meshgrid(*[np.linspace(-1, 1, size)] * ndim, indexing="ij")
    grid = np.stack(axes).astype(np.float32)  # (ndim, *spatial)
    image = 0.25 + 0.2 * rng.standard_normal((n, *grid.shape[1:]), dtype=np.float32)
    for c in range(k):
        on = np.flatnonzero(onehot[:, c])
        if not len(on):
            continue
        pos = centres[c] + rng.normal(0, 0.15, (len(on), ndim))
        d2 = sum((grid[d][None] - pos[:, d].reshape(-1, *[1] * ndim)) ** 2 for d in range(ndim))
        stripes = 0.7 + 0.3 * np.cos(np.pi * (c + 2) * grid[-1])
        image[on] += 0.3 * np.exp(-d2 / (2 * 0.22**2)) * stripes
    image = (image - 0.5) * (1 - 0.5 * shift) + 0.5 + 0.2 * shift
    if channels == 3:
        tint = np.array([1.0, 0.85, 0.7])
        image = image[..., None] * tint
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
