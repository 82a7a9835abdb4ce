"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML): two random views of each image are pulled together and pushed away
from the other images' views, through a projection head that is discarded afterwards."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from clinadapt.errors import ConfigError
from clinadapt.ssl.base import SSL_METHODS, PretrainModel
from clinadapt.ssl.heads import ProjectionHead
from clinadapt.ssl.losses import nt_xent


@dataclass
class SimCLRConfig:
    temperature: float = field(default=0.1, metadata={"help": "NT-Xent temperature"})
    hidden_dim: int = field(default=512, metadata={"help": "projection head hidden width"})
    out_dim: int = field(default=128, metadata={"help": "projection (loss) dimension"})
    head_layers: int = field(default=2, metadata={"help": "Linear layers in the head"})

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        for key in ("hidden_dim", "out_dim", "head_layers"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")


class SimCLR(PretrainModel):
    config_cls = SimCLRConfig
    description = "SimCLR (Chen et al. 2020): contrastive, NT-Xent over two views"
    views = "simclr"

    def __init__(self, encoder: nn.Module, feature_dim: int, config: SimCLRConfig) -> None:
        super().__init__(encoder, feature_dim, config)
        self.head = ProjectionHead(
            feature_dim, config.hidden_dim, config.out_dim, layers=config.head_layers
        )

    def forward(self, views: list[torch.Tensor], epoch: int = 0) -> torch.Tensor:
        if len(views) < 2:
            raise ConfigError(f"simclr needs two views per image, got {len(views)}")
        # one pass over both views: batch norm then normalises them with the same statistics
        z_a, z_b = self.head(self.encoder(torch.cat(views[:2]))).chunk(2)
        return nt_xent(z_a, z_b, self.config.temperature)


SSL_METHODS.register("simclr", SimCLR)
