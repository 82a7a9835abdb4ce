"""Train/val/test assignment for the user's own data: stratified by class, so rare classes reach
every split, and grouped by patient, so no patient's images leak from training into test."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.model_selection import KFold, StratifiedGroupKFold, StratifiedKFold

from clinadapt.data.dataset import SPLITS
from clinadapt.errors import DataError

# 70/10/20 as folds of ten: seven train, one val, two test.
FOLDS = 10
TRAIN_FOLDS, VAL_FOLDS = 7, 1


def split_indices(
    labels: np.ndarray, groups: np.ndarray | None, seed: int
) -> dict[str, np.ndarray]:
    """Sorted indices of a seeded, stratified (and grouped) 70/10/20 train/val/test split."""
    hint = "give the splits yourself (a split column in a CSV manifest)"
    folds = _folds(labels, groups, FOLDS, seed, hint)
    return {
        "train": np.flatnonzero(folds < TRAIN_FOLDS),
        "val": np.flatnonzero((folds >= TRAIN_FOLDS) & (folds < TRAIN_FOLDS + VAL_FOLDS)),
        "test": np.flatnonzero(folds >= TRAIN_FOLDS + VAL_FOLDS),
    }


def assign_splits(
    labels: np.ndarray,
    given: np.ndarray | list[str] | None,
    groups: np.ndarray | None,
    seed: int,
    where: str,
) -> dict[str, np.ndarray]:
    """Indices per split: the ``given`` split names (a val split carved from train when none is
    given), else a seeded 70/10/20 split. Patients never span two splits."""
    if given is None:
        return split_indices(labels, groups, seed)
    idx = {s: np.flatnonzero(np.asarray(given) == s) for s in SPLITS}
    for s in ("train", "test"):
        if not len(idx[s]):
            raise DataError(f"{where}: the {s} split is empty")
    if groups is not None:
        check_disjoint_groups(idx, groups, where)
    if not len(idx["val"]):
        idx["train"], idx["val"] = carve_val(idx["train"], labels, groups, seed)
    return idx


def carve_val(
    train: np.ndarray, labels: np.ndarray, groups: np.ndarray | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split given training indices 7:1 into (train, val) for data that comes without a val set."""
    hint = "add validation data yourself (val rows in the manifest, or a val folder)"
    folds = _folds(labels[train], None if groups is None else groups[train], 8, seed, hint)
    return train[folds != 0], train[folds == 0]


def check_disjoint_groups(splits: dict[str, np.ndarray], groups: np.ndarray, where: str) -> None:
    """A patient in two splits inflates test results; refuse given splits that do that."""
    seen: dict[str, str] = {}
    for name, idx in splits.items():
        for group in map(str, np.unique(groups[idx])):
            if seen.setdefault(group, name) != name:
                raise DataError(
                    f"{where}: patient {group!r} appears in both the {seen[group]} and "
                    f"{name} splits; keep each patient in one split"
                )


def _strata(labels: np.ndarray) -> np.ndarray:
    """The class per example; for multi-label, its rarest positive label (or 'none')."""
    if labels.shape[1] == 1:
        return labels[:, 0]
    rarity = np.where(labels == 1, labels.sum(axis=0)[None, :], np.iinfo(np.int64).max)
    return np.where(labels.any(axis=1), rarity.argmin(axis=1), labels.shape[1])


def _folds(
    labels: np.ndarray, groups: np.ndarray | None, k: int, seed: int, hint: str
) -> np.ndarray:
    units = len(labels) if groups is None else len(np.unique(groups))
    if units < k:
        what = "examples" if groups is None else "patients"
        raise DataError(
            f"only {units} {what}: at least {k} are needed to split them automatically; {hint}"
        )
    strata = _strata(labels)
    if groups is not None:
        splitter = StratifiedGroupKFold(k, shuffle=True, random_state=seed)
    elif np.bincount(strata).max() >= k:
        splitter = StratifiedKFold(k, shuffle=True, random_state=seed)
    else:  # every class smaller than k: stratifying is impossible, sklearn would refuse
        splitter = KFold(k, shuffle=True, random_state=seed)
    folds = np.empty(len(labels), dtype=np.int64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for i, (_, held) in enumerate(splitter.split(np.zeros(len(labels)), strata, groups)):
            folds[held] = i
    return folds
