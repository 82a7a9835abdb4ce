"""Task-aware metrics and percentile-bootstrap confidence intervals.

``auc`` and ``acc`` reproduce ``medmnist.evaluator.getAUC`` / ``getACC`` (Yang et al. 2023,
MedMNIST v2) so numbers are comparable with the published benchmarks; the other metrics add what
imbalanced medical test sets need (balanced accuracy, macro F1, per-class recall) and calibration
(expected calibration error, Guo et al. 2017, "On Calibration of Modern Neural Networks").
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from clinadapt.data.checks import check_task, compact_labels
from clinadapt.data.info import TaskType
from clinadapt.errors import ConfigError, DataError
from clinadapt.eval._weighted import (
    SCALAR_METRICS,
    Prepared,
    confusion,
    prepare,
    recall,
    scalar_metrics,
)
from clinadapt.registry import did_you_mean

_CHUNK_ELEMENTS = 1 << 20  # resample weights held at once in bootstrap_ci (8 MiB of float64)


class UndefinedMetricWarning(UserWarning):
    """A metric reported as NaN because the labels or scores cannot define it."""


def _prepare(
    labels: np.ndarray, scores: np.ndarray, task: TaskType | str, threshold: float, n_bins: int
) -> Prepared:
    s = np.asarray(scores)
    if s.ndim != 2 or s.shape[0] == 0 or not np.issubdtype(s.dtype, np.number):
        raise DataError(f"scores must be a non-empty numeric (N, C) array, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise DataError("scores contain NaN or infinite values; check the model's predictions")
    task = check_task(task, s.shape[1])
    y = compact_labels(labels, task, s.shape[1], len(s))
    if not np.isfinite(threshold):
        raise ConfigError(f"threshold must be a finite number, got {threshold}")
    if n_bins < 1:
        raise ConfigError(f"n_bins must be at least 1, got {n_bins}")
    return prepare(y, s.astype(np.float64), task, float(threshold), int(n_bins))


def evaluate(
    labels: np.ndarray,
    scores: np.ndarray,
    task: TaskType | str,
    *,
    threshold: float = 0.5,
    n_bins: int = 15,
) -> dict[str, Any]:
    """Metrics of ``scores`` (N, C) against ``labels`` ((N, 1) class indices, or (N, C) 0/1 for
    multi-label); C = 2 for binary tasks, ordinal tasks are scored as multi-class.

    - ``auc``: MedMNIST's: binary uses ``scores[:, -1]``; multi-class the macro mean of
      one-vs-rest AUCs; multi-label the mean over labels. NaN when any class (label) has only one
      value in ``labels``, where MedMNIST's evaluator would raise.
    - ``acc``: MedMNIST's: ``scores[:, -1] > threshold`` for binary, argmax for multi-class, and
      for multi-label the mean over labels of the accuracy of ``scores > threshold``.
    - ``balanced_accuracy``: mean recall over the classes present in ``labels`` (scikit-learn's);
      multi-label: the mean over labels of each label's balanced accuracy.
    - ``macro_f1``: mean F1 over classes (labels) that occur in ``labels`` or predictions.
    - ``per_class_recall``: per class (per label: sensitivity); NaN for a class with no examples.
    - ``ece``: expected calibration error over ``n_bins`` equal-width bins: top-label confidence
      for single-label tasks, every label probability for multi-label. NaN unless the scores are
      probabilities (in [0, 1]; rows summing to 1 for single-label tasks).
    - ``confusion_matrix``: rows true, columns predicted; multi-label: per label
      ``[[tn, fp], [fn, tp]]``.
    - ``n``: the number of examples.
    - ``undefined``: only when a scalar metric is NaN, why, e.g. ``{"auc": "only one class in
      the labels"}``, so reports can say so; each reason is also warned about
      (``UndefinedMetricWarning``).

    Raises ``DataError`` for mismatched shapes, NaN scores or labels out of range.
    """
    prep = _prepare(labels, scores, task, threshold, n_bins)
    w = np.ones((1, prep.cells.shape[0]))
    cm = confusion(prep, w)
    out: dict[str, Any] = {"n": prep.cells.shape[0]}
    out.update({k: float(v[0]) for k, v in scalar_metrics(prep, w, SCALAR_METRICS).items()})
    out["per_class_recall"] = [float(r) for r in recall(cm, prep.task)[0]]
    out["confusion_matrix"] = np.rint(cm[0]).astype(np.int64).tolist()
    undefined = _undefined(prep, out)
    for metric, reason in undefined.items():
        warnings.warn(
            f"{metric} is undefined: {reason}; it is reported as NaN",
            UndefinedMetricWarning,
            stacklevel=2,
        )
    if undefined:
        out["undefined"] = undefined
    return out


def auc(labels: np.ndarray, scores: np.ndarray, task: TaskType | str) -> float:
    """``evaluate``'s ``auc`` alone, NaN (without a warning) where it is undefined: for scoring
    many candidate models on validation, where the other metrics and warnings are not wanted."""
    prep = _prepare(labels, scores, task, 0.5, 1)
    return float(scalar_metrics(prep, np.ones((1, prep.cells.shape[0])), ("auc",))["auc"][0])


def _undefined(prep: Prepared, out: dict[str, Any]) -> dict[str, str]:
    """Why each NaN scalar metric of ``out`` is undefined."""
    reasons = {}
    if np.isnan(out["auc"]):
        if prep.task.single_label:
            present = [bool(positive.any()) for positive, _ in prep.auc_pairs]
            absent = [k for k, there in enumerate(present) if not there]
            one = prep.task is TaskType.BINARY or sum(present) == 1
            what = "class" if len(absent) == 1 else "classes"
            reasons["auc"] = (
                "only one class in the labels"
                if one
                else f"no examples of {what} {', '.join(map(str, absent))} in the labels"
            )
        else:
            constant = [
                k for k, (pos, _) in enumerate(prep.auc_pairs) if pos.all() or not pos.any()
            ]
            what = "label {} takes" if len(constant) == 1 else "labels {} take"
            names = what.format(", ".join(map(str, constant)))
            reasons["auc"] = f"{names} a single value (all 0 or all 1)"
    if np.isnan(out["ece"]):
        rows = ", each row summing to 1" if prep.task.single_label else ""
        reasons["ece"] = f"the scores are not probabilities (values in [0, 1]{rows})"
    return reasons


def bootstrap_ci(
    labels: np.ndarray,
    scores: np.ndarray,
    task: TaskType | str,
    *,
    metrics: Sequence[str] = ("auc", "acc", "balanced_accuracy"),
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    threshold: float = 0.5,
    n_bins: int = 15,
) -> dict[str, list[float]]:
    """Percentile-bootstrap ``[low, high]`` (1 - alpha) intervals of ``evaluate``'s scalar metrics.

    Examples are resampled with replacement (Efron & Tibshirani 1993); resample ``b`` draws
    ``rng.integers(0, N, N)`` in turn from ``numpy.random.default_rng(seed)`` (drawn as one
    ``(B, N)`` block, which gives the same numbers). Resamples where a
    metric is undefined (e.g. AUC with a class missing) are skipped for that metric, so rare
    classes can make intervals rest on fewer resamples; ``[nan, nan]`` when none is defined.
    """
    names = tuple(metrics)
    for name in names:
        if name not in SCALAR_METRICS:
            hint = did_you_mean(name, list(SCALAR_METRICS))
            raise ConfigError(f"bootstrap_ci: unknown metric {name!r}.{hint}")
    if n_resamples < 1 or not 0 < alpha < 1:
        raise ConfigError(
            f"bootstrap_ci needs n_resamples >= 1 and 0 < alpha < 1, got {n_resamples}, {alpha}"
        )
    prep = _prepare(labels, scores, task, threshold, n_bins)
    n = prep.cells.shape[0]
    rng = np.random.default_rng(seed)
    values: dict[str, list[np.ndarray]] = {name: [] for name in names}
    chunk = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        idx = rng.integers(0, n, (b, n))
        flat = (idx + n * np.arange(b)[:, None]).ravel()
        w = np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)
        for name, v in scalar_metrics(prep, w, names).items():
            values[name].append(v)
    out = {}
    for name in names:
        v = np.concatenate(values[name])
        v = v[~np.isnan(v)]
        q = np.percentile(v, [100 * alpha / 2, 100 * (1 - alpha / 2)]) if len(v) else [np.nan] * 2
        out[name] = [float(x) for x in q]
    return out
