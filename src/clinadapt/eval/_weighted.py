"""Metrics as functions of per-example weights.

A bootstrap resample drawn with replacement is the original set with each example weighted by how
often it was drawn, so one code path gives the point estimate (weights all 1, ``B = 1``) and
``B`` resamples at once (weights ``(B, N)``): confusion counts and calibration bins become matrix
products and AUC a weighted Mann-Whitney statistic over one sort per class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clinadapt.data.info import TaskType

SCALAR_METRICS = ("auc", "acc", "balanced_accuracy", "macro_f1", "ece")


@dataclass(frozen=True)
class Prepared:
    """Everything the metrics need, computed once from labels and scores."""

    task: TaskType
    num_classes: int
    cells: np.ndarray  # (N, K) count of each confusion cell per example
    auc_pairs: list[tuple[np.ndarray, np.ndarray]]  # (is positive, score) per class or label
    calibration: np.ndarray | None  # (N, 3 * n_bins): per bin count, sum prob, sum outcome


def _bin_table(
    rows: np.ndarray, prob: np.ndarray, outcome: np.ndarray, n: int, n_bins: int
) -> np.ndarray:
    """Per example and equal-width bin (lo, hi] (0 goes to the first): count, sum prob, sum 0/1."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, prob, side="left") - 1, 0, n_bins - 1)
    table = np.zeros((n, 3 * n_bins))
    for part, value in enumerate((np.ones_like(prob), prob, outcome)):
        np.add.at(table, (rows, part * n_bins + bins), value)
    return table


def prepare(
    y: np.ndarray, scores: np.ndarray, task: TaskType, threshold: float, n_bins: int
) -> Prepared:
    """``y`` is validated: (N,) class indices or (N, C) 0/1; ``scores`` is (N, C) finite."""
    n, c = scores.shape
    rows = np.arange(n)
    is_prob = bool(((scores >= 0) & (scores <= 1)).all())
    if task.single_label:
        if task is TaskType.BINARY:  # MedMNIST scores the positive column alone
            pred = (scores[:, -1] > threshold).astype(np.int64)
            auc_pairs = [(y == 1, scores[:, -1])]
        else:
            pred = scores.argmax(axis=1)
            auc_pairs = [(y == k, scores[:, k]) for k in range(c)]
        cells = np.zeros((n, c * c))
        cells[rows, y * c + pred] = 1.0
        top = scores.argmax(axis=1)
        calibrated = is_prob and np.allclose(scores.sum(axis=1), 1.0, atol=1e-4)
        calibration = (
            _bin_table(rows, scores[rows, top], (top == y).astype(np.float64), n, n_bins)
            if calibrated
            else None
        )
    else:
        pred = (scores > threshold).astype(np.int64)
        cells = np.zeros((n, 4 * c))
        cells[rows[:, None], 4 * np.arange(c) + 2 * y + pred] = 1.0
        auc_pairs = [(y[:, k] == 1, scores[:, k]) for k in range(c)]
        calibration = (
            _bin_table(np.repeat(rows, c), scores.ravel(), y.ravel().astype(np.float64), n, n_bins)
            if is_prob
            else None
        )
    return Prepared(task, c, cells, auc_pairs, calibration)


def confusion(prep: Prepared, w: np.ndarray) -> np.ndarray:
    """Weighted confusion counts: (B, C, C) rows true / columns predicted for single-label tasks,
    (B, C, 2, 2) per label ``[[tn, fp], [fn, tp]]`` for multi-label."""
    counts = w @ prep.cells
    c = prep.num_classes
    return counts.reshape(-1, c, c) if prep.task.single_label else counts.reshape(-1, c, 2, 2)


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den``, NaN where ``den`` is 0."""
    return np.divide(num, den, out=np.full(np.broadcast(num, den).shape, np.nan), where=den > 0)


def nanmean(a: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean over the defined (non-NaN) entries; NaN, without a warning, where none are."""
    defined = ~np.isnan(a)
    return ratio(np.where(defined, a, 0.0).sum(axis=axis), defined.sum(axis=axis))


def recall(cm: np.ndarray, task: TaskType) -> np.ndarray:
    """(B, C) recall of each class (single-label) or sensitivity of each label (multi-label)."""
    if task.single_label:
        return ratio(np.diagonal(cm, axis1=1, axis2=2), cm.sum(axis=2))
    return ratio(cm[..., 1, 1], cm[..., 1, :].sum(axis=-1))


def _auc(w: np.ndarray, positive: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Weighted Mann-Whitney AUC, ties counting one half (equals roc_auc_score); NaN when the
    positives or negatives have no weight."""
    order = np.argsort(score, kind="stable")
    s, pos = score[order], positive[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of tied scores
    ws = w[:, order]
    wpos = np.add.reduceat(ws * pos, starts, axis=1)
    wneg = np.add.reduceat(ws * ~pos, starts, axis=1)
    below = np.cumsum(wneg, axis=1) - wneg
    wins = (wpos * (below + 0.5 * wneg)).sum(axis=1)
    return ratio(wins, wpos.sum(axis=1) * wneg.sum(axis=1))


def scalar_metrics(prep: Prepared, w: np.ndarray, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The requested ``SCALAR_METRICS`` for each row of weights ``w`` (B, N), as (B,) arrays."""
    out: dict[str, np.ndarray] = {}
    if "auc" in names:  # undefined for one class -> undefined macro average, as MedMNIST fails
        out["auc"] = np.mean([_auc(w, t, s) for t, s in prep.auc_pairs], axis=0)
    cm = confusion(prep, w)
    total = w.sum(axis=1)
    if prep.task.single_label:
        tp = np.diagonal(cm, axis1=1, axis2=2)
        f1 = ratio(2 * tp, cm.sum(axis=2) + cm.sum(axis=1))
        acc = tp.sum(axis=1) / total
        balanced = nanmean(recall(cm, prep.task))
    else:
        tn, fp, fn, tp = (cm[..., i, j] for i in (0, 1) for j in (0, 1))
        f1 = ratio(2 * tp, 2 * tp + fp + fn)
        acc = ((tn + tp) / total[:, None]).mean(axis=1)
        balanced = nanmean(np.stack([ratio(tp, tp + fn), ratio(tn, tn + fp)]), axis=0).mean(1)
    metrics = {"acc": acc, "balanced_accuracy": balanced, "macro_f1": nanmean(f1)}
    out.update({k: v for k, v in metrics.items() if k in names})
    if "ece" in names:
        out["ece"] = _ece(prep, w)
    return out


def _ece(prep: Prepared, w: np.ndarray) -> np.ndarray:
    if prep.calibration is None:
        return np.full(len(w), np.nan)
    count, prob, outcome = np.split(w @ prep.calibration, 3, axis=1)
    return np.abs(prob - outcome).sum(axis=1) / count.sum(axis=1)
