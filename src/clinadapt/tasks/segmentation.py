"""Semantic segmentation: a label map per image or volume, 0 = background.

The head reads the backbone's feature maps (``Backbone.dense_levels``: the last, coarse map of
``dense`` and, for CNNs, the finer maps of the earlier stages) and returns logits at the input's
size. The decoder concatenates the finer maps on its way up, as U-Net's skip connections
(Ronneberger et al. 2015) and FPN's lateral ones (Lin et al. 2017) do: they give back the
localisation that the stride-32 map of an ImageNet CNN has lost. Training minimises Dice +
cross-entropy (nnU-Net's loss); validation scores hard Dice at the network's size (cheap enough
for every epoch); the test is scored per case at the case's own size and voxel spacing by
``clinadapt.eval.segmentation`` (Dice, IoU, HD95, NSD).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from clinadapt._optional import require
from clinadapt.data.info import TaskType
from clinadapt.errors import ConfigError, DataError
from clinadapt.eval.segmentation import aggregate, case_metrics
from clinadapt.tasks.base import TASKS, Task

if TYPE_CHECKING:
    from clinadapt.backbones.base import Backbone

NSD_TOLERANCE = 2.0
"""Normalised surface Dice tolerance: mm where the spacing is known, else pixels of the case's
own size (2D photographs and microscopy carry no spacing)."""
SUMMARY_METRICS = ("dice", "iou", "hd95", "nsd")


@dataclass
class CaseTargets:
    """The ground truth of a split as scored: masks at each case's own size, their voxel
    spacing (mm per array axis, None when unknown), case ids, and the number of labels
    (background included)."""

    masks: Sequence[np.ndarray]
    num_classes: int
    spacing: list[tuple[float, ...] | None]
    ids: list[str]

    def __len__(self) -> int:
        return len(self.masks)


class DiceCELoss(nn.Module):
    """Soft Dice over the foreground classes (pooled over the batch, as nnU-Net's batch Dice)
    plus cross-entropy, each weighted 1 (Isensee et al. 2021); MONAI computes both."""

    def __init__(self) -> None:
        super().__init__()
        require("monai", extra=None, needed_by="the segmentation loss")
        from monai.losses import DiceCELoss as MonaiDiceCE

        self.loss = MonaiDiceCE(
            include_background=False, to_onehot_y=True, softmax=True, batch=True
        )

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, targets[:, None])


class SegmentationTask(Task):
    """A head on the backbone's feature maps; label maps scored per case (see module doc)."""

    name: ClassVar[str] = "segmentation"
    report_metrics: ClassVar[tuple[str, ...]] = ("dice", "hd95", "nsd")
    printed_metrics: ClassVar[tuple[str, ...]] = SUMMARY_METRICS
    select_metrics: ClassVar[tuple[str, ...]] = ("dice", "loss")
    dense_targets: ClassVar[bool] = True
    default_resize: ClassVar[str] = "bilinear"
    train_defaults: ClassVar[dict[str, Any]] = {"select_metric": "dice"}
    head_kinds: ClassVar[tuple[str, ...]] = ("decoder", "linear")

    def check_targets(self, labels: Any, task_type: TaskType, num_classes: int, where: str) -> Any:
        """Masks are checked against the declared labels as each case is read."""
        if num_classes < 2:
            raise DataError(f"{where}: segmentation needs background and at least one class")
        return labels

    def head(self, backbone: Backbone, num_classes: int, kind: str) -> nn.Module:
        from clinadapt.tasks.seg_heads import SegmentationHead

        return SegmentationHead(
            backbone.dense_level_dims, num_classes, backbone.dense_level_strides, kind
        )

    def forward(self, backbone: Backbone, head: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return head(backbone.dense_levels(images), tuple(images.shape[2:]))

    def criterion(
        self,
        task_type: TaskType,
        num_classes: int,
        labels: Any,
        *,
        class_weights: bool,
        label_smoothing: float,
    ) -> nn.Module:
        if class_weights or label_smoothing:
            raise ConfigError(
                "class_balance=weights and label_smoothing are classification options; the "
                "segmentation loss (Dice + cross-entropy) already balances foreground: drop them"
            )
        return DiceCELoss()

    def scores(self, logits: torch.Tensor, task_type: TaskType) -> torch.Tensor:
        """Class probabilities per pixel (voxel), (B, K, *spatial)."""
        return logits.float().softmax(dim=1)

    def validation_part(
        self, logits: torch.Tensor, targets: torch.Tensor, task_type: TaskType
    ) -> torch.Tensor:
        """Per case: for each foreground class the hard intersection, predicted and true pixel
        counts, then the mean cross-entropy."""
        logits = logits.float()
        k = logits.shape[1]
        pred = logits.argmax(dim=1)
        rows = []
        dims = tuple(range(1, pred.ndim))
        for c in range(1, k):
            p, t = pred == c, targets == c
            rows += [(p & t).sum(dims), p.sum(dims), t.sum(dims)]
        ce = nn.functional.cross_entropy(logits, targets.long(), reduction="none").mean(dims)
        return torch.stack([*(r.double() for r in rows), ce.double()], dim=1)

    def validation_metrics(
        self, parts: np.ndarray, labels: Any, task_type: TaskType
    ) -> dict[str, Any]:
        """Mean over cases of the mean foreground Dice (1 where a class is absent from both
        prediction and truth); loss = cross-entropy + 1 - Dice."""
        k = (parts.shape[1] - 1) // 3
        inter, pred, true = (parts[:, i : 3 * k : 3] for i in range(3))
        total = pred + true
        dice = np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0).mean(axis=1)
        mean_dice = float(dice.mean())
        return {"dice": mean_dice, "loss": float(parts[:, -1].mean()) + 1.0 - mean_dice}

    def score_cases(
        self, predictions: Sequence[np.ndarray], targets: CaseTargets
    ) -> list[dict[str, Any]]:
        """``case_metrics`` of every predicted label map (at its case's own size), with its id."""
        if len(predictions) != len(targets):
            raise DataError(f"{len(predictions)} predictions for {len(targets)} cases")
        return [
            {
                "id": case_id,
                **case_metrics(
                    np.asarray(pred),
                    np.asarray(targets.masks[i]),
                    targets.num_classes,
                    spacing=targets.spacing[i],
                    nsd_tolerance_mm=NSD_TOLERANCE,
                ),
            }
            for i, (pred, case_id) in enumerate(zip(predictions, targets.ids, strict=True))
        ]

    def summarise(
        self, cases: list[dict[str, Any]], n_resamples: int, seed: int
    ) -> tuple[dict[str, Any], dict[str, list[float]]]:
        """The test block of a record (``dice``/``iou``/``hd95``/``nsd`` = means over cases of
        the mean foreground value, undefined cases counted; per-class detail and the cases
        themselves) and its bootstrap intervals over cases (empty when ``n_resamples`` is 0)."""
        scored = [{k: v for k, v in c.items() if k != "id"} for c in cases]
        summary = aggregate(scored, n_resamples=max(n_resamples, 1), seed=seed)
        stats = summary["metrics"]
        test: dict[str, Any] = {m: stats[f"mean_fg_{m}"]["mean"] for m in SUMMARY_METRICS}
        test["n_cases"] = summary["n_cases"]
        test["n_undefined"] = {m: stats[f"mean_fg_{m}"]["n_undefined"] for m in SUMMARY_METRICS}
        test["distance_unit"] = summary["distance_unit"]
        test["nsd_tolerance"] = summary["nsd_tolerance"]
        test["per_class"] = stats
        test["undefined"] = summary["undefined"]
        test["cases"] = cases
        ci = {m: stats[f"mean_fg_{m}"]["ci95"] for m in SUMMARY_METRICS} if n_resamples else {}
        return test, ci

    def evaluate(
        self, labels: CaseTargets, scores: Sequence[np.ndarray], task_type: TaskType
    ) -> dict[str, Any]:
        """``scores`` are predicted label maps at each case's own size."""
        return self.summarise(self.score_cases(scores, labels), 0, 0)[0]

    def bootstrap(
        self,
        labels: CaseTargets,
        scores: Sequence[np.ndarray],
        task_type: TaskType,
        n_resamples: int,
        seed: int,
    ) -> dict[str, list[float]]:
        return self.summarise(self.score_cases(scores, labels), n_resamples, seed)[1]


TASKS.register("segmentation", SegmentationTask())
