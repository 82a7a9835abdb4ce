"""BitFit: train only the bias terms (and, optionally, normalisation parameters) and the head.

Ben Zaken, Goldberg and Ravfogel 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models" (ACL). As in the paper every bias trains, normalisation
biases included; ``include_norm`` adds the normalisation scales (the usual choice for vision,
where CNN convolutions often have no bias at all). Norm layers that train also update their
running statistics, as in ordinary fine-tuning.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import nn

from clinadapt.adapt.base import METHODS
from clinadapt.adapt.finetune import AdaptedModel, FineTuneMethod, attach_classifier, is_norm


@dataclass
class BitFitConfig:
    include_norm: bool = field(
        default=True,
        metadata={"help": "also train the scales of normalisation layers (LayerNorm, BatchNorm)"},
    )


class BitFit(FineTuneMethod):
    """Biases (+ norm scales) and the head train; nothing is added, so the model merges."""

    config_cls = BitFitConfig
    description = "BitFit (Ben Zaken et al. 2022): only biases (and norm parameters) train"
    mergeable = True

    def apply(self, model: AdaptedModel) -> AdaptedModel:
        self._begin(model, "bitfit")
        for module in model.backbone.modules():
            norm = self.config.include_norm and is_norm(module)
            for name, param in module.named_parameters(recurse=False):
                if name == "bias" or name.endswith("_bias") or norm:  # in_proj_bias, q_bias
                    param.requires_grad_(True)
        model.refresh_frozen_norms()
        return model

    def merge(self, model: AdaptedModel) -> nn.Module:
        return attach_classifier(copy.deepcopy(model.backbone.model), model.head)


METHODS.register("bitfit", BitFit)
