"""Zero-shot classification from class text (Radford et al. 2021, CLIP): the image's cosine
similarity to each class's template-averaged text embedding, scaled by the model's logit scale,
through a softmax. No labelled example is used."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clinadapt.adapt.base import METHODS
from clinadapt.adapt.vl.base import TextMethod, TextOptions
from clinadapt.data.info import TaskType


@dataclass
class ZeroShotConfig(TextOptions):
    pass


class ZeroShot(TextMethod):
    """``fit`` only builds the text classifier: support features and labels are not looked at
    (runs give it none)."""

    config_cls = ZeroShotConfig
    description = "zero-shot: softmax over cosine similarity to class-text embeddings (shots 0)"
    zero_shot = True

    def fit(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        task: TaskType,
        num_classes: int,
        val: tuple[np.ndarray, np.ndarray] | None = None,
        seed: int = 0,
    ) -> ZeroShot:
        self._prepare(task, num_classes)
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        self._check_fitted()
        return self._scores(self._classifier.logits(self._joint(features, "query features")))


METHODS.register("zeroshot", ZeroShot)
