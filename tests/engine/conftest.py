"""A tiny stand-in for clinadapt.data.transforms.Preprocess and a tiny frozen backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clinadapt.backbones import Backbone, create_backbone

SIZE = 32


def tiny_preprocess(batch: np.ndarray) -> torch.Tensor:
    """(B, H, W) or (B, H, W, 3) uint8 -> (B, 3, 32, 32) in [-1, 1], like the real contract."""
    x = torch.from_numpy(np.asarray(batch, dtype=np.float32) / 255.0)
    x = x[:, None].expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return (x - 0.5) / 0.5


@pytest.fixture(scope="session")
def backbone() -> Backbone:
    torch.manual_seed(0)
    return create_backbone("test_vit", weights="none")


@pytest.fixture
def preprocess():
    return tiny_preprocess
