"""Projection heads: small MLPs between the backbone's features and the self-supervised loss.

They are thrown away after pretraining; the loss acts on their output so that the backbone's
features keep information the loss itself would discard (Chen et al. 2020, section 4.2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class ProjectionHead(nn.Module):
    """SimCLR's head: ``layers`` Linear layers with batch norm and ReLU between them."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"a projection head needs at least one layer, got {layers}")
        blocks: list[nn.Module] = []
        width = in_dim
        for _ in range(layers - 1):
            blocks += [nn.Linear(width, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim)]
            blocks.append(nn.ReLU(inplace=True))
            width = hidden_dim
        blocks.append(nn.Linear(width, out_dim))
        self.mlp = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class DINOHead(nn.Module):
    """DINO's head (Caron et al. 2021): an MLP to an L2-normalised bottleneck, then a
    weight-normalised linear layer onto ``out_dim`` prototypes.

    With ``norm_last_layer`` the prototype lengths are fixed at 1, which the paper found to
    stabilise training; ``freeze_last_layer`` lets the loop keep the prototypes still for the
    first epoch(s), as the paper does.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        layers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"a DINO head needs at least one layer, got {layers}")
        blocks: list[nn.Module] = []
        width = in_dim
        for _ in range(layers - 1):
            blocks += [nn.Linear(width, hidden_dim), nn.GELU()]
            width = hidden_dim
        blocks.append(nn.Linear(width, bottleneck_dim))
        self.mlp = nn.Sequential(*blocks)
        self.apply(_init_linear)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        self.last_layer.parametrizations.weight.original0.requires_grad = not norm_last_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))

    def last_layer_parameters(self) -> list[nn.Parameter]:
        return list(self.last_layer.parameters())


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
