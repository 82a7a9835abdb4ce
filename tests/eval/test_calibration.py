"""Temperature scaling, ECE, classwise ECE, Brier score and reliability diagrams, against naive
references: scipy's scalar minimiser of a loop NLL, hand-written binning loops, scikit-learn."""

import numpy as np
import pytest
from matplotlib.image import imread
from scipy.optimize import minimize_scalar
from sklearn.metrics import brier_score_loss

from clinadapt.data.info import CLASSIFICATION_TASKS, TaskType
from clinadapt.errors import ConfigError, DataError
from clinadapt.eval import evaluate
from clinadapt.eval.calibration import (
    TEMPERATURE_BOUNDS,
    apply_temperature,
    brier_score,
    calibration_metrics,
    classwise_ece,
    expected_calibration_error,
    fit_temperature,
    logits_from_probabilities,
    plot_reliability,
    reliability_bins,
)

SIZES = {TaskType.BINARY: 2, TaskType.MULTICLASS: 5, TaskType.ORDINAL: 4, TaskType.MULTILABEL: 3}


def overconfident(task: TaskType, n: int = 400, scale: float = 3.0, seed: int = 0):
    """Labels drawn from softmax(z) (sigmoid(z)), and logits ``scale * z``: a model whose ideal
    temperature is near ``scale``."""
    rng = np.random.default_rng(seed)
    c = SIZES[task]
    z = rng.normal(0.0, 1.5, size=(n, c))
    if task is TaskType.MULTILABEL:
        labels = (rng.random((n, c)) < 1 / (1 + np.exp(-z))).astype(np.int64)
    else:
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        labels = np.array([[rng.choice(c, p=row)] for row in p])
    return scale * z, labels


def loop_nll(logits, labels, task, temperature):
    """Mean NLL, one example (label) at a time."""
    total, count = 0.0, 0
    for row, y in zip(logits / temperature, labels, strict=True):
        if task is TaskType.MULTILABEL:
            for zk, yk in zip(row, y, strict=True):
                p = 1 / (1 + np.exp(-zk))
                total -= np.log(p if yk else 1 - p)
                count += 1
        else:
            total -= row[y[0]] - np.log(np.exp(row - row.max()).sum()) - row.max()
            count += 1
    return total / count


def loop_ece(probs, labels, task, n_bins):
    """Guo et al.'s ECE written out: bins (lo, hi], 0 in the first; the edges are numpy's
    ``linspace`` (0.3 is not ``3 / 10`` there, which matters for tied scores)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    if task is TaskType.MULTILABEL:
        conf, correct = probs.ravel(), labels.ravel().astype(float)
    else:
        conf = probs.max(axis=1)
        correct = (probs.argmax(axis=1) == labels[:, 0]).astype(float)
    ece = 0.0
    for b in range(n_bins):
        lo, hi = edges[b], edges[b + 1]
        inside = [(c > lo or b == 0) and c <= hi for c in conf]
        members = [i for i, yes in enumerate(inside) if yes]
        if members:
            gap = abs(np.mean(conf[members]) - np.mean(correct[members]))
            ece += len(members) / len(conf) * gap
    return ece


@pytest.mark.parametrize("task", CLASSIFICATION_TASKS)
def test_fitted_temperature_is_scipys_minimum_of_the_nll(task):
    logits, labels = overconfident(task)
    fit = fit_temperature(logits, labels, task)
    ref = minimize_scalar(
        lambda log_t: loop_nll(logits, labels, task, np.exp(log_t)),
        bounds=np.log(TEMPERATURE_BOUNDS),
        method="bounded",
        options={"xatol": 1e-9},
    )
    assert fit.temperature == pytest.approx(np.exp(ref.x), rel=1e-5)
    assert fit.nll_after == pytest.approx(ref.fun, rel=1e-9)
    assert fit.nll_before == pytest.approx(loop_nll(logits, labels, task, 1.0), rel=1e-12)
    assert 2.0 < fit.temperature < 4.5  # the logits were made 3x too confident
    assert fit.nll_after < fit.nll_before


def test_underconfident_logits_get_a_temperature_below_one():
    logits, labels = overconfident(TaskType.MULTICLASS, scale=0.3)
    assert fit_temperature(logits, labels, "multi-class").temperature < 0.5


def test_separable_validation_logits_get_a_small_finite_temperature():
    labels = np.array([[0], [1], [1], [0]])
    logits = np.array([[2.0, -2.0], [-1.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    fit = fit_temperature(logits, labels, "binary")
    assert TEMPERATURE_BOUNDS[0] <= fit.temperature < 0.1
    assert fit.nll_after < 1e-6


@pytest.mark.parametrize("task", CLASSIFICATION_TASKS)
def test_scaling_keeps_predictions_and_reduces_ece(task):
    logits, labels = overconfident(task, n=2000, seed=1)
    fit = fit_temperature(logits, labels, task)
    before = apply_temperature(logits, 1.0, task)
    after = apply_temperature(logits, fit.temperature, task)
    if task.single_label:
        np.testing.assert_array_equal(before.argmax(axis=1), after.argmax(axis=1))
    else:
        np.testing.assert_array_equal(before > 0.5, after > 0.5)
    ece_before = expected_calibration_error(before, labels, task)
    assert expected_calibration_error(after, labels, task) < 0.5 * ece_before


def test_apply_temperature_is_softmax_and_sigmoid_of_scaled_logits():
    z = np.array([[1.0, 2.0, -1.0]])
    expected = np.exp(z / 2) / np.exp(z / 2).sum()
    np.testing.assert_allclose(apply_temperature(z, 2.0, "multi-class"), expected, rtol=1e-12)
    sigmoid = 1 / (1 + np.exp(-z / 2))
    np.testing.assert_allclose(apply_temperature(z, 2.0, "multi-label"), sigmoid, rtol=1e-12)


@pytest.mark.parametrize("task", [TaskType.MULTICLASS, TaskType.MULTILABEL])
def test_logits_recovered_from_probabilities_scale_like_the_logits(task):
    logits, labels = overconfident(task, n=50)
    probs = apply_temperature(logits, 1.0, task)
    recovered = logits_from_probabilities(probs, task)
    np.testing.assert_allclose(
        apply_temperature(recovered, 2.5, task), apply_temperature(logits, 2.5, task), atol=1e-10
    )
    fit, refit = fit_temperature(logits, labels, task), fit_temperature(recovered, labels, task)
    assert refit.temperature == pytest.approx(fit.temperature, rel=1e-6)


@pytest.mark.parametrize("task", CLASSIFICATION_TASKS)
@pytest.mark.parametrize(("seed", "ties", "n_bins"), [(0, False, 15), (1, True, 10), (2, False, 1)])
def test_ece_agrees_with_evaluate_and_a_loop(task, seed, ties, n_bins, predictions):
    labels, probs = predictions(task, 300, seed, ties)
    if task.single_label and ties:  # rounded rows no longer sum to 1
        probs = probs / probs.sum(axis=1, keepdims=True)
    ece = expected_calibration_error(probs, labels, task, n_bins=n_bins)
    assert ece == pytest.approx(evaluate(labels, probs, task, n_bins=n_bins)["ece"], abs=1e-12)
    assert ece == pytest.approx(loop_ece(probs, labels, task, n_bins), abs=1e-12)


def test_confidences_on_a_bin_edge_fall_in_the_lower_bin():
    probs = np.array([[0.0, 1.0], [0.5, 0.5], [0.25, 0.75]])
    labels = np.array([[1], [1], [0]])
    bins = reliability_bins(probs, labels, "binary", n_bins=4)
    # 0.5 falls in (0.25, 0.5], 0.75 in (0.5, 0.75]
    np.testing.assert_array_equal(bins.count, [0, 1, 1, 1])
    assert np.isnan(bins.accuracy[0]) and np.isnan(bins.confidence[0])
    np.testing.assert_array_equal(bins.confidence[1:], [0.5, 0.75, 1.0])
    np.testing.assert_array_equal(bins.accuracy[1:], [0.0, 0.0, 1.0])  # a tie predicts class 0


@pytest.mark.parametrize("task", CLASSIFICATION_TASKS)
def test_classwise_ece_agrees_with_a_loop(task, predictions, num_classes):
    labels, probs = predictions(task, 250, 4)
    c = num_classes[task]
    onehot = labels if task is TaskType.MULTILABEL else np.eye(c)[labels[:, 0]]
    per_class = []
    for k in range(c):
        total = 0.0
        for b in range(15):
            lo, hi = b / 15, (b + 1) / 15
            inside = ((probs[:, k] > lo) | (b == 0)) & (probs[:, k] <= hi)
            if inside.any():
                gap = abs(probs[inside, k].mean() - onehot[inside, k].mean())
                total += inside.sum() / len(probs) * gap
        per_class.append(total)
    assert classwise_ece(probs, labels, task) == pytest.approx(np.mean(per_class), abs=1e-12)


def test_classwise_ece_sees_a_rare_class_that_top_label_ece_misses():
    # class 2 is predicted with 0.3 but never occurs; the top-label ECE ignores it
    probs = np.tile([0.7, 0.0, 0.3], (10, 1))
    labels = np.array([[0]] * 7 + [[1]] * 3)
    assert expected_calibration_error(probs, labels, "multi-class") == pytest.approx(0.0)
    assert classwise_ece(probs, labels, "multi-class") == pytest.approx((0 + 0.3 + 0.3) / 3)


@pytest.mark.parametrize("task", CLASSIFICATION_TASKS)
def test_brier_score_agrees_with_sklearn(task, predictions, num_classes):
    labels, probs = predictions(task, 200, 5)
    c = num_classes[task]
    if task is TaskType.BINARY:
        expected = brier_score_loss(labels[:, 0], probs[:, 1])
    elif task.single_label:
        expected = brier_score_loss(labels[:, 0], probs, labels=list(range(c)))
    else:
        expected = np.mean([brier_score_loss(labels[:, k], probs[:, k]) for k in range(c)])
    assert brier_score(probs, labels, task) == pytest.approx(expected, abs=1e-12)


def test_calibration_metrics_collects_the_three():
    logits, labels = overconfident(TaskType.MULTICLASS, n=100)
    probs = apply_temperature(logits, 1.0, "multi-class")
    assert calibration_metrics(probs, labels, "multi-class") == {
        "ece": expected_calibration_error(probs, labels, "multi-class"),
        "classwise_ece": classwise_ece(probs, labels, "multi-class"),
        "brier": brier_score(probs, labels, "multi-class"),
    }


def test_bad_input_is_refused_with_what_to_do():
    labels = np.array([[0], [1]])
    with pytest.raises(DataError, match="not logits"):
        expected_calibration_error(np.array([[3.0, -1.0], [0.2, 0.1]]), labels, "binary")
    with pytest.raises(DataError, match="NaN"):
        fit_temperature(np.array([[np.nan, 1.0], [0.0, 1.0]]), labels, "binary")
    with pytest.raises(DataError, match="rows"):
        fit_temperature(np.zeros((3, 2)), labels, "binary")
    with pytest.raises(DataError, match="binary task has 2 classes"):
        brier_score(np.full((2, 3), 1 / 3), labels, "binary")
    with pytest.raises(ConfigError, match="temperature"):
        apply_temperature(np.zeros((2, 2)), 0.0, "binary")
    with pytest.raises(ConfigError, match="n_bins"):
        classwise_ece(np.full((2, 2), 0.5), labels, "binary", n_bins=0)
    with pytest.raises(ConfigError, match="panel"):
        plot_reliability("unused.png", labels, {}, "binary")


@pytest.mark.parametrize("task", [TaskType.MULTICLASS, TaskType.MULTILABEL])
def test_reliability_diagram_is_a_png_with_a_column_per_panel(task, tmp_path):
    logits, labels = overconfident(task, n=300)
    fit = fit_temperature(logits, labels, task)
    panels = {
        "before": apply_temperature(logits, 1.0, task),
        f"after (T = {fit.temperature:.2f})": apply_temperature(logits, fit.temperature, task),
    }
    path = plot_reliability(tmp_path / "rel.png", labels, panels, task, title="synthetic")
    assert path == tmp_path / "rel.png"
    image = imread(path)
    one = imread(plot_reliability(tmp_path / "one.png", labels, {"before": panels["before"]}, task))
    assert image.shape[0] == one.shape[0] and image.shape[1] > 1.8 * one.shape[1]
    assert image[..., :3].std() > 0.05  # something is drawn
