import json
import math
import warnings

import numpy as np
import pytest
from medmnist.evaluator import getACC, getAUC
from sklearn import metrics as skm

from clinadapt.data.info import CLASSIFICATION_TASKS, TaskType
from clinadapt.errors import DataError
from clinadapt.eval import auc, evaluate
from clinadapt.eval.metrics import UndefinedMetricWarning

MEDMNIST_TASK = {
    TaskType.BINARY: "binary-class",
    TaskType.MULTICLASS: "multi-class",
    TaskType.ORDINAL: "ordinal-regression",
    TaskType.MULTILABEL: "multi-label, binary-class",
}


@pytest.mark.parametrize("task", CLASSIFICATION_TASKS)
@pytest.mark.parametrize(("seed", "ties"), [(0, False), (1, False), (2, True)])
def test_auc_and_acc_agree_with_medmnist_evaluator(task, seed, ties, predictions):
    labels, scores = predictions(task, 300, seed, ties)
    result = evaluate(labels, scores, task)
    assert result["auc"] == pytest.approx(getAUC(labels, scores, MEDMNIST_TASK[task]), abs=1e-12)
    assert result["acc"] == pytest.approx(getACC(labels, scores, MEDMNIST_TASK[task]), abs=1e-12)
    assert result["n"] == 300


def _predicted(labels, scores, task):
    if task is TaskType.BINARY:
        return labels[:, 0], (scores[:, 1] > 0.5).astype(int)
    if task.single_label:
        return labels[:, 0], scores.argmax(axis=1)
    return labels, (scores > 0.5).astype(int)


@pytest.mark.parametrize("task", [TaskType.BINARY, TaskType.MULTICLASS, TaskType.ORDINAL])
def test_single_label_metrics_agree_with_sklearn(task, predictions, num_classes):
    labels, scores = predictions(task, 200, 3)
    y, pred = _predicted(labels, scores, task)
    c = num_classes[task]
    result = evaluate(labels, scores, task)
    assert result["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert result["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    expected_recall = skm.recall_score(y, pred, average=None, labels=range(c))
    np.testing.assert_allclose(result["per_class_recall"], expected_recall)
    expected_cm = skm.confusion_matrix(y, pred, labels=range(c))
    assert result["confusion_matrix"] == expected_cm.tolist()


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_single_label_metrics_with_a_class_absent_follow_sklearn():
    labels = np.array([[0], [0], [1], [1], [2]])
    scores = np.eye(4)[[0, 1, 1, 3, 2]]  # class 3 is predicted once but never true
    result = evaluate(labels, scores, "multi-class")
    y, pred = labels[:, 0], scores.argmax(1)
    assert result["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert result["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert math.isnan(result["per_class_recall"][3])
    assert math.isnan(result["auc"])  # class 3 has no positives: MedMNIST's AUC would raise


@pytest.mark.filterwarnings("ignore:A single label was found")
def test_multi_label_metrics_agree_with_sklearn(predictions):
    labels, scores = predictions(TaskType.MULTILABEL, 200, 4)
    labels[:, 2] = 0
    scores[:, 2] = 0.1  # a label that is never true nor predicted: F1 undefined, left out
    _, pred = _predicted(labels, scores, TaskType.MULTILABEL)
    result = evaluate(labels, scores, TaskType.MULTILABEL)
    per_label_bacc = [skm.balanced_accuracy_score(labels[:, k], pred[:, k]) for k in range(6)]
    assert result["balanced_accuracy"] == pytest.approx(np.mean(per_label_bacc))
    f1 = skm.f1_score(labels, pred, average="macro", zero_division=np.nan)
    assert result["macro_f1"] == pytest.approx(f1)
    recall = skm.recall_score(labels, pred, average=None, zero_division=np.nan)
    np.testing.assert_allclose(result["per_class_recall"], recall)
    assert result["confusion_matrix"] == skm.multilabel_confusion_matrix(labels, pred).tolist()
    assert math.isnan(result["auc"])


def _naive_ece(prob, outcome, n_bins):
    edges = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    for b in range(n_bins):
        inside = [
            i
            for i, p in enumerate(prob)
            if edges[b] < p <= edges[b + 1] or (b == 0 and p == edges[0])
        ]
        if inside:
            gap = abs(np.mean([prob[i] for i in inside]) - np.mean([outcome[i] for i in inside]))
            total += len(inside) / len(prob) * gap
    return total


@pytest.mark.parametrize("task", CLASSIFICATION_TASKS)
@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_ece_matches_a_naive_loop(task, n_bins, predictions):
    labels, scores = predictions(task, 150, 5)
    scores[:3] = np.round(scores[:3], 1)  # values on bin edges
    scores[:3] /= scores[:3].sum(axis=1, keepdims=True) if task.single_label else 1
    if task.single_label:
        prob = scores.max(axis=1)
        outcome = (scores.argmax(axis=1) == labels[:, 0]).astype(float)
    else:
        scores[0, 0] = 0.0
        prob, outcome = scores.ravel(), labels.ravel().astype(float)
    result = evaluate(labels, scores, task, n_bins=n_bins)
    assert result["ece"] == pytest.approx(_naive_ece(prob, outcome, n_bins), abs=1e-12)


def test_ece_is_nan_when_scores_are_not_probabilities(predictions):
    labels, scores = predictions(TaskType.MULTICLASS, 50, 6)
    result = evaluate(labels, np.log(scores), TaskType.MULTICLASS)
    assert math.isnan(result["ece"]) and not math.isnan(result["auc"])


def test_perfect_and_threshold():
    labels = np.array([[0], [1], [1], [0]])
    scores = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.6, 0.4]])
    result = evaluate(labels, scores, "binary")
    assert result["auc"] == 1.0 and result["acc"] == 1.0 and result["macro_f1"] == 1.0
    assert evaluate(labels, scores, "binary", threshold=0.65)["acc"] == 0.75


@pytest.mark.parametrize("task", CLASSIFICATION_TASKS)
@pytest.mark.parametrize(("seed", "ties"), [(0, False), (2, True)])
def test_auc_alone_equals_evaluate_s_and_is_nan_silently_when_undefined(
    task, seed, ties, predictions
):
    labels, scores = predictions(task, 50, seed, ties)
    assert auc(labels, scores, task) == evaluate(labels, scores, task)["auc"]
    one_class = np.zeros_like(labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(auc(one_class, scores, task))


def test_single_class_present_gives_nan_auc_without_crashing():
    labels = np.zeros((20, 1), dtype=np.int64)
    scores = np.random.default_rng(0).dirichlet([1, 1], 20)
    result = evaluate(labels, scores, TaskType.BINARY)
    assert math.isnan(result["auc"])
    assert 0 <= result["acc"] <= 1 and result["balanced_accuracy"] == result["acc"]


@pytest.mark.parametrize(
    ("labels", "scores", "task", "match"),
    [
        (np.zeros((3, 1)), np.full((4, 2), 0.5), "binary", "rows"),
        (np.zeros((3, 1)), np.array([[0.5, np.nan]] * 3), "binary", "NaN"),
        (np.zeros((3, 1)), np.full(3, 0.5), "binary", "2-D|\\(N, C\\)"),
        (np.zeros((3, 1)), np.full((3, 3), 0.3), "binary", "2 classes"),
        (np.full((3, 1), 3), np.full((3, 3), 0.3), "multi-class", "outside"),
        (np.zeros((3, 2)), np.full((3, 3), 0.3), "multi-label", r"\(N, 3\)"),
        (np.full((3, 3), 2), np.full((3, 3), 0.3), "multi-label", "0 or 1"),
    ],
)
def test_invalid_inputs_raise_data_error(labels, scores, task, match):
    with pytest.raises(DataError, match=match):
        evaluate(labels, scores, task)


def test_auc_undefined_for_one_class_warns_and_says_why():
    labels = np.zeros((20, 1), dtype=np.int64)
    scores = np.random.default_rng(0).dirichlet([1, 1], 20)
    with pytest.warns(UndefinedMetricWarning, match=r"auc is undefined: only one class"):
        result = evaluate(labels, scores, TaskType.BINARY)
    assert math.isnan(result["auc"])
    assert result["undefined"] == {"auc": "only one class in the labels"}
    assert json.loads(json.dumps(result))["undefined"] == result["undefined"]


def test_auc_undefined_names_the_absent_classes_and_constant_labels(predictions):
    labels = np.array([[0], [0], [1], [1], [2]])
    with pytest.warns(UndefinedMetricWarning, match="class 3"):
        result = evaluate(labels, np.eye(4)[[0, 1, 1, 3, 2]], "multi-class")
    assert result["undefined"] == {"auc": "no examples of class 3 in the labels"}
    labels, scores = predictions(TaskType.MULTILABEL, 50, 1)
    labels[:, 2], labels[:, 4] = 0, 1
    with pytest.warns(UndefinedMetricWarning):
        result = evaluate(labels, scores, TaskType.MULTILABEL)
    assert result["undefined"] == {"auc": "labels 2, 4 take a single value (all 0 or all 1)"}


def test_ece_undefined_for_scores_that_are_not_probabilities(predictions):
    labels, scores = predictions(TaskType.MULTICLASS, 50, 6)
    with pytest.warns(UndefinedMetricWarning, match="ece"):
        result = evaluate(labels, np.log(scores), TaskType.MULTICLASS)
    assert set(result["undefined"]) == {"ece"} and "probabilities" in result["undefined"]["ece"]


@pytest.mark.parametrize("task", CLASSIFICATION_TASKS)
def test_defined_metrics_neither_warn_nor_report_undefined(task, predictions):
    labels, scores = predictions(task, 200, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = evaluate(labels, scores, task)
    assert "undefined" not in result
