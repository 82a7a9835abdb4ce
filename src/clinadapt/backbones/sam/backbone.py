"""LiteMedSAM's image encoder as a clinadapt backbone (``litemedsam``): pooled features for
classification, the image embedding as the dense map for segmentation heads.

Built by ``create_backbone("litemedsam", "../shared/weights/litemedsam")`` like the other local
weights folders; the folder's ``prompt_encoder.*`` and ``mask_decoder.*`` tensors are declared as
the "classifier" (timm's ``pretrained_cfg["classifier"]``), so the strict loader drops exactly
them and requires every ``image_encoder.*`` tensor.

Input: the encoder was trained on images min-max scaled to [0, 1] per image, resized on the
longest side to 256 px (bilinear) and zero-padded on the right and bottom (``sam.preprocess``).
clinadapt's ``Preprocess`` with this backbone's mean 0 and std 1 gives uint8 / 255 in [0, 1],
resized to 256 x 256, without the per-image stretch; the backbone takes that as it is. Measured
on real images (cosine similarity of features, ``Preprocess`` path against the MedSAM path):

* the per-image stretch alone (same resize, with and without min-max): Kvasir-SEG (8 images,
  0-255 range) 1.000 pooled and dense; BreastMNIST (8 test images, 28 px, ranges such as 3-151)
  0.993-0.997 pooled (minimum 0.986), 0.95-0.98 dense. Small: it does not matter for features.
* the resize matters more: 28 px images upsampled with ``resize="nearest"`` (MedMNIST v2's
  default) reach 0.83 pooled (minimum 0.79), with ``resize="bilinear"`` 0.997; Kvasir-SEG squashed
  to 256 x 256 instead of padded, 0.965. Use ``bilinear`` with this backbone.
"""

from __future__ import annotations

import torch
from torch import nn

from clinadapt.backbones.sam.tinyvit import TinyViT

__all__ = ["LiteMedSAMEncoder"]


class LiteMedSAMEncoder(nn.Module):
    """``image_encoder`` (TinyViT, LiteMedSAM sizes): ``forward_dense`` is the (B, 256, H/4, W/4)
    image embedding, ``forward`` its global average (B, 256)."""

    def __init__(self, num_classes: int = 0, **kwargs: object) -> None:
        super().__init__()
        if num_classes:
            raise ValueError("the LiteMedSAM encoder has no classifier; build it with 0 classes")
        self.image_encoder = TinyViT(**kwargs)  # type: ignore[arg-type]
        self.num_features = self.image_encoder.out_chans
        self.pretrained_cfg = {"classifier": ("prompt_encoder", "mask_decoder")}

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_dense(x).mean(dim=(2, 3))
