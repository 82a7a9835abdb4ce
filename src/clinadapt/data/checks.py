"""Validation shared by the readers, the sampler, the methods and the evaluator: bad pixels,
labels and tasks fail early, with the file or value named, instead of surfacing later as a NaN
metric or a NumPy error deep inside a fit."""

from __future__ import annotations

import numpy as np

from clinadapt.data.info import TaskType
from clinadapt.errors import ConfigError, DataError

_CHECK_BYTES = 1 << 26  # scan memory-mapped arrays in chunks of about this many bytes
TOLERANCE = 1e-6  # float pixels may stray this far outside [0, 1] (rounding after a rescale)
CONTRACT = "uint8 in [0, 255] or float in [0, 1]"


def check_pixels(array: np.ndarray, where: str) -> None:
    """Raise DataError unless ``array`` holds images as uint8, or as finite floats in [0, 1].

    Float images in other ranges (0-255, -1..1, raw scanner units) would be scaled as if they
    were in [0, 1] and give wrong predictions without any error, so they are refused. Large
    (memory-mapped) arrays are scanned a chunk of images at a time so memory stays bounded.
    """
    if array.dtype == np.uint8:
        return
    if array.dtype.kind != "f":
        raise DataError(
            f"{where}: images have dtype {array.dtype}; store them as {CONTRACT} "
            "(e.g. divide 16-bit values by 65535, or CT values by their range, to get [0, 1])"
        )
    if array.ndim == 0 or len(array) == 0:
        return
    per_item = max(1, array[0].nbytes)
    step = max(1, _CHECK_BYTES // per_item)
    low, high, first_outside = np.inf, -np.inf, None
    for start in range(0, len(array), step):
        chunk = np.asarray(array[start : start + step])
        chunk = chunk.reshape(len(chunk), -1)
        bad = np.flatnonzero(~np.isfinite(chunk).all(axis=1))
        if len(bad):
            raise DataError(
                f"{where}: image {start + int(bad[0])} has NaN or infinite pixels; "
                "fix or remove it before training"
            )
        if chunk.size == 0:
            continue
        lows, highs = chunk.min(axis=1), chunk.max(axis=1)
        low, high = min(low, float(lows.min())), max(high, float(highs.max()))
        outside = np.flatnonzero((lows < -TOLERANCE) | (highs > 1 + TOLERANCE))
        if first_outside is None and len(outside):
            first_outside = start + int(outside[0])
    if first_outside is not None:
        raise DataError(
            f"{where}: float pixels range from {low:g} to {high:g} (first outside [0, 1]: image "
            f"{first_outside}); images must be {CONTRACT}. Rescale them to [0, 1] (e.g. divide "
            "0-255 values by 255) or store them as uint8"
        )


def check_labels(labels: np.ndarray, task: TaskType, num_classes: int, where: str) -> np.ndarray:
    """Labels as int64 (N, 1) class indices, or (N, num_classes) 0/1 for multi-label tasks.

    Accepts (N,) or (N, 1) for single-label tasks (some re-saved MedMNIST files use (N,)).
    """
    labels = np.asarray(labels)
    if labels.dtype.kind not in "biu":
        integral = labels.dtype.kind == "f" and np.isfinite(labels).all()
        if not integral or np.any(labels != np.round(labels)):
            raise DataError(f"{where}: labels must be integers, got {labels.dtype} values")
    if task.single_label:
        if labels.ndim == 1:
            labels = labels[:, None]
        if labels.ndim != 2 or labels.shape[1] != 1:
            raise DataError(
                f"{where}: labels have shape {labels.shape}; "
                f"a {task.value} task needs (N,) or (N, 1)"
            )
        bad = np.flatnonzero((labels[:, 0] < 0) | (labels[:, 0] >= num_classes))
        if len(bad):
            i = int(bad[0])
            raise DataError(
                f"{where}: label {labels[i, 0]} at index {i} is outside 0..{num_classes - 1} "
                f"({num_classes} classes)"
            )
    else:
        if labels.ndim != 2 or labels.shape[1] != num_classes:
            raise DataError(
                f"{where}: multi-label labels have shape {labels.shape}; expected "
                f"(N, {num_classes}), one 0/1 column per label"
            )
        bad = np.flatnonzero(~np.isin(labels, (0, 1)).all(axis=1))
        if len(bad):
            raise DataError(
                f"{where}: multi-label row {int(bad[0])} holds {labels[bad[0]].tolist()}; "
                "every value must be 0 or 1"
            )
    return labels.astype(np.int64)


def class_frequencies(labels: np.ndarray, task: TaskType, num_classes: int) -> np.ndarray:
    """Examples per class (single-label) or positives per label (multi-label)."""
    if task.single_label:
        return np.bincount(labels[:, 0], minlength=num_classes).astype(np.float64)
    return labels.sum(axis=0).astype(np.float64)


def compact_labels(
    labels: np.ndarray, task: TaskType, num_classes: int, n: int, what: str = "labels"
) -> np.ndarray:
    """Labels of ``n`` examples as the methods and metrics use them: ``(N,)`` int64 class indices
    for single-label tasks, ``(N, C)`` int64 0/1 for multi-label; the format itself is checked by
    ``check_labels``."""
    y = np.asarray(labels)
    if y.shape[:1] != (n,):
        raise DataError(
            f"{what} have {y.shape[0] if y.ndim else 0} rows but there are {n} examples"
        )
    y = check_labels(y, task, num_classes, what)
    return y[:, 0] if task.single_label else y


def check_task(task: TaskType | str, num_classes: int) -> TaskType:
    """``task`` as a ``TaskType``; binary tasks have exactly 2 classes, the others at least 2."""
    try:
        task = TaskType(task)
    except ValueError:
        choices = [t.value for t in TaskType]
        raise ConfigError(f"unknown task {task!r}; expected one of {choices}") from None
    if task is TaskType.BINARY and num_classes != 2:
        raise DataError(f"a binary task has 2 classes, got num_classes={num_classes}")
    if num_classes < (1 if task is TaskType.MULTILABEL else 2):
        raise DataError(f"a {task.value} task needs more classes, got num_classes={num_classes}")
    return task
