"""A promptable SAM: an image encoder (LiteMedSAM's TinyViT or SAM's ViT) with segment-anything's
prompt encoder and mask decoder, under the module names of segment-anything checkpoints
(``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``).

``SamArchitecture`` holds every size a checkpoint needs; ``ARCHITECTURES`` names the published
ones (LiteMedSAM; SAM ViT-B/L/H, whose ViT-B sizes MedSAM shares). segment-anything is an optional
dependency (``pip install 'clinadapt[medsam]'``), imported when a model is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

from clinadapt._optional import require
from clinadapt.backbones.sam.tinyvit import TinyViT
from clinadapt.errors import DataError

__all__ = ["ARCHITECTURES", "LITEMEDSAM", "CheckpointInfo", "PromptableSAM", "SamArchitecture"]

EncoderKind = Literal["tinyvit", "vit"]


@dataclass(frozen=True)
class SamArchitecture:
    """Sizes of a promptable SAM. ``encoder_kwargs`` go to ``TinyViT`` or segment-anything's
    ``ImageEncoderViT``; ``image_size`` is the encoder's square input and ``embedding_size`` the
    side of its (B, prompt_dim, s, s) output. The prompt encoder and mask decoder fields are the
    constructor arguments of segment-anything's ``PromptEncoder``, ``MaskDecoder`` and
    ``TwoWayTransformer``."""

    name: str
    encoder: EncoderKind
    encoder_kwargs: dict[str, Any] = field(hash=False)
    image_size: int
    embedding_size: int
    prompt_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256


@dataclass(frozen=True)
class CheckpointInfo:
    """Where a model's weights came from: ``verified`` is True only when the file's sha256 is a
    published one (``description`` says which); ``expected_sha256`` is the checksum it was held
    to, if any."""

    file: str
    sha256: str
    verified: bool
    expected_sha256: str | None
    description: str


def _sam_vit(
    name: str, dim: int, depth: int, heads: int, global_attn: tuple[int, ...]
) -> SamArchitecture:
    kwargs = {
        "img_size": 1024,
        "patch_size": 16,
        "in_chans": 3,
        "embed_dim": dim,
        "depth": depth,
        "num_heads": heads,
        "mlp_ratio": 4.0,
        "qkv_bias": True,
        "use_rel_pos": True,
        "window_size": 14,
        "global_attn_indexes": global_attn,
        "out_chans": 256,
    }
    return SamArchitecture(name, "vit", kwargs, image_size=1024, embedding_size=64)


LITEMEDSAM = SamArchitecture(
    "litemedsam",
    "tinyvit",
    {
        "in_chans": 3,
        "embed_dims": (64, 128, 160, 320),
        "depths": (2, 2, 6, 2),
        "num_heads": (2, 4, 5, 10),
        "window_sizes": (7, 7, 14, 7),
        "mlp_ratio": 4.0,
        "mbconv_expand_ratio": 4.0,
        "out_chans": 256,
    },
    image_size=256,
    embedding_size=64,
)
ARCHITECTURES: dict[str, SamArchitecture] = {
    a.name: a
    for a in (
        LITEMEDSAM,
        _sam_vit("sam_vit_b", 768, 12, 12, (2, 5, 8, 11)),
        _sam_vit("sam_vit_l", 1024, 24, 16, (5, 11, 17, 23)),
        _sam_vit("sam_vit_h", 1280, 32, 16, (7, 15, 23, 31)),
    )
}


def _segment_anything() -> Any:
    return require("segment_anything", extra="medsam", needed_by="promptable segmentation (SAM)")


class PromptableSAM(nn.Module):
    """Image encoder, prompt encoder and mask decoder of SAM, used in two steps so that one image
    embedding serves many prompts: ``embed_image`` then ``predict_masks``.

    Inputs live in the encoder's frame: images (B, 3, S, S) already resized, padded and scaled as
    the weights expect (``processing.preprocess``), prompts in pixels of that frame
    (``ImageFrame.boxes`` / ``ImageFrame.points``). ``predict_masks`` returns SAM's single-mask
    output as low-resolution logits (N, 1, 4s, 4s) for an embedding of side s (256 px for
    LiteMedSAM at 256 px, where the logits are in the input frame itself).
    """

    def __init__(self, architecture: SamArchitecture) -> None:
        super().__init__()
        sam = _segment_anything()
        arch = architecture
        self.architecture = arch
        self.image_size = arch.image_size
        self.checkpoint: CheckpointInfo | None = None  # set by load_sam
        if arch.encoder == "tinyvit":
            self.image_encoder: nn.Module = TinyViT(**arch.encoder_kwargs)
        else:
            self.image_encoder = sam.modeling.ImageEncoderViT(
                **arch.encoder_kwargs, norm_layer=partial(nn.LayerNorm, eps=1e-6)
            )
        side = arch.embedding_size
        self.prompt_encoder = sam.modeling.PromptEncoder(
            embed_dim=arch.prompt_dim,
            image_embedding_size=(side, side),
            input_image_size=(arch.image_size, arch.image_size),
            mask_in_chans=arch.mask_in_chans,
        )
        self.mask_decoder = sam.modeling.MaskDecoder(
            num_multimask_outputs=arch.num_multimask_outputs,
            transformer=sam.modeling.TwoWayTransformer(
                depth=arch.decoder_depth,
                embedding_dim=arch.prompt_dim,
                mlp_dim=arch.decoder_mlp_dim,
                num_heads=arch.decoder_heads,
                attention_downsample_rate=arch.attention_downsample_rate,
            ),
            transformer_dim=arch.prompt_dim,
            iou_head_depth=arch.iou_head_depth,
            iou_head_hidden_dim=arch.iou_head_hidden_dim,
        )

    def embed_image(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed images -> (B, prompt_dim, s, s) image embeddings."""
        size = self.image_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, size, size):
            raise DataError(
                f"images for {self.architecture.name} must be (B, 3, {size}, {size}) after "
                f"preprocessing, got {tuple(x.shape)}; use clinadapt.backbones.sam.preprocess"
            )
        return self.image_encoder(x)

    def predict_masks(
        self,
        embeddings: torch.Tensor,
        boxes: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Low-resolution mask logits (N, 1, 4s, 4s), one mask per prompt.

        ``boxes`` (N, 4) as ``x0, y0, x1, y1``, ``points`` (N, P, 2) as ``x, y`` with ``labels``
        (N, P) 1 (foreground) or 0 (background), or both, in the encoder's pixel frame.
        ``embeddings`` is (N, ...) (one image per prompt) or (1, ...) (one image, N prompts).
        """
        n = _prompt_count(boxes, points, labels)
        if embeddings.shape[0] not in (1, n):
            raise DataError(
                f"{embeddings.shape[0]} image embeddings for {n} prompts: give one embedding "
                "per prompt, or one embedding shared by all prompts"
            )
        if embeddings.shape[0] == 1 or n == 1:
            return self._decode(embeddings, boxes, points, labels)
        # segment-anything's decoder repeats a single image over the prompts, so a batch of
        # images with one prompt each is decoded image by image
        return torch.cat(
            [
                self._decode(
                    embeddings[i : i + 1],
                    None if boxes is None else boxes[i : i + 1],
                    None if points is None else points[i : i + 1],
                    None if labels is None else labels[i : i + 1],
                )
                for i in range(n)
            ]
        )

    def _decode(
        self,
        embeddings: torch.Tensor,
        boxes: torch.Tensor | None,
        points: torch.Tensor | None,
        labels: torch.Tensor | None,
    ) -> torch.Tensor:
        sparse, dense = self.prompt_encoder(
            points=None if points is None else (points, labels), boxes=boxes, masks=None
        )
        logits, _ = self.mask_decoder(
            image_embeddings=embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return logits


def _prompt_count(
    boxes: torch.Tensor | None, points: torch.Tensor | None, labels: torch.Tensor | None
) -> int:
    """The number of prompts, after checking that boxes, points and labels agree."""
    if boxes is None and points is None:
        raise DataError("a prompt is needed: give boxes, points (with labels) or both")
    if (points is None) != (labels is None):
        raise DataError("points and labels go together: give both or neither")
    counts = set()
    if boxes is not None:
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise DataError(f"boxes must be (N, 4) as x0, y0, x1, y1, got {tuple(boxes.shape)}")
        counts.add(boxes.shape[0])
    if points is not None and labels is not None:
        if points.ndim != 3 or points.shape[2] != 2 or tuple(labels.shape) != points.shape[:2]:
            raise DataError(
                f"points must be (N, P, 2) as x, y with labels (N, P), got points "
                f"{tuple(points.shape)} and labels {tuple(labels.shape)}"
            )
        counts.add(points.shape[0])
    if len(counts) != 1:
        raise DataError(f"boxes and points name different numbers of prompts: {sorted(counts)}")
    return counts.pop()
