"""Classification: binary, multi-class, multi-label and ordinal labels, one row per image."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from clinadapt.data.checks import check_labels
from clinadapt.data.info import TaskType
from clinadapt.errors import ConfigError
from clinadapt.eval.metrics import bootstrap_ci, evaluate
from clinadapt.tasks.base import TASKS, Task
from clinadapt.tasks.classification_losses import build_criterion

if TYPE_CHECKING:
    from clinadapt.backbones.base import Backbone


class ClassificationTask(Task):
    """A linear head on pooled features; probabilities scored by ``clinadapt.eval.metrics``."""

    name: ClassVar[str] = "classification"
    report_metrics: ClassVar[tuple[str, ...]] = ("auc", "acc", "balanced_accuracy")
    printed_metrics: ClassVar[tuple[str, ...]] = (
        "auc",
        "acc",
        "balanced_accuracy",
        "macro_f1",
        "ece",
    )
    select_metrics: ClassVar[tuple[str, ...]] = ("auc", "acc", "balanced_accuracy", "loss")
    default_resize: ClassVar[str] = "nearest"
    head_kinds: ClassVar[tuple[str, ...]] = ("linear",)

    def check_targets(
        self, labels: np.ndarray, task_type: TaskType, num_classes: int, where: str
    ) -> np.ndarray:
        return check_labels(labels, task_type, num_classes, where)

    def head(self, backbone: Backbone, num_classes: int, kind: str) -> nn.Module:
        if kind != "linear":
            raise ConfigError(f"head={kind!r}: classification has a linear head only")
        return nn.Linear(backbone.feature_dim, num_classes)

    def forward(self, backbone: Backbone, head: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return head(backbone.embed(images))

    def validation_part(
        self, logits: torch.Tensor, targets: torch.Tensor, task_type: TaskType
    ) -> torch.Tensor:
        return self.scores(logits, task_type)

    def validation_metrics(
        self, parts: np.ndarray, labels: Any, task_type: TaskType
    ) -> dict[str, Any]:
        metrics = self.evaluate(labels, parts, task_type)
        metrics["loss"] = self.validation_loss(labels, parts, task_type)
        return metrics

    def criterion(
        self,
        task_type: TaskType,
        num_classes: int,
        labels: np.ndarray,
        *,
        class_weights: bool,
        label_smoothing: float,
    ) -> nn.Module:
        return build_criterion(
            task_type,
            num_classes,
            labels,
            class_weights=class_weights,
            label_smoothing=label_smoothing,
        )

    def scores(self, logits: torch.Tensor, task_type: TaskType) -> torch.Tensor:
        """Softmax over classes, or per-label sigmoid for multi-label tasks."""
        logits = logits.float()
        return logits.softmax(dim=1) if task_type.single_label else logits.sigmoid()

    def validation_loss(self, labels: np.ndarray, scores: np.ndarray, task_type: TaskType) -> float:
        """Negative log-likelihood of the probabilities, unweighted and unsmoothed."""
        p = np.clip(scores.astype(np.float64), 1e-12, 1 - 1e-12)
        if task_type.single_label:
            return float(-np.log(p[np.arange(len(p)), labels[:, 0]]).mean())
        return float(-(labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean())

    def evaluate(
        self, labels: np.ndarray, scores: np.ndarray, task_type: TaskType
    ) -> dict[str, Any]:
        return evaluate(labels, scores, task_type)

    def bootstrap(
        self,
        labels: np.ndarray,
        scores: np.ndarray,
        task_type: TaskType,
        n_resamples: int,
        seed: int,
    ) -> dict[str, list[float]]:
        return bootstrap_ci(
            labels,
            scores,
            task_type,
            metrics=self.report_metrics,
            n_resamples=n_resamples,
            seed=seed,
        )


TASKS.register("classification", ClassificationTask())
