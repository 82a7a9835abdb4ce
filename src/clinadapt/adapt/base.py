"""The interface of adaptation methods that work on frozen features."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from clinadapt.data.info import TaskType
from clinadapt.registry import Registry

METHODS: Registry[type[FrozenFeatureMethod]] = Registry("method")


class FrozenFeatureMethod(ABC):
    """Fit on support features, predict class probabilities for query features.

    Labels follow ``DatasetInfo``: (N, 1) class indices for single-label tasks, (N, C) 0/1 for
    multi-label. ``predict_proba`` returns (N, C) scores: class probabilities for single-label
    tasks (C = 2 for binary), independent per-label probabilities for multi-label tasks.
    """

    kind: ClassVar[str] = "frozen"
    config_cls: ClassVar[type]
    description: ClassVar[str] = ""
    uses_validation: ClassVar[bool] = False
    """Whether ``fit`` chooses anything on ``val``: its labels then count as used."""

    def __init__(self, config: Any | None = None) -> None:
        self.config = config if config is not None else self.config_cls()

    @abstractmethod
    def fit(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        task: TaskType,
        num_classes: int,
        val: tuple[np.ndarray, np.ndarray] | None = None,
        seed: int = 0,
    ) -> FrozenFeatureMethod: ...

    @abstractmethod
    def predict_proba(self, features: np.ndarray) -> np.ndarray: ...

    def selected(self) -> dict[str, Any]:
        """Hyper-parameters chosen during ``fit`` (e.g. on the validation split), for the record."""
        return {}

    def fitted_parameters(self) -> int:
        """How many values ``fit`` learned (0 for instance-based methods such as k-NN), so that
        reports can set accuracy against what was trained."""
        return 0
