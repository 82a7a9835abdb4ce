"""The bottleneck modules and the forward hooks that splice them into a frozen network."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class Bottleneck(nn.Module):
    """``scale * up(dropout(GELU(down(x))))`` on the last dimension; ``up`` starts at zero so
    the adapted network initially computes exactly what the frozen one did."""

    def __init__(self, dim: int, width: int, scale: float = 1.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.down, self.up = self._projections(dim, width)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    @staticmethod
    def _projections(dim: int, width: int) -> tuple[nn.Module, nn.Module]:
        return nn.Linear(dim, width), nn.Linear(width, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.dropout(self.act(self.down(x))))

    def parallel_hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor):
        """Forward hook: ``module(x) + adapter(x)`` (AdaptFormer's parallel branch)."""
        return output + self(args[0])

    def sequential_hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor):
        """Forward hook: ``y + adapter(y)`` with ``y = module(x)`` (Houlsby's serial adapter)."""
        return output + self(output)


class ConvBottleneck(Bottleneck):
    """The same bottleneck with 1x1 convolutions, for (B, C, H, W) feature maps."""

    @staticmethod
    def _projections(dim: int, width: int) -> tuple[nn.Module, nn.Module]:
        return nn.Conv2d(dim, width, 1), nn.Conv2d(width, dim, 1)
