"""Training batches for a SAM: each image preprocessed exactly as at inference
(``processing.preprocess``: longest side to the encoder's size, per-image min-max, zero padding on
the right and bottom) and its mask brought into the same frame (nearest, padded with background),
so that prompts drawn from the mask land where the image's objects are."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clinadapt.backbones.sam.processing import preprocess
from clinadapt.data.transforms import PairPreprocess
from clinadapt.errors import DataError

__all__ = ["SamPairs"]


@dataclass(frozen=True)
class SamPairs(PairPreprocess):
    """``SamPairs(256)(images, masks)`` -> x (B, 3, 256, 256) float32, y (B, 256, 256) int64."""

    size: int
    ndim: int = 2

    def __call__(
        self, images: list[np.ndarray], masks: list[np.ndarray] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for i, image in enumerate(images):
            x, frame = preprocess(image, self.size, name=f"image {i} of the batch")
            xs.append(x)
            if masks is None:
                ys.append(torch.zeros((self.size, self.size), dtype=torch.int64))
                continue
            mask = np.asarray(masks[i])
            if mask.shape != frame.original_size:
                raise DataError(
                    f"image {i} of the batch is {frame.original_size} but its mask {mask.shape}; "
                    "a mask must have the shape of its image"
                )
            m = torch.from_numpy(mask.astype(np.float32))[None, None]
            m = F.interpolate(m, frame.resized_size, mode="nearest-exact")[0, 0]
            rh, rw = frame.resized_size
            ys.append(F.pad(m, (0, self.size - rw, 0, self.size - rh)).to(torch.int64))
        return torch.stack(xs), torch.stack(ys)

    def describe(self) -> dict[str, Any]:
        return {
            "input_size": self.size,
            "resize": "longest side (bilinear), zero padding on the right and bottom",
            "intensity": "per-image min-max to [0, 1]",
            "mask": "nearest, padded with background",
        }
