"""The interface every pretraining method offers, and their registry."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from clinadapt.config import from_dict
from clinadapt.registry import Registry

SSL_METHODS: Registry[type[PretrainModel]] = Registry(
    "pretraining method", listing="clinadapt methods"
)


class PretrainModel(nn.Module):
    """An encoder wrapped with what one self-supervised method needs (heads, a teacher, a
    decoder); ``forward(views, epoch)`` returns the loss.

    ``encoder`` maps a batch to pooled (B, feature_dim) features; it is the part that is kept.
    ``views`` names the view preset (``clinadapt.ssl.views``) the method is designed for.
    """

    config_cls: ClassVar[type]
    description: ClassVar[str] = ""
    views: ClassVar[str] = ""

    def __init__(self, encoder: nn.Module, feature_dim: int, config: Any) -> None:
        super().__init__()
        self.encoder, self.feature_dim, self.config = encoder, feature_dim, config

    def forward(self, views: list[torch.Tensor], epoch: int = 0) -> torch.Tensor:
        raise NotImplementedError

    def before_optimizer_step(self, epoch: int) -> None:
        """Called after the backward pass, before the optimiser step (e.g. to drop gradients)."""

    def after_optimizer_step(self, progress: float) -> None:
        """Called after each optimiser step; ``progress`` runs from 0 to 1 over the training."""


def create_pretrain_model(
    name: str, encoder: nn.Module, feature_dim: int, options: dict[str, Any] | None = None
) -> PretrainModel:
    """Method ``name`` around ``encoder``, its config built from ``options`` (unknown keys are
    errors)."""
    cls = SSL_METHODS.get(name)
    config = from_dict(cls.config_cls, dict(options or {}), where=f"{name} options")
    return cls(encoder, feature_dim, config)
