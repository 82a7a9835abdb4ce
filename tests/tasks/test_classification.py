from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from clinadapt.data.info import CLASSIFICATION_TASKS, TaskType
from clinadapt.engine.train_config import SELECT_METRICS
from clinadapt.errors import ConfigError, DataError
from clinadapt.eval.metrics import bootstrap_ci, evaluate
from clinadapt.tasks import TASKS, ClassificationTask, task_for
from clinadapt.tasks.classification_losses import MultiLabelLoss, SingleLabelLoss

TASK = TASKS.get("classification")


def _random(task: TaskType, n: int = 40, c: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    if task is TaskType.MULTILABEL:
        return (rng.random((n, c)) < 0.4).astype(np.int64), rng.random((n, c))
    c = 2 if task is TaskType.BINARY else c
    return rng.integers(0, c, size=(n, 1)), rng.dirichlet(np.ones(c), size=n)


def test_the_registry_lists_classification():
    assert "classification" in TASKS.names()
    assert isinstance(TASK, ClassificationTask) and TASK.name == "classification"


@pytest.mark.parametrize("task_type", CLASSIFICATION_TASKS)
def test_every_classification_type_maps_to_the_classification_task(task_type):
    assert task_for(task_type) is TASK
    assert task_for(task_type.value) is TASK


def test_unknown_task_types_are_clear_errors():
    with pytest.raises(ConfigError, match="'regression'.*binary"):
        task_for("regression")
    assert task_for(TaskType.SEGMENTATION).name == "segmentation"


def test_training_selects_by_the_task_s_metrics():
    assert set(TASK.select_metrics) <= set(SELECT_METRICS)
    assert TASK.report_metrics == ("auc", "acc", "balanced_accuracy")
    assert set(TASK.report_metrics) <= set(TASK.printed_metrics)


@pytest.mark.parametrize("task_type", CLASSIFICATION_TASKS)
def test_evaluate_and_bootstrap_are_the_eval_metrics(task_type):
    labels, scores = _random(task_type)
    assert TASK.evaluate(labels, scores, task_type) == evaluate(labels, scores, task_type)
    expected = bootstrap_ci(labels, scores, task_type, n_resamples=30, seed=3)
    assert TASK.bootstrap(labels, scores, task_type, n_resamples=30, seed=3) == expected


def test_check_targets_returns_the_stored_format_and_names_the_source():
    stored = TASK.check_targets(np.array([0, 2, 1]), TaskType.MULTICLASS, 3, "x.npz")
    assert stored.dtype == np.int64 and stored.shape == (3, 1)
    with pytest.raises(DataError, match="x.npz"):
        TASK.check_targets(np.array([0, 3]), TaskType.MULTICLASS, 3, "x.npz")


def test_head_is_a_fresh_linear_layer_on_the_pooled_features():
    backbone = SimpleNamespace(feature_dim=8)
    head = TASK.head(backbone, 3, "linear")
    assert isinstance(head, nn.Linear) and (head.in_features, head.out_features) == (8, 3)
    with pytest.raises(ConfigError, match="decoder.*linear head only"):
        TASK.head(backbone, 3, "decoder")


def test_validation_metrics_add_the_loss_to_the_evaluation():
    labels = np.array([[0], [1], [1], [0]])
    scores = np.array([[0.8, 0.2], [0.4, 0.6], [0.3, 0.7], [0.6, 0.4]])
    metrics = TASK.validation_metrics(scores, labels, TaskType.BINARY)
    assert metrics["auc"] == evaluate(labels, scores, TaskType.BINARY)["auc"]
    assert metrics["loss"] == TASK.validation_loss(labels, scores, TaskType.BINARY)
    logits = torch.randn(4, 2)
    part = TASK.validation_part(logits, torch.zeros(4, 1), TaskType.BINARY)
    torch.testing.assert_close(part, logits.softmax(dim=1))


def test_scores_are_softmax_or_per_label_sigmoid():
    logits = torch.randn(5, 3)
    single = TASK.scores(logits, TaskType.MULTICLASS)
    torch.testing.assert_close(single.sum(dim=1), torch.ones(5))
    torch.testing.assert_close(TASK.scores(logits, TaskType.MULTILABEL), logits.sigmoid())


def test_validation_loss_is_the_negative_log_likelihood():
    labels = np.array([[0], [1]])
    scores = np.array([[0.8, 0.2], [0.4, 0.6]])
    expected = -(np.log(0.8) + np.log(0.6)) / 2
    assert TASK.validation_loss(labels, scores, TaskType.BINARY) == pytest.approx(expected)
    multi = np.array([[1, 0]])
    expected = -(np.log(0.9) + np.log(0.7)) / 2
    loss = TASK.validation_loss(multi, np.array([[0.9, 0.3]]), TaskType.MULTILABEL)
    assert loss == pytest.approx(expected)


def test_class_weights_balance_single_label_classes():
    labels = np.array([[0], [0], [0], [1]])
    loss = TASK.criterion(TaskType.BINARY, 2, labels, class_weights=True, label_smoothing=0.0)
    assert isinstance(loss, SingleLabelLoss)
    torch.testing.assert_close(loss.loss.weight, torch.tensor([4 / 6, 4 / 2]))
    logits = torch.randn(4, 2)
    plain = TASK.criterion(TaskType.BINARY, 2, labels, class_weights=False, label_smoothing=0.0)
    expected = nn.functional.cross_entropy(logits, torch.tensor([0, 0, 0, 1]))
    torch.testing.assert_close(plain(logits, torch.from_numpy(labels)), expected)


def test_multi_label_criterion_weights_positives_and_smooths_towards_a_half():
    labels = np.array([[1, 0], [0, 0], [0, 1], [0, 1]])
    loss = TASK.criterion(TaskType.MULTILABEL, 2, labels, class_weights=True, label_smoothing=0.2)
    assert isinstance(loss, MultiLabelLoss)
    torch.testing.assert_close(loss.pos_weight, torch.tensor([3.0, 1.0]))
    logits = torch.randn(4, 2)
    targets = torch.from_numpy(labels).float() * 0.8 + 0.1
    expected = nn.functional.binary_cross_entropy_with_logits(
        logits, targets, pos_weight=torch.tensor([3.0, 1.0])
    )
    torch.testing.assert_close(loss(logits, torch.from_numpy(labels)), expected)
