"""Training the new head only: the backbone stays frozen, features are computed on the fly.

For classification this is a linear probe trained by gradient descent, with augmentation; for
segmentation it is the frozen-encoder baseline (a 1x1 convolution or a light decoder on the
backbone's dense features), which no frozen-feature method can provide.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from clinadapt.adapt.base import METHODS
from clinadapt.adapt.finetune import AdaptedModel, FineTuneMethod, attach_classifier


@dataclass
class HeadConfig:
    """No options: the head's kind is the run's ``head`` option."""


class HeadOnly(FineTuneMethod):
    """Only the head trains; nothing is added to the backbone, so a linear head merges."""

    config_cls = HeadConfig
    description = "frozen backbone, only the new head trains (linear, or a segmentation decoder)"
    mergeable = True

    def apply(self, model: AdaptedModel) -> AdaptedModel:
        self._begin(model, "head")
        model.refresh_frozen_norms()
        return model

    def merge(self, model: AdaptedModel) -> nn.Module:
        return attach_classifier(copy.deepcopy(model.backbone.model), model.head)


METHODS.register("head", HeadOnly)
