"""The one interface every backbone offers, whatever library it comes from."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PretrainedConfig:
    """How images must look when they reach the backbone (timm's pretrained_cfg, trimmed)."""

    input_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    channels: int = 3
    source: str = ""  # e.g. "timm:resnet18.a1_in1k", a weights path, or "random"


class Backbone(nn.Module):
    """A frozen-feature extractor: ``embed(images) -> [B, feature_dim]``.

    ``weights_id`` identifies the weights exactly (``none``, a sha256 of a local file, or the hub
    tag) and, with ``model_kwargs`` (constructor options such as a weights folder's
    ``create_model_kwargs``), is part of every feature-cache key. ``is_pretrained`` is False for
    random initialisation, which reports mark as an untrained control.
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        feature_dim: int,
        pretrained_cfg: PretrainedConfig,
        weights_id: str,
        is_pretrained: bool,
        model_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.model = model
        self.feature_dim = feature_dim
        self.pretrained_cfg = pretrained_cfg
        self.weights_id = weights_id
        self.is_pretrained = is_pretrained
        self.model_kwargs = dict(model_kwargs or {})

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features for a normalised batch of shape (B, C, H, W)."""
        return self.model(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(images)
