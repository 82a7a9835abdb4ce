"""The interface of vision-language methods: a frozen-feature method that also gets text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from clinadapt.adapt._checks import check_features
from clinadapt.adapt.base import FrozenFeatureMethod
from clinadapt.data.checks import check_task
from clinadapt.data.class_text import USES, ClassText
from clinadapt.data.info import TaskType
from clinadapt.errors import ConfigError, DataError
from clinadapt.text.classifier import TextClassifier, head_scores, zero_shot_classifier

if TYPE_CHECKING:
    from clinadapt.backbones.text_side import JointSpace


@dataclass
class TextOptions:
    """The text options every vision-language method shares."""

    text: str = field(
        default="names",
        metadata={
            "help": "what fills the class-text templates: names, descriptions, or both "
            "(their prompt embeddings averaged)"
        },
    )

    def __post_init__(self) -> None:
        if self.text not in USES:
            raise ConfigError(f"text must be one of {list(USES)}, got {self.text!r}")


def no_text_side(method: str, backbone: str) -> ConfigError:
    """The error for a text method on an image-only backbone."""
    from clinadapt.backbones import BACKBONES

    having = [n for n in BACKBONES.names() if BACKBONES.get(n).library == "open_clip"]
    return ConfigError(
        f"method {method!r} classifies through class text, and backbone {backbone!r} has no "
        f"text side (a text encoder in the space of its image features). Use a vision-language "
        f"backbone ({', '.join(having)}, or any open_clip:<arch>/<tag>), or align this one to a "
        "text encoder first with `clinadapt align`"
    )


class TextMethod(FrozenFeatureMethod):
    """``use_text(space, class_text)``, then ``fit``/``predict_proba`` on backbone features.

    Scores come from heads of options (``ClassText.prompts``): single-label tasks have one head
    over the classes, multi-label tasks one (absent, present) head per label, so every method
    is a softmax per head and binary tasks get two proper class probabilities.
    ``zero_shot`` methods take no labels: runs give them shots 0, and only them.
    """

    needs_text: ClassVar[bool] = True
    zero_shot: ClassVar[bool] = False
    config: TextOptions

    def __init__(self, config: Any | None = None) -> None:
        super().__init__(config)
        self._space: JointSpace | None = None
        self._class_text: ClassText | None = None
        self._classifier: TextClassifier | None = None
        self._task: TaskType | None = None

    def use_text(self, space: JointSpace, class_text: ClassText) -> TextMethod:
        self._space, self._class_text = space, class_text
        return self

    def _prepare(self, task: TaskType | str, num_classes: int) -> TextClassifier:
        """The zero-shot classifier of the task's heads, checked against the class count."""
        if self._space is None or self._class_text is None:
            raise RuntimeError("call use_text(space, class_text) before fit()")
        self._task = check_task(task, num_classes)
        heads = self._class_text.prompts(self._task, self.config.text)
        found = len(heads[0]) if self._task.single_label else len(heads)
        if found != num_classes:
            raise DataError(
                f"{self._class_text.source} describes {found} classes, the task has {num_classes}"
            )
        self._classifier = zero_shot_classifier(self._space, heads)
        return self._classifier

    def _joint(self, features: np.ndarray, what: str = "features") -> torch.Tensor:
        """Backbone features -> unit rows in the joint space."""
        return self._space.project_image(torch.from_numpy(check_features(features, what)))

    def _scores(self, logits: torch.Tensor) -> np.ndarray:
        return head_scores(logits, self._task.single_label)

    def _check_fitted(self) -> None:
        if self._classifier is None:
            raise RuntimeError("call fit() before predict_proba()")

    def text_block(self) -> dict[str, Any]:
        """The record's account of the text a run used: source, phrases, templates, encoder."""
        if self._space is None or self._class_text is None:
            return {}
        return {
            **self._class_text.describe(self.config.text),
            "space": self._space.describe(),
        }
