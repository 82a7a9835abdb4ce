"""Input checks of the frozen-feature methods: fail early with a message naming the problem,
instead of a NumPy or scikit-learn error deep inside a fit. The label and task checks they share
with the evaluator live in ``clinadapt.data.checks``."""

from __future__ import annotations

import numpy as np

from clinadapt.data.checks import check_task, compact_labels
from clinadapt.data.info import TaskType
from clinadapt.errors import DataError

ROW_BLOCK_ELEMENTS = 1 << 20
"""Values per block of rows in the row-wise passes below: temporaries stay this small however
many examples there are."""


def row_slices(x: np.ndarray) -> list[slice]:
    """Blocks of rows of ``x`` of about ``ROW_BLOCK_ELEMENTS`` values each."""
    step = max(1, ROW_BLOCK_ELEMENTS // max(1, x.shape[1]))
    return [slice(start, start + step) for start in range(0, len(x), step)]


def check_features(features: np.ndarray, what: str = "features", copy: bool = True) -> np.ndarray:
    """A finite ``(N, D)`` array with N >= 1. With ``copy`` it is a new float64 array, which the
    methods may change in place instead of allocating another copy of the features; without, the
    input itself, for methods that convert it a block of rows at a time."""
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[0] == 0:
        raise DataError(f"{what} must be a non-empty 2-D array (N, D), got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise DataError(f"{what} must be numeric, got dtype {x.dtype}")
    if copy:
        x = x.astype(np.float64)
    bad = np.concatenate([~np.isfinite(x[rows]).all(axis=1) for rows in row_slices(x)])
    if bad.any():
        raise DataError(
            f"{what} contain NaN or infinite values in {int(bad.sum())} of {len(x)} rows "
            f"(first: row {int(np.argmax(bad))}); check the feature extraction"
        )
    return x


def check_fit_inputs(
    features: np.ndarray,
    labels: np.ndarray,
    task: TaskType | str,
    num_classes: int,
    val: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, TaskType, tuple[np.ndarray, np.ndarray] | None]:
    """Validated ``(x, y, task, val)`` for ``FrozenFeatureMethod.fit``."""
    task = check_task(task, num_classes)
    x = check_features(features)
    y = compact_labels(labels, task, num_classes, len(x))
    if val is not None:
        xv = check_features(val[0], "validation features")
        if xv.shape[1] != x.shape[1]:
            raise DataError(
                f"validation features have dimension {xv.shape[1]}, support features {x.shape[1]}"
            )
        val = (xv, compact_labels(val[1], task, num_classes, len(xv), "validation labels"))
    return x, y, task, val


def check_query(features: np.ndarray, dim: int | None, copy: bool = True) -> np.ndarray:
    """Query features for ``predict_proba``; ``dim`` is None when the method was never fitted.
    ``copy`` as in ``check_features``."""
    if dim is None:
        raise RuntimeError("call fit() before predict_proba()")
    x = check_features(features, "query features", copy=copy)
    if x.shape[1] != dim:
        raise DataError(
            f"query features have dimension {x.shape[1]}, but the method was fitted on {dim}"
        )
    return x


def targets(y: np.ndarray, task: TaskType, num_classes: int) -> np.ndarray:
    """Float ``(N, C)`` targets: one-hot for single-label tasks, the 0/1 matrix for multi-label."""
    if task.single_label:
        return np.eye(num_classes)[y]
    return y.astype(np.float64)


def l2_normalise(x: np.ndarray, *, in_place: bool = False) -> np.ndarray:
    """Rows scaled to unit length; all-zero rows stay zero instead of becoming NaN. ``in_place``
    overwrites ``x`` (a copy from ``check_features``) instead of allocating another array."""
    norms = np.concatenate([np.linalg.norm(x[rows], axis=1) for rows in row_slices(x)])
    return np.divide(x, np.maximum(norms, 1e-12)[:, None], out=x if in_place else None)
