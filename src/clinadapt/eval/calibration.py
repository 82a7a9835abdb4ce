"""Calibration: temperature scaling, expected calibration error (top-label and classwise), Brier
score and reliability diagrams.

Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks") divides the
logits by one scalar ``T > 0`` fitted on the validation split by minimising the negative
log-likelihood. It never changes the argmax (accuracy), nor the ranking of binary and multi-label
scores (their AUC); the one-vs-rest AUCs of multi-class tasks can move slightly, since each row's
normalisation changes with ``T``.
Binary tasks here have two softmax outputs, like multi-class ones, and are scaled the same way.
Multi-label tasks get one temperature shared by every label's sigmoid, fitted on the mean binary
cross-entropy over all labels: the same single parameter, where a temperature per label would be
fitted on the handful of positives a rare label has in a validation split.

``expected_calibration_error`` bins exactly as ``evaluate``'s ``ece`` (same equal-width bins, same
code), so the numbers agree; ``classwise_ece`` is Kull et al. 2019 ("Beyond temperature scaling"),
the ECE of each class's (label's) probability averaged over classes. ``brier_score`` follows
scikit-learn's ``brier_score_loss``: the positive class's squared error for binary tasks (in
[0, 1]), the squared error of the whole probability vector for multi-class ones (in [0, 2], Brier
1950), and the mean over labels of each label's binary score for multi-label tasks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, log_softmax, softmax

from clinadapt.data.checks import check_task, compact_labels
from clinadapt.data.info import TaskType
from clinadapt.errors import ConfigError, DataError
from clinadapt.eval._weighted import _bin_table

__all__ = [
    "TEMPERATURE_BOUNDS",
    "ReliabilityBins",
    "TemperatureFit",
    "apply_temperature",
    "brier_score",
    "calibration_metrics",
    "classwise_ece",
    "expected_calibration_error",
    "fit_temperature",
    "logits_from_probabilities",
    "plot_reliability",
    "reliability_bins",
]

TEMPERATURE_BOUNDS = (0.01, 100.0)
"""The fitted temperature stays in this range. Validation logits that separate the classes
perfectly have an NLL that keeps falling towards 0 as ``T`` shrinks; the fit then returns a small
``T``, where the NLL's gradient has vanished (below 1e-10), or 0.01."""


@dataclass(frozen=True)
class TemperatureFit:
    """A fitted temperature and the validation NLL (mean per example, per label for multi-label
    tasks) before (``T = 1``) and after scaling."""

    temperature: float
    nll_before: float
    nll_after: float


@dataclass(frozen=True)
class ReliabilityBins:
    """Per equal-width confidence bin: examples (label probabilities for multi-label tasks), their
    mean probability and the fraction correct (positive); NaN in empty bins."""

    edges: np.ndarray
    count: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray


def _scores(
    scores: np.ndarray, labels: np.ndarray, task: TaskType | str, what: str
) -> tuple[np.ndarray, np.ndarray, TaskType]:
    """``scores`` as float64 (N, C), labels as (N,) indices or (N, C) 0/1, and the task."""
    s = np.asarray(scores)
    if s.ndim != 2 or s.shape[0] == 0 or not np.issubdtype(s.dtype, np.number):
        raise DataError(f"{what} must be a non-empty numeric (N, C) array, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise DataError(f"{what} contain NaN or infinite values; check the model's predictions")
    task = check_task(task, s.shape[1])
    return s.astype(np.float64), compact_labels(labels, task, s.shape[1], len(s)), task


def _probabilities(
    probs: np.ndarray, labels: np.ndarray, task: TaskType | str
) -> tuple[np.ndarray, np.ndarray, TaskType]:
    p, y, task = _scores(probs, labels, task, "probabilities")
    rows_sum = task.single_label and not np.allclose(p.sum(axis=1), 1.0, atol=1e-4)
    if (p < 0).any() or (p > 1).any() or rows_sum:
        rows = ", each row summing to 1" if task.single_label else ""
        raise DataError(
            f"calibration needs probabilities (values in [0, 1]{rows}); pass softmax (sigmoid) "
            "outputs, e.g. from apply_temperature, not logits"
        )
    return p, y, task


def _nll(a: float, z: np.ndarray, y: np.ndarray, single_label: bool) -> tuple[float, float]:
    """Mean NLL of logits ``z`` multiplied by ``a = 1 / T``, and its derivative in ``a``."""
    az = a * z
    if single_label:
        rows = np.arange(len(z))
        logp = log_softmax(az, axis=1)
        grad = (np.exp(logp) * z).sum(axis=1) - z[rows, y]
        return float(-logp[rows, y].mean()), float(grad.mean())
    loss = np.logaddexp(0.0, az) - y * az  # binary cross-entropy with logits
    return float(loss.mean()), float(((expit(az) - y) * z).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, task: TaskType | str) -> TemperatureFit:
    """The temperature minimising the validation NLL of ``logits`` (N, C) against ``labels``.

    The NLL is convex in ``1 / T`` (a log-sum-exp, or softplus, of a linear function), so
    L-BFGS-B over ``1 / T`` with the exact gradient finds the global minimum within
    ``TEMPERATURE_BOUNDS``. Raises ``DataError`` for NaN logits or mismatched labels."""
    z, y, task = _scores(logits, labels, task, "logits")
    single = task.single_label
    lo, hi = TEMPERATURE_BOUNDS
    res = minimize(
        lambda a: _nll(float(a[0]), z, y, single),
        x0=np.array([1.0]),
        jac=True,
        method="L-BFGS-B",
        bounds=[(1.0 / hi, 1.0 / lo)],
        options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": 500},
    )
    a = float(res.x[0])
    return TemperatureFit(1.0 / a, _nll(1.0, z, y, single)[0], _nll(a, z, y, single)[0])


def apply_temperature(logits: np.ndarray, temperature: float, task: TaskType | str) -> np.ndarray:
    """Probabilities of ``logits / temperature``: softmax over classes, per-label sigmoid for
    multi-label tasks."""
    if not (np.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"temperature must be a positive finite number, got {temperature}")
    z = np.asarray(logits, dtype=np.float64) / temperature
    return softmax(z, axis=1) if TaskType(task).single_label else expit(z)


def logits_from_probabilities(probs: np.ndarray, task: TaskType | str) -> np.ndarray:
    """Logits that give back ``probs`` (N, C): ``log p`` for softmax outputs (the logits up to a
    per-row constant, which temperature scaling ignores: ``softmax(log p / T)`` is exactly the
    scaled softmax), ``log(p / (1 - p))`` for sigmoid outputs. For runs that kept probabilities
    only; probabilities rounded to exactly 0 or 1 come back as large finite logits."""
    p = np.asarray(probs, dtype=np.float64)
    tiny = np.finfo(np.float64).tiny
    if TaskType(task).single_label:
        return np.log(np.clip(p, tiny, 1.0))
    p = np.clip(p, tiny, 1.0 - np.finfo(np.float64).epsneg)
    return np.log(p) - np.log1p(-p)


def _bin_sums(prob: np.ndarray, outcome: np.ndarray, n_bins: int) -> np.ndarray:
    """(3, n_bins): count, sum of probabilities and sum of 0/1 outcomes per bin, binned by the
    same code as ``evaluate``'s ECE."""
    rows = np.arange(len(prob))
    return _bin_table(rows, prob, outcome, len(prob), n_bins).sum(axis=0).reshape(3, n_bins)


def _check_bins(n_bins: int) -> None:
    if n_bins < 1:
        raise ConfigError(f"n_bins must be at least 1, got {n_bins}")


def _top_label(p: np.ndarray, y: np.ndarray, task: TaskType) -> tuple[np.ndarray, np.ndarray]:
    """What ECE bins: top-label confidence and correctness, or every label's probability and
    0/1 value for multi-label tasks (as ``evaluate``)."""
    if task.single_label:
        top = p.argmax(axis=1)
        return p[np.arange(len(p)), top], (top == y).astype(np.float64)
    return p.ravel(), y.ravel().astype(np.float64)


def reliability_bins(
    probs: np.ndarray, labels: np.ndarray, task: TaskType | str, *, n_bins: int = 15
) -> ReliabilityBins:
    """Per-bin counts, mean confidence and accuracy: the data of a reliability diagram."""
    _check_bins(n_bins)
    p, y, task = _probabilities(probs, labels, task)
    count, prob, outcome = _bin_sums(*_top_label(p, y, task), n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf, acc = prob / count, outcome / count
    return ReliabilityBins(np.linspace(0.0, 1.0, n_bins + 1), count, conf, acc)


def expected_calibration_error(
    probs: np.ndarray, labels: np.ndarray, task: TaskType | str, *, n_bins: int = 15
) -> float:
    """ECE over ``n_bins`` equal-width bins (lo, hi]: the count-weighted mean gap between
    confidence and accuracy; equals ``evaluate(...)["ece"]``."""
    _check_bins(n_bins)
    p, y, task = _probabilities(probs, labels, task)
    count, prob, outcome = _bin_sums(*_top_label(p, y, task), n_bins)
    return float(np.abs(prob - outcome).sum() / count.sum())


def classwise_ece(
    probs: np.ndarray, labels: np.ndarray, task: TaskType | str, *, n_bins: int = 15
) -> float:
    """Classwise ECE (Kull et al. 2019): for each class (label) ``k``, the ECE of ``p_k``
    against ``1[y = k]`` over all examples; their mean over classes. Unlike the top-label ECE it
    sees miscalibration of the classes a model rarely predicts."""
    _check_bins(n_bins)
    p, y, task = _probabilities(probs, labels, task)
    onehot = np.eye(p.shape[1])[y] if task.single_label else y.astype(np.float64)
    per_class = []
    for k in range(p.shape[1]):
        _, prob, outcome = _bin_sums(p[:, k], onehot[:, k], n_bins)
        per_class.append(np.abs(prob - outcome).sum() / len(p))
    return float(np.mean(per_class))


def brier_score(probs: np.ndarray, labels: np.ndarray, task: TaskType | str) -> float:
    """Mean squared error of the probabilities, as ``sklearn.metrics.brier_score_loss``: binary,
    the positive column against 0/1; multi-class, ``sum_k (p_k - 1[y = k])^2`` per example;
    multi-label, the mean over labels (= over all entries) of the binary score."""
    p, y, task = _probabilities(probs, labels, task)
    if task is TaskType.BINARY:
        return float(((p[:, 1] - y) ** 2).mean())
    if task.single_label:
        return float(((p - np.eye(p.shape[1])[y]) ** 2).sum(axis=1).mean())
    return float(((p - y) ** 2).mean())


def calibration_metrics(
    probs: np.ndarray, labels: np.ndarray, task: TaskType | str, *, n_bins: int = 15
) -> dict[str, float]:
    """``ece``, ``classwise_ece`` and ``brier`` of ``probs``, for records and reports."""
    return {
        "ece": expected_calibration_error(probs, labels, task, n_bins=n_bins),
        "classwise_ece": classwise_ece(probs, labels, task, n_bins=n_bins),
        "brier": brier_score(probs, labels, task),
    }


def plot_reliability(
    path: str | Path,
    labels: np.ndarray,
    panels: Mapping[str, np.ndarray],
    task: TaskType | str,
    *,
    n_bins: int = 15,
    title: str = "",
) -> Path:
    """A PNG with one column per entry of ``panels`` (title -> probabilities of the same
    examples, e.g. ``{"before": p, "after (T = 1.8)": q}``): accuracy per confidence bin with its
    gap to the diagonal and the ECE above, and the histogram of confidences below."""
    from matplotlib.figure import Figure

    if not panels:
        raise ConfigError("plot_reliability needs at least one panel of probabilities")
    multilabel = TaskType(task) is TaskType.MULTILABEL
    fig = Figure(figsize=(3.6 * len(panels), 6.4), layout="constrained")
    axes = fig.subplots(2, len(panels), squeeze=False, height_ratios=(2, 1), sharex=True)
    for col, (name, probs) in enumerate(panels.items()):
        bins = reliability_bins(probs, labels, task, n_bins=n_bins)
        ece = expected_calibration_error(probs, labels, task, n_bins=n_bins)
        top, bottom = axes[0, col], axes[1, col]
        lo, width = bins.edges[:-1], np.diff(bins.edges)
        filled = bins.count > 0
        acc, conf = bins.accuracy[filled], bins.confidence[filled]
        top.bar(lo[filled], acc, width[filled], align="edge", color="tab:blue", label="accuracy")
        top.bar(
            lo[filled] + width[filled] / 2,
            conf - acc,
            0.4 * width[filled],
            bottom=acc,
            color="tab:red",
            alpha=0.6,
            label="gap to mean confidence",
        )
        top.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        top.set(xlim=(0, 1), ylim=(0, 1), title=f"{name}\nECE {ece:.4f}")
        top.set_ylabel("fraction positive" if multilabel else "accuracy")
        top.legend(fontsize=7, loc="upper left")
        share = bins.count / bins.count.sum()
        bottom.bar(lo, share, width, align="edge", color="tab:grey")
        bottom.set_xlabel("predicted probability (every label)" if multilabel else "confidence")
        bottom.set_ylabel("share of predictions")
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
