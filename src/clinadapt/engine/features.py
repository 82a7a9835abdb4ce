"""Streaming feature extraction: batches in, (N, D) float32 out; memory bounded by the batch.

2D images go through the backbone directly. 3D volumes (B, D, H, W) go through the 2D backbone
as grayscale slices along one or all three orthogonal planes and are mean-pooled per volume.
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from clinadapt.backbones.base import Backbone
from clinadapt.errors import ConfigError, DataError

Precision = Literal["auto", "bf16", "fp32"]
VolumeMode = Literal["axial", "coronal", "sagittal", "planes"]
Preprocess = Callable[[np.ndarray], Any]  # numpy batch -> (B, 3, S, S) float tensor
PRECISIONS = ("auto", "bf16", "fp32")
PLANE_AXES = {"axial": (1,), "coronal": (2,), "sagittal": (3,), "planes": (1, 2, 3)}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as given, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast is fast here: CUDA bf16 units, or CPU AMX / AVX512-BF16 via oneDNN."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(torch.cpu, p, lambda: False)() for p in probes)
    return False


def resolve_precision(precision: str, device: str | torch.device | None = None) -> str:
    """``bf16`` or ``fp32``: ``auto`` picks bf16 where the device runs it natively.

    Callers record the resolved value (and use it in feature-cache keys).
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    return "bf16" if bf16_supported(resolve_device(device)) else "fp32"


def slice_indices(length: int, max_slices: int | None) -> np.ndarray:
    """All slice positions, or ``max_slices`` evenly spread (bin centres: ends are not favoured)."""
    if max_slices is None or max_slices >= length:
        return np.arange(length)
    if max_slices < 1:
        raise ConfigError(f"max_slices must be at least 1, got {max_slices}")
    return ((np.arange(max_slices) + 0.5) * length / max_slices).astype(np.int64)


def volume_planes(
    volumes: np.ndarray, mode: str, max_slices: int | None = None
) -> list[np.ndarray]:
    """Per plane, the slices of a (B, D, H, W) batch as (B, S, h, w): axial (H, W) images, coronal
    (D, W), sagittal (D, H)."""
    _check_volume_mode(mode)
    if volumes.ndim != 4:
        raise DataError(f"volume batches must be (B, D, H, W), got shape {volumes.shape}")
    planes = []
    for axis in PLANE_AXES[mode]:
        picked = np.take(volumes, slice_indices(volumes.shape[axis], max_slices), axis=axis)
        planes.append(np.moveaxis(picked, axis, 1))
    return planes


def _check_volume_mode(mode: str) -> None:
    if mode not in PLANE_AXES:
        raise ConfigError(f"volume_mode must be one of {tuple(PLANE_AXES)}, got {mode!r}")


def memory_format_for(model: nn.Module) -> torch.memory_format:
    """Channels-last for CNNs (about 2x faster on oneDNN CPUs and cuDNN); ViTs, whose only
    convolution is the patch embedding, stay contiguous (channels-last slows them a little)."""
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    return torch.channels_last if convs > 1 else torch.contiguous_format


def looks_like_volumes(batch: np.ndarray) -> bool:
    """(B, D, H, W) rather than channel-last colour (B, H, W, C) with C in 1, 3, 4."""
    return batch.ndim == 4 and batch.shape[-1] not in (1, 3, 4)


def extract_features(
    backbone: Backbone,
    images: Any,
    preprocess: Preprocess,
    *,
    batch_size: int = 64,
    precision: Precision | str = "auto",
    volume_mode: VolumeMode | str = "axial",
    max_slices: int | None = None,
    is_volume: bool | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "features",
) -> np.ndarray:
    """Embed every item of ``images`` (array, memmap, or ``source[int_array] -> batch``).

    Returns (N, feature_dim) float32. Only one batch of images (``batch_size`` 2D images, or
    enough volumes to give about ``batch_size`` slices) is in memory at a time. ``is_volume``
    defaults to guessing from the batch shape; pass ``dataset.info.ndim == 3`` to be explicit.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    _check_volume_mode(volume_mode)  # even for 2D data: a typo should not wait for a 3D run
    dev = resolve_device(device)
    use_bf16 = resolve_precision(precision, dev) == "bf16"
    n = len(images)
    out = np.empty((n, backbone.feature_dim), dtype=np.float32)
    if n == 0:
        return out
    layout = memory_format_for(backbone)
    backbone.to(dev, memory_format=layout).eval()
    embed = _Embedder(backbone, preprocess, dev, batch_size, layout)
    first = np.asarray(images[np.array([0])])
    volumes = looks_like_volumes(first) if is_volume is None else is_volume
    step = batch_size
    if volumes:
        slices_each = sum(p.shape[1] for p in volume_planes(first, volume_mode, max_slices))
        step = max(1, batch_size // slices_each)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if use_bf16 else None
    with (
        torch.inference_mode(),
        _flush_denormals(),
        autocast or contextlib.nullcontext(),
        tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar,
    ):
        for start in range(0, n, step):
            index = np.arange(start, min(start + step, n))
            batch = np.asarray(images[index])
            if batch.shape[0] != len(index):
                raise DataError(f"source returned {batch.shape[0]} items for {len(index)} indices")
            out[index] = embed.volumes(batch, volume_mode, max_slices) if volumes else embed(batch)
            release_mapped_pages(images)
            bar.update(len(index))
    return out


def release_mapped_pages(images: Any) -> None:
    """Drop the pages of a memory-mapped source that this process has read.

    Pages of a memmap that were read stay mapped and count as this process's memory until the
    kernel needs them back, so memory would grow with the dataset. The file stays in the page
    cache, so reading a page again costs no disk access.
    """
    mapping = getattr(images, "_mmap", None)
    if isinstance(mapping, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


@contextlib.contextmanager
def _flush_denormals() -> Iterator[None]:
    """Randomly initialised controls can produce denormal floats, which CPUs process up to
    100x slower; flushing them to zero changes no feature measurably."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


class _Embedder:
    """Preprocess + forward in chunks of ``batch_size`` images, returning float32 numpy."""

    def __init__(
        self,
        backbone: Backbone,
        preprocess: Preprocess,
        device: torch.device,
        batch_size: int,
        layout: torch.memory_format,
    ) -> None:
        self.backbone, self.preprocess = backbone, preprocess
        self.device, self.batch_size, self.layout = device, batch_size, layout

    def __call__(self, images: np.ndarray) -> np.ndarray:
        chunks = []
        for start in range(0, len(images), self.batch_size):
            x = torch.as_tensor(self.preprocess(images[start : start + self.batch_size]))
            x = x.to(self.device, dtype=torch.float32, non_blocking=True)
            x = x.contiguous(memory_format=self.layout)
            chunks.append(self.backbone.embed(x).float().cpu().numpy())
        return np.concatenate(chunks)

    def volumes(self, volumes: np.ndarray, mode: str, max_slices: int | None) -> np.ndarray:
        """Mean over all slices of all requested planes, per volume."""
        total = np.zeros((len(volumes), self.backbone.feature_dim), dtype=np.float64)
        count = 0
        for plane in volume_planes(volumes, mode, max_slices):
            b, s = plane.shape[:2]
            feats = self(np.ascontiguousarray(plane).reshape(b * s, *plane.shape[2:]))
            total += feats.reshape(b, s, -1).sum(axis=1)
            count += s
        return (total / count).astype(np.float32)
