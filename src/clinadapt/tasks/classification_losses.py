"""Training losses: cross-entropy for single-label tasks, BCE-with-logits for multi-label ones,
optionally class-weighted (the usual fix for imbalanced medical datasets) and label-smoothed."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clinadapt.data.checks import class_frequencies
from clinadapt.data.info import TaskType


class MultiLabelLoss(nn.Module):
    """BCE-with-logits; smoothing pulls targets towards 0.5 by ``smoothing / 2``."""

    def __init__(self, pos_weight: torch.Tensor | None, smoothing: float) -> None:
        super().__init__()
        self.register_buffer("pos_weight", pos_weight)
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        y = targets.float() * (1 - self.smoothing) + self.smoothing / 2
        return F.binary_cross_entropy_with_logits(logits, y, pos_weight=self.pos_weight)


class SingleLabelLoss(nn.Module):
    """Cross-entropy on (B, 1) class-index targets."""

    def __init__(self, weight: torch.Tensor | None, smoothing: float) -> None:
        super().__init__()
        self.loss = nn.CrossEntropyLoss(weight=weight, label_smoothing=smoothing)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, targets[:, 0].long())


def build_criterion(
    task: TaskType,
    num_classes: int,
    labels: np.ndarray,
    *,
    class_weights: bool,
    label_smoothing: float,
) -> nn.Module:
    """The training loss; with ``class_weights``, classes weighted by ``N / (K * count)``
    (scikit-learn's "balanced") and labels by ``negatives / positives`` (BCE ``pos_weight``)."""
    freq = class_frequencies(labels, task, num_classes)
    if task.single_label:
        weight = None
        if class_weights:
            balanced = np.where(freq > 0, len(labels) / (num_classes * np.maximum(freq, 1)), 0.0)
            weight = torch.tensor(balanced, dtype=torch.float32)
        return SingleLabelLoss(weight, label_smoothing)
    pos_weight = None
    if class_weights:
        ratio = np.where(freq > 0, (len(labels) - freq) / np.maximum(freq, 1), 1.0)
        pos_weight = torch.tensor(ratio, dtype=torch.float32)
    return MultiLabelLoss(pos_weight, label_smoothing)
