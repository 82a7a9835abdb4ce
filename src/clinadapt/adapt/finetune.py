"""The interface of gradient-based methods: which parameters of backbone + new head train."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from clinadapt.backbones.base import Backbone


class AdaptedModel(nn.Module):
    """A backbone with a new linear classification head.

    A method decides what trains: it may insert layers into ``backbone.model`` (LoRA, adapters,
    prompts) and sets ``requires_grad``. The head always trains. ``trainable_state_dict`` is what
    an adapter-only checkpoint holds; the base weights are rebuilt from the backbone's name and
    weights option.
    """

    def __init__(self, backbone: Backbone, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.feature_dim, num_classes)
        self.base_parameters = sum(p.numel() for p in backbone.parameters())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.embed(images))

    def trainable_names(self) -> list[str]:
        return [name for name, p in self.named_parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable parameters plus buffers of trainable modules (e.g. norm running stats)."""
        names = set(self.trainable_names())
        state = self.state_dict()
        owners = {n.rsplit(".", 1)[0] for n in names}
        return {
            k: v.detach().clone()
            for k, v in state.items()
            if k in names or (k.rsplit(".", 1)[0] in owners and k not in dict(self.named_parameters()))
        }

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class FineTuneMethod(ABC):
    """Turns a frozen backbone + head into a model whose chosen parameters train.

    Subclasses set ``config_cls`` and implement ``apply``; ``merge`` folds whatever the method
    added back into a plain backbone (timm model with the head as its classifier) where the
    method allows it, so that deployment needs no clinadapt code.
    """

    kind: ClassVar[str] = "finetune"
    config_cls: ClassVar[type]
    description: ClassVar[str] = ""
    mergeable: ClassVar[bool] = False

    def __init__(self, config: Any | None = None) -> None:
        self.config = config if config is not None else self.config_cls()

    @abstractmethod
    def apply(self, model: AdaptedModel) -> AdaptedModel:
        """Insert the method's layers and mark trainable parameters (called once, before training)."""

    def merge(self, model: AdaptedModel) -> nn.Module:
        """A plain model (no clinadapt layers) computing the same logits as ``model``."""
        from clinadapt.errors import ClinadaptError

        raise ClinadaptError(
            f"{type(self).__name__} adds layers that cannot be folded into the backbone; export "
            "without --merge to get the adapter checkpoint"
        )
