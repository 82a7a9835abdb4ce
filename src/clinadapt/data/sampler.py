"""Few-shot support sets, drawn from the training split only, seeded: n examples per class for
classification, n labelled cases for segmentation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clinadapt.data.checks import check_labels
from clinadapt.data.info import TaskType
from clinadapt.errors import ConfigError, DataError


def few_shot_indices(
    labels: np.ndarray,
    task: TaskType | str,
    num_classes: int,
    shots: int | str,
    seed: int,
    *,
    allow_fewer: bool = False,
    class_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, dict[str, int]]:
    """Sorted indices into the training ``labels`` and the shots each class actually got.

    ``shots`` is a positive integer, ``"all"``, or 0: an empty support set, for methods that use
    no labels (the runner lets only zero-shot methods have it). Single-label: exactly ``shots``
    examples per class. Multi-label: ``shots`` positives drawn per label, united; the returned
    counts are each label's positives in the union (at least ``shots``). A class with too few
    examples is an error unless ``allow_fewer``, which then takes all it has; counts record
    what was used.
    """
    task = TaskType(task)
    labels = check_labels(labels, task, num_classes, "few-shot labels")
    names = [str(i) for i in range(num_classes)] if class_names is None else list(class_names)
    if len(names) != num_classes:
        raise ConfigError(f"{len(names)} class names given for {num_classes} classes")
    pools = [
        np.flatnonzero(labels[:, 0] == c if task.single_label else labels[:, c] == 1)
        for c in range(num_classes)
    ]
    if isinstance(shots, str) and shots.strip().lower() == "all":
        return np.arange(len(labels)), {names[c]: len(pool) for c, pool in enumerate(pools)}
    if not isinstance(shots, bool) and str(shots).strip() == "0":
        return np.zeros(0, dtype=np.int64), {name: 0 for name in names}
    n = _parse_shots(shots)
    rng = np.random.default_rng(seed)
    picks = []
    for c, pool in enumerate(pools):
        if len(pool) < n and not allow_fewer:
            raise DataError(
                f"class {c} ({names[c]!r}) has only {len(pool)} training examples, fewer than "
                f"shots={n}; use fewer shots or set allow_fewer_shots=true to use all of them"
            )
        picks.append(rng.choice(pool, size=min(n, len(pool)), replace=False))
    indices = np.unique(np.concatenate(picks)).astype(np.int64)
    if task.single_label:
        actual = {names[c]: len(pick) for c, pick in enumerate(picks)}
    else:
        actual = {names[c]: int(labels[indices, c].sum()) for c in range(num_classes)}
    return indices, actual


def few_shot_cases(n_cases: int, shots: int | str, seed: int) -> np.ndarray:
    """Sorted indices of ``shots`` training cases (``"all"``: every one) for segmentation, where
    a shot is one labelled image or volume, whatever classes it shows."""
    if isinstance(shots, str) and shots.strip().lower() == "all":
        return np.arange(n_cases)
    n = _parse_shots(shots)
    if n > n_cases:
        raise DataError(
            f"shots={n} but the training split has only {n_cases} cases; use at most {n_cases} "
            "or 'all'"
        )
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_cases, size=n, replace=False)).astype(np.int64)


def _parse_shots(shots: int | str) -> int:
    if isinstance(shots, str) and shots.strip().isdigit():
        shots = int(shots)
    if isinstance(shots, bool) or not isinstance(shots, int | np.integer) or shots < 1:
        raise ConfigError(f"shots must be a positive integer or 'all', got {shots!r}")
    return int(shots)
