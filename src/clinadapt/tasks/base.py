"""The interface every task implements, and the registry of task instances."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from clinadapt.data.info import CLASSIFICATION_TASKS, TaskType
from clinadapt.errors import ConfigError
from clinadapt.registry import Registry

if TYPE_CHECKING:
    from clinadapt.backbones.base import Backbone

TASKS: Registry[Task] = Registry("task", listing="clinadapt datasets")
"""Task instances by name; ``clinadapt datasets`` shows the task type of each dataset."""


class Task(ABC):
    """One kind of prediction, for all label types it covers (passed as ``task_type``).

    Targets are what ``check_targets`` returns: a (N, ...) array per split, a class-index row
    or label vector per example for classification, a mask per case for dense tasks. Metrics are
    computed on scores as ``scores`` returns them; ``evaluate`` returns a dict of named metrics
    (scalars, and for tasks scored per case, whatever per-case detail the task keeps).
    """

    name: ClassVar[str]
    report_metrics: ClassVar[tuple[str, ...]]
    """The report's metric columns, in order."""
    printed_metrics: ClassVar[tuple[str, ...]]
    """What ``clinadapt run`` prints for a finished run, and a training history's validation
    columns (those that validation computes)."""
    select_metrics: ClassVar[tuple[str, ...]]
    """Validation metrics a training run may choose its best epoch by."""

    @abstractmethod
    def check_targets(
        self, labels: np.ndarray, task_type: TaskType, num_classes: int, where: str
    ) -> np.ndarray:
        """``labels`` in the stored format, or a ``DataError`` naming ``where``."""

    dense_targets: ClassVar[bool] = False
    """Targets are maps aligned with the image (geometric augmentation transforms them too)."""
    default_resize: ClassVar[str]
    """How inputs reach the network size when a run says ``resize=auto``."""
    train_defaults: ClassVar[dict[str, Any]] = {}
    """Training options this task sets unless the run gives them (e.g. the selection metric)."""
    head_kinds: ClassVar[tuple[str, ...]]
    """The output layers ``head`` builds; the first is the default."""

    @abstractmethod
    def head(self, backbone: Backbone, num_classes: int, kind: str) -> nn.Module:
        """A new, trainable output layer of ``kind`` on top of ``backbone``'s features."""

    @abstractmethod
    def forward(self, backbone: Backbone, head: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """The logits of ``head`` on ``backbone``'s features of a preprocessed batch."""

    @abstractmethod
    def validation_part(
        self, logits: torch.Tensor, targets: torch.Tensor, task_type: TaskType
    ) -> torch.Tensor:
        """What validation keeps of one batch: one row per example, gathered across processes."""

    @abstractmethod
    def validation_metrics(
        self, parts: np.ndarray, labels: Any, task_type: TaskType
    ) -> dict[str, Any]:
        """Validation metrics, ``loss`` included, from the rows of every validation example in
        order; ``labels`` are the split's checked targets."""

    @abstractmethod
    def criterion(
        self,
        task_type: TaskType,
        num_classes: int,
        labels: np.ndarray,
        *,
        class_weights: bool,
        label_smoothing: float,
    ) -> nn.Module:
        """The training loss ``(logits, targets) -> scalar``, fitted to the training labels."""

    @abstractmethod
    def scores(self, logits: torch.Tensor, task_type: TaskType) -> torch.Tensor:
        """What the metrics score, from the model's logits."""

    @abstractmethod
    def evaluate(
        self, labels: np.ndarray, scores: np.ndarray, task_type: TaskType
    ) -> dict[str, Any]:
        """The test (or validation) metrics of ``scores``."""

    @abstractmethod
    def bootstrap(
        self,
        labels: np.ndarray,
        scores: np.ndarray,
        task_type: TaskType,
        n_resamples: int,
        seed: int,
    ) -> dict[str, list[float]]:
        """Percentile-bootstrap 95% intervals of the report metrics."""


def task_for(task_type: TaskType | str) -> Task:
    """The registered task that handles datasets of ``task_type``."""
    try:
        task_type = TaskType(task_type)
    except ValueError:
        choices = ", ".join(t.value for t in TaskType)
        raise ConfigError(f"unknown task type {task_type!r}; choose one of {choices}") from None
    return TASKS.get("classification" if task_type in CLASSIFICATION_TASKS else task_type.value)
