"""Images and prompts into a SAM encoder's square frame, and masks back out, as LiteMedSAM's
``config.json`` says: longest side resized to the encoder's size (bilinear, aspect ratio kept),
per-image min-max to [0, 1], zero padding on the right and bottom; box and point prompts scaled by
the same factor; mask logits cropped to the unpadded region, resized bilinearly to the original
size and thresholded at 0.

Prompts are in pixels of the original image, ``x`` along columns and ``y`` along rows: boxes
``x0, y0, x1, y1`` as MedSAM draws them from a mask (first and last foreground column and row);
a box's edges may lie on the image border (0 to W, 0 to H), a point must lie on a pixel
(``0 <= x < W``, ``0 <= y < H``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike

from clinadapt.errors import DataError

__all__ = ["MAX_PIXELS", "ImageFrame", "preprocess", "resize_bilinear"]

MAX_PIXELS = 4096 * 4096
"""Larger images are resized by ``resize_bilinear``, which reads only the pixels the resize uses,
instead of whole as float32 (a 30000 x 30000 RGB image would take 10 GB): the same bilinear
resize up to float rounding, with memory bounded by the encoder's size."""
CHECK_PIXELS = 1 << 24
"""Values of a float image too big to convert whole that are checked for NaN at once."""


@dataclass(frozen=True)
class ImageFrame:
    """How one image of ``original_size`` (H, W) sits in a ``size`` x ``size`` encoder input:
    scaled by ``size / max(H, W)`` to ``resized_size`` at the top left. ``name`` (the file, say)
    is what errors about its prompts quote."""

    original_size: tuple[int, int]
    size: int
    name: str = "image"

    @property
    def scale(self) -> float:
        return self.size / max(self.original_size)

    @property
    def resized_size(self) -> tuple[int, int]:
        """Rounded to the nearest pixel, as LiteMedSAM's ``resize_longest_side``."""
        h, w = self.original_size
        return int(h * self.scale + 0.5), int(w * self.scale + 0.5)

    def boxes(self, boxes: ArrayLike) -> torch.Tensor:
        """(N, 4) or (4,) boxes in original pixels -> (N, 4) float32 in the encoder's frame.

        A ``DataError`` names the first box that is not finite, is reversed, has no area or
        leaves the image."""
        b = _as_float(boxes, "boxes")
        if b.ndim == 1:
            b = b[None]
        if b.ndim != 2 or b.shape[1] != 4:
            raise DataError(
                f"{self.name}: boxes must be x0, y0, x1, y1 (shape (4,) or (N, 4)), got shape "
                f"{tuple(b.shape)}"
            )
        h, w = self.original_size
        for i, (x0, y0, x1, y1) in enumerate(b.tolist()):
            problem = None
            if not np.isfinite([x0, y0, x1, y1]).all():
                problem = "is not finite"
            elif x1 < x0 or y1 < y0:
                problem = "is reversed (x1 < x0 or y1 < y0)"
            elif x1 == x0 or y1 == y0:
                problem = "is empty (no width or no height)"
            elif x0 < 0 or y0 < 0 or x1 > w or y1 > h:
                problem = f"is outside the image (x in 0..{w}, y in 0..{h})"
            if problem:
                raise DataError(
                    f"{self.name}: box {i} [{x0:g}, {y0:g}, {x1:g}, {y1:g}] {problem}; boxes are "
                    "x0, y0, x1, y1 in pixels of the original image"
                )
        return torch.from_numpy(b * self.scale).float()

    def points(self, points: ArrayLike, labels: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, 2) or (N, P, 2) points ``x, y`` in original pixels with labels (P,) or (N, P),
        1 foreground and 0 background -> float32 points in the encoder's frame, int64 labels.

        A ``DataError`` names the first point outside the image and any other label."""
        p, lab = _as_float(points, "points"), np.asarray(labels)
        if p.ndim == 2:
            p, lab = p[None], lab[None]
        if p.ndim != 3 or p.shape[2] != 2 or lab.shape != p.shape[:2]:
            raise DataError(
                f"{self.name}: points must be x, y (shape (P, 2) or (N, P, 2)) with one label "
                f"each, got points {tuple(p.shape)} and labels {tuple(lab.shape)}"
            )
        if not np.isin(lab, (0, 1)).all():
            raise DataError(
                f"{self.name}: point labels must be 1 (foreground) or 0 (background), got "
                f"{sorted(set(lab.ravel().tolist()) - {0, 1})[:5]}"
            )
        h, w = self.original_size
        for n, prompt in enumerate(p.tolist()):
            for i, (x, y) in enumerate(prompt):
                if not (0 <= x < w and 0 <= y < h):
                    raise DataError(
                        f"{self.name}: point {i} of prompt {n} ({x:g}, {y:g}) is outside the "
                        f"image (x in [0, {w}), y in [0, {h})); points are x, y in pixels"
                    )
        return torch.from_numpy(p * self.scale).float(), torch.from_numpy(lab.astype(np.int64))

    def masks(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, 1, s, s) low-resolution logits -> (N, H, W) boolean masks of the original image."""
        return self.logits(logits) > 0

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, 1, s, s) low-resolution logits -> (N, H, W) float logits on the original image
        (``masks`` thresholds them at 0; masks of several prompts compare them).

        Logits smaller than the encoder's frame (SAM ViT: 256 for 1024) are first resized to it
        so the unpadded region is cropped exactly."""
        if logits.ndim != 4 or logits.shape[1] != 1:
            raise DataError(f"mask logits must be (N, 1, s, s), got {tuple(logits.shape)}")
        x = logits.float()
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, (self.size, self.size), mode="bilinear", align_corners=False)
        rh, rw = self.resized_size
        x = F.interpolate(
            x[..., :rh, :rw], self.original_size, mode="bilinear", align_corners=False
        )
        return x[:, 0]


def _as_float(values: ArrayLike, what: str) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise DataError(f"{what} must be numbers: {err}") from None


def preprocess(
    image: np.ndarray | torch.Tensor, size: int = 256, name: str = "image"
) -> tuple[torch.Tensor, ImageFrame]:
    """One image (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) of any numeric dtype (8- or 16-bit,
    float) -> a float32 (3, size, size) encoder input and its ``ImageFrame``.

    Grayscale is repeated to three channels and an alpha channel dropped. Min-max scaling is
    taken over the resized image (a constant image becomes zeros). The resize is plain bilinear,
    not antialiased, as in the reference check of ``PROVENANCE.md`` (Kvasir-SEG, 25 images:
    Dice 0.915 plain, 0.922 antialiased). Images over ``MAX_PIXELS`` take the same resize
    through ``resize_bilinear``, with memory bounded whatever their size."""
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    numeric = np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    if not numeric or arr.ndim not in (2, 3):
        raise DataError(
            f"{name}: an image must be a numeric array (H, W) or (H, W, C) with C in 1, 3, 4, got "
            f"{arr.dtype} {arr.shape}"
        )
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[2] not in (1, 3, 4) or min(arr.shape[:2]) < 1:
        raise DataError(
            f"{name}: an image must be (H, W) or (H, W, C) with C in 1 (grayscale), 3 (RGB) or "
            f"4 (RGBA), got shape {arr.shape}"
        )
    frame = ImageFrame((int(arr.shape[0]), int(arr.shape[1])), size, name)
    if arr.shape[0] * arr.shape[1] > MAX_PIXELS:
        _check_finite(arr[..., :3], name)
        x = torch.from_numpy(resize_bilinear(arr[..., :3], frame.resized_size)).permute(2, 0, 1)
    else:
        x = torch.from_numpy(np.array(arr[..., :3], dtype=np.float32)).permute(2, 0, 1)
        if not torch.isfinite(x).all():
            raise DataError(f"{name}: the image has NaN or infinite pixels")
        x = F.interpolate(x[None], frame.resized_size, mode="bilinear", align_corners=False)[0]
    low, high = x.min(), x.max()
    x = (x - low) / (high - low).clamp_min(1e-8)
    rh, rw = frame.resized_size
    x = F.pad(x, (0, size - rw, 0, size - rh)).expand(3, -1, -1)
    return x.contiguous(), frame


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``image`` (H, W[, C]) of any numeric dtype resized to ``size`` as float32, as torch's
    bilinear interpolation without antialiasing (``align_corners=False``) does (up to float
    rounding), reading only the two rows and two columns around each output pixel: a huge
    image is never converted whole."""

    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0)
        i0 = np.minimum(src.astype(np.int64), n_in - 1)
        return i0, np.minimum(i0 + 1, n_in - 1), (src - i0).astype(np.float32)

    (y0, y1, wy), (x0, x1, wx) = axis(image.shape[0], size[0]), axis(image.shape[1], size[1])
    extra = (1,) * (image.ndim - 2)
    wy, wx = wy.reshape(-1, 1, *extra), wx.reshape(1, -1, *extra)

    def row(y: np.ndarray) -> np.ndarray:
        left = image[np.ix_(y, x0)].astype(np.float32)
        right = image[np.ix_(y, x1)].astype(np.float32)
        return (1 - wx) * left + wx * right

    return (1 - wy) * row(y0) + wy * row(y1)


def _check_finite(image: np.ndarray, name: str) -> None:
    """A ``DataError`` for a NaN or infinite pixel anywhere, a band of rows at a time."""
    if image.dtype.kind != "f":
        return
    band = max(1, CHECK_PIXELS // image[0].size)
    for start in range(0, image.shape[0], band):
        if not np.isfinite(image[start : start + band]).all():
            raise DataError(f"{name}: the image has NaN or infinite pixels")
