"""Nearest class prototype on centred, L2-normalised features.

SimpleShot (Wang et al. 2019, "SimpleShot: Revisiting Nearest-Neighbor Classification for
Few-Shot Learning"): subtracting the mean feature and normalising ("CL2N") makes a nearest-centroid
classifier competitive with meta-learned few-shot methods. The mean here is the support mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.special import expit, softmax

from clinadapt.adapt._checks import check_fit_inputs, check_query, l2_normalise
from clinadapt.adapt.base import METHODS, FrozenFeatureMethod
from clinadapt.data.info import TaskType
from clinadapt.errors import ConfigError


@dataclass
class PrototypeConfig:
    temperature: float = field(
        default=0.1,
        metadata={
            "help": "probabilities are softmax(cosine similarity to prototypes / temperature)"
        },
    )

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"prototype: temperature must be positive, got {self.temperature}")


def _prototype(z: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The unit-length mean of the rows of ``z`` selected by ``mask`` (NaN when none are)."""
    if not mask.any():
        return np.full(z.shape[1], np.nan)
    return l2_normalise(z.mean(axis=0, keepdims=True, where=mask[:, None]))[0]


class Prototype(FrozenFeatureMethod):
    """Single-label: one prototype per class; a class absent from the support gets probability 0.
    Multi-label: per label a positive and a negative prototype, p = softmax over the two; a label
    with only one value in the support predicts that value. No randomness: ``seed`` is unused."""

    config_cls = PrototypeConfig
    description = "nearest class mean after centring and L2 normalisation (SimpleShot)"
    config: PrototypeConfig

    def __init__(self, config: PrototypeConfig | None = None) -> None:
        super().__init__(config)
        self._mean: np.ndarray | None = None
        self._protos: np.ndarray | None = None  # (C, D) single-label, (2, C, D) neg/pos multi-label
        self._task: TaskType | None = None

    def fit(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        task: TaskType,
        num_classes: int,
        val: tuple[np.ndarray, np.ndarray] | None = None,
        seed: int = 0,
    ) -> Prototype:
        x, y, task, _ = check_fit_inputs(features, labels, task, num_classes, val)
        self._mean = x.mean(axis=0)
        x -= self._mean
        z = l2_normalise(x, in_place=True)
        if task.single_label:
            self._protos = np.stack([_prototype(z, y == c) for c in range(num_classes)])
        else:
            self._protos = np.stack(
                [[_prototype(z, y[:, c] == v) for c in range(num_classes)] for v in (0, 1)]
            )
        self._task = task
        return self

    def fitted_parameters(self) -> int:
        return int(self._protos.size + self._mean.size)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        mean = self._mean
        q = check_query(features, None if mean is None else len(mean))
        q -= mean
        z = l2_normalise(q, in_place=True)
        t = self.config.temperature
        if self._task.single_label:
            logits = z @ self._protos.T / t
            return softmax(np.where(np.isnan(logits), -np.inf, logits), axis=1)
        neg, pos = self._protos
        p = expit((z @ pos.T - z @ neg.T) / t)  # softmax over (negative, positive) similarities
        constant = np.isnan(neg).all(axis=1) | np.isnan(pos).all(axis=1)
        p[:, constant] = np.isnan(neg[constant]).all(axis=1).astype(np.float64)
        return p


METHODS.register("prototype", Prototype)
