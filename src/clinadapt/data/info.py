"""Dataset metadata records: one record drives the reader, the sampler and the evaluator."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class TaskType(str, Enum):
    BINARY = "binary"
    MULTICLASS = "multi-class"
    MULTILABEL = "multi-label"
    ORDINAL = "ordinal"
    SEGMENTATION = "segmentation"

    @property
    def single_label(self) -> bool:
        """True when each example (each pixel, for segmentation) has exactly one class index:
        everything but multi-label."""
        return self is not TaskType.MULTILABEL


CLASSIFICATION_TASKS = (TaskType.BINARY, TaskType.MULTICLASS, TaskType.MULTILABEL, TaskType.ORDINAL)


@dataclass(frozen=True)
class DatasetInfo:
    """What is known about a dataset before reading it.

    ``labels`` are the class names in index order. Labels in a split are always an int64 array
    of shape (N, 1) with values in [0, num_classes) for single-label tasks, and (N, num_classes)
    of 0/1 for multi-label tasks. For segmentation, ``labels`` name the mask values and include
    the background at index 0 (``("background", "polyp")``), so ``num_classes`` counts it; a
    split's labels are then integer masks, one per case (see ``Split``).
    """

    name: str
    task: TaskType
    labels: tuple[str, ...]
    channels: int
    ndim: int  # 2 for images, 3 for volumes
    splits: dict[str, int] = field(default_factory=dict)  # official number of examples per split
    sizes: tuple[int, ...] = ()  # available image sizes (edge length in pixels)
    urls: dict[int, str] = field(default_factory=dict)  # per size
    md5: dict[int, str] = field(default_factory=dict)  # per size
    description: str = ""
    license: str = ""
    modality: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.labels)
