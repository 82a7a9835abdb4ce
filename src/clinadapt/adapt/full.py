"""Full fine-tuning: every backbone parameter and the new head train.

The reference point of every parameter-efficient method (e.g. Kornblith et al. 2019, "Do Better
ImageNet Models Transfer Better?"). With ``weights none`` it is the from-scratch baseline: the
same architecture trained only on the target data. Batch-norm statistics update as usual.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from clinadapt.adapt.base import METHODS
from clinadapt.adapt.finetune import AdaptedModel, FineTuneMethod, attach_classifier


@dataclass
class FullConfig:
    """Full fine-tuning has no options of its own (learning rate etc. belong to training)."""


class FullFineTune(FineTuneMethod):
    """All parameters train; ``merge`` installs the head as the timm classifier."""

    config_cls = FullConfig
    description = "full fine-tuning: every backbone parameter trains (weights none: from scratch)"
    mergeable = True

    def apply(self, model: AdaptedModel) -> AdaptedModel:
        self._begin(model, "full")
        model.backbone.requires_grad_(True)
        model.frozen_norms = ()  # batch norm trains: its statistics follow the new data
        return model

    def merge(self, model: AdaptedModel) -> nn.Module:
        return attach_classifier(copy.deepcopy(model.backbone.model), model.head)


METHODS.register("full", FullFineTune)
