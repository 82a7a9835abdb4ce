"""Weighted k-nearest-neighbour classification on frozen features.

The k-NN monitor of Wu et al. 2018 (InstDisc, "Unsupervised Feature Learning via Non-Parametric
Instance Discrimination") and Caron et al. 2021 (DINO): cosine similarity, the k most similar
support examples vote with weight ``exp(similarity / temperature)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from clinadapt.adapt._checks import check_fit_inputs, check_query, l2_normalise, targets
from clinadapt.adapt.base import METHODS, FrozenFeatureMethod
from clinadapt.data.info import TaskType
from clinadapt.errors import ConfigError

_BLOCK_ELEMENTS = 1 << 22  # similarity entries per query block: bounds memory on large supports


@dataclass
class KNNConfig:
    k: int = field(
        default=20, metadata={"help": "number of neighbours that vote (capped at the support size)"}
    )
    temperature: float = field(
        default=0.07, metadata={"help": "vote weight is exp(cosine similarity / temperature)"}
    )

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"knn: k must be at least 1, got {self.k}")
        if not self.temperature > 0:
            raise ConfigError(f"knn: temperature must be positive, got {self.temperature}")


class KNN(FrozenFeatureMethod):
    """Probabilities are the normalised class vote sums (single-label) or, per label, the
    weighted fraction of positive neighbours (multi-label). No randomness: ``seed`` is unused."""

    config_cls = KNNConfig
    description = "cosine k-NN with temperature-weighted votes (training-free)"
    config: KNNConfig

    def __init__(self, config: KNNConfig | None = None) -> None:
        super().__init__(config)
        self._support: np.ndarray | None = None
        self._targets: np.ndarray | None = None

    def fit(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        task: TaskType,
        num_classes: int,
        val: tuple[np.ndarray, np.ndarray] | None = None,
        seed: int = 0,
    ) -> KNN:
        x, y, task, _ = check_fit_inputs(features, labels, task, num_classes, val)
        self._support = l2_normalise(x, in_place=True)
        self._targets = targets(y, task, num_classes)
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        support = self._support
        # Queries are converted and normalised a block at a time: no float64 copy of them all.
        q = check_query(features, None if support is None else support.shape[1], copy=False)
        k = min(self.config.k, len(support))
        out = np.empty((len(q), self._targets.shape[1]))
        step = max(1, _BLOCK_ELEMENTS // len(support))
        for start in range(0, len(q), step):
            block = l2_normalise(q[start : start + step].astype(np.float64), in_place=True)
            sim = block @ support.T
            idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
            top = np.take_along_axis(sim, idx, axis=1)
            # Shifting by the row maximum leaves the normalised votes unchanged and avoids overflow.
            w = np.exp((top - top.max(axis=1, keepdims=True)) / self.config.temperature)
            votes = np.einsum("qk,qkc->qc", w, self._targets[idx])
            # Summation order can push a unanimous vote a rounding error above 1.
            out[start : start + step] = np.minimum(votes / w.sum(axis=1, keepdims=True), 1.0)
        return out


METHODS.register("knn", KNN)
