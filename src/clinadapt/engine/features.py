"""Streaming feature extraction: batches in, (N, D) float32 out; memory bounded by the batch.

2D images go through the backbone directly. 3D volumes (B, D, H, W) go through the 2D backbone
as grayscale slices along one or all three orthogonal planes and are mean-pooled per volume.
Slices of a batch's volumes that are identical (the empty slices around an organ or a vessel,
two thirds of adrenalmnist3d's axial slices) are embedded once: a backbone in eval mode embeds
each image on its own, so the features are the same (to float rounding) for less compute.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from clinadapt.data.array_cache import release_mapped_pages
from clinadapt.data.dataset import Subset
from clinadapt.engine.cache import FeatureCache, array_sha256
from clinadapt.engine.distributed import from_first, gather_rows, launched, shard
from clinadapt.engine.precision import (
    PrecisionDecision,
    check_precision,
    decide_precision,
    memory_format_for,
    resolve_device,
)
from clinadapt.errors import ConfigError, DataError

if TYPE_CHECKING:  # clinadapt.backbones imports timm: keep `import clinadapt.engine` light
    from clinadapt.backbones.base import Backbone

Precision = Literal["auto", "bf16", "fp32"]
VolumeMode = Literal["axial", "coronal", "sagittal", "planes"]
Preprocess = Callable[[np.ndarray], Any]  # numpy batch -> (B, 3, S, S) float tensor
PLANE_AXES = {"axial": (1,), "coronal": (2,), "sagittal": (3,), "planes": (1, 2, 3)}


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


def unique_slices(slices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct slices of (N, h, w) ``slices`` (byte for byte), and for each slice the index
    of its copy among them: ``unique[inverse]`` equals ``slices``."""
    rows = np.ascontiguousarray(slices).reshape(len(slices), -1)
    keys = rows.view(np.dtype((np.void, rows.shape[1] * rows.itemsize)))[:, 0]
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    return slices[first], inverse.reshape(-1)


def _check_volume_mode(mode: str) -> None:
    if mode not in PLANE_AXES:
        raise ConfigError(f"volume_mode must be one of {tuple(PLANE_AXES)}, got {mode!r}")


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
    distributed: bool = False,
) -> np.ndarray:
    """Embed every item of ``images`` (array, memmap, or ``source[int_array] -> batch``).

    Returns (N, feature_dim) float32. Only one batch of images (``batch_size`` 2D images, or
    enough volumes to give about ``batch_size`` slices) is in memory at a time. ``is_volume``
    defaults to guessing from the batch shape; pass ``dataset.info.ndim == 3`` to be explicit.
    ``precision="auto"`` is decided by ``extraction_precision`` on the first batch.
    ``distributed``: in a multi-process launch (``accelerate launch``, ``torchrun``), where
    every process calls this with the same images, each embeds a contiguous share of them and
    all return all the features; elsewhere it changes nothing.
    """
    check_precision(precision)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    _check_volume_mode(volume_mode)  # even for 2D data: a typo should not wait for a 3D run
    if distributed and launched():
        options = {"volume_mode": volume_mode, "max_slices": max_slices, "is_volume": is_volume}
        return _extract_share(
            backbone, images, preprocess, precision, batch_size, device, progress, desc, options
        )
    dev = resolve_device(device)
    n = len(images)
    out = np.empty((n, backbone.feature_dim), dtype=np.float32)
    if n == 0:
        return out
    volumes, step = _batch_plan(images, batch_size, volume_mode, max_slices, is_volume)
    done = 0
    if precision == "auto":
        options = {"volume_mode": volume_mode, "max_slices": max_slices, "is_volume": volumes}
        decision, probed = _probe_first_batch(
            backbone, images, preprocess, "auto", batch_size, dev, None, options
        )
        precision = decision.used
        if precision in probed:  # the probe already embedded the first batch this way
            done = len(probed[precision])
            out[:done] = probed[precision]
    layout = memory_format_for(backbone)
    backbone.to(dev, memory_format=layout).eval()
    embed = _Embedder(backbone, preprocess, dev, batch_size, layout)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16" else None
    with (
        torch.inference_mode(),
        _flush_denormals(),
        autocast or contextlib.nullcontext(),
        tqdm(total=n, initial=done, desc=desc, unit="img", disable=not progress) as bar,
    ):
        for start in range(done, n, step):
            index = np.arange(start, min(start + step, n))
            batch = np.asarray(images[index])
            if batch.shape[0] != len(index):
                raise DataError(f"source returned {batch.shape[0]} items for {len(index)} indices")
            out[index] = embed.volumes(batch, volume_mode, max_slices) if volumes else embed(batch)
            release_mapped_pages(images)
            bar.update(len(index))
    return out


def _extract_share(
    backbone: Backbone,
    images: Any,
    preprocess: Preprocess,
    precision: str,
    batch_size: int,
    device: str | torch.device | None,
    progress: bool,
    desc: str,
    options: dict[str, Any],
) -> np.ndarray:
    """``extract_features(distributed=True)`` in a launch: this process's rows, then all rows."""
    if precision == "auto":  # one decision for all, on the first batch of all the images
        decision = extraction_precision(
            backbone,
            images,
            preprocess,
            batch_size=batch_size,
            device=device,
            distributed=True,
            **options,
        )
        precision = decision.used
    rows = shard(len(images))
    part = (
        images[rows.start : rows.stop]  # a memmap's slice is a memmap: its pages get released
        if isinstance(images, np.ndarray)
        else Subset(images, np.arange(rows.start, rows.stop))
    )
    local = extract_features(
        backbone,
        part,
        preprocess,
        batch_size=batch_size,
        precision=precision,
        device=device,
        progress=progress,
        desc=desc,
        **options,
    )
    return gather_rows(local, len(images))


def extraction_precision(
    backbone: Backbone,
    images: Any,
    preprocess: Preprocess,
    *,
    precision: Precision | str = "auto",
    batch_size: int = 64,
    volume_mode: VolumeMode | str = "axial",
    max_slices: int | None = None,
    is_volume: bool | None = None,
    device: str | torch.device | None = None,
    cache: FeatureCache | None = None,
    distributed: bool = False,
) -> PrecisionDecision:
    """The precision ``extract_features`` should use on ``images`` with these options.

    ``auto`` embeds the first extraction batch (``batch_size`` images, or the volumes that fill
    one batch of slices) through ``extract_features`` in fp32 and in bf16 and keeps bf16 only
    when they agree (``engine.precision.decide_precision``). With ``cache``, the two probe
    embeddings are stored like features, so a cached run repeats the decision without a forward.
    ``distributed``: in a multi-process launch, every process takes the first one's decision,
    and only the first reads and writes the cache.
    """
    check_precision(precision)
    options = {"volume_mode": volume_mode, "max_slices": max_slices, "is_volume": is_volume}
    dev = resolve_device(device)
    decision = _probe_first_batch(
        backbone, images, preprocess, precision, batch_size, dev, cache, options, distributed
    )[0]
    return from_first(decision) if distributed else decision


def _probe_first_batch(
    backbone: Backbone,
    images: Any,
    preprocess: Preprocess,
    precision: str,
    batch_size: int,
    device: torch.device,
    cache: FeatureCache | None,
    options: dict[str, Any],
    shared: bool = False,
) -> tuple[PrecisionDecision, dict[str, np.ndarray]]:
    """``extraction_precision``'s decision, and the first batch's embeddings by the precisions
    the probe ran (none when it did not run), which ``extract_features`` keeps."""
    probed: dict[str, np.ndarray] = {}

    @functools.cache
    def first_batch() -> tuple[np.ndarray, dict[str, Any]]:
        volumes, step = _batch_plan(images, batch_size, **options)
        items = np.asarray(images[np.arange(min(step, len(images)))])
        return items, {**options, "is_volume": volumes}

    def probe(probe_precision: str) -> np.ndarray:
        if len(images) == 0:
            return np.empty((0, backbone.feature_dim), dtype=np.float32)
        items, settled = first_batch()

        def compute() -> np.ndarray:
            return extract_features(
                backbone,
                items,
                preprocess,
                batch_size=batch_size,
                precision=probe_precision,
                device=device,
                progress=False,
                **settled,
            )

        if cache is None:
            probed[probe_precision] = compute()
            return probed[probe_precision]
        describe = getattr(preprocess, "describe", None)
        parts = {
            "probe_sha256": array_sha256(items),
            "probe_shape": list(items.shape),
            "backbone": backbone.name,
            "weights_id": backbone.weights_id,
            "model_kwargs": backbone.model_kwargs,
            "preprocess": describe() if callable(describe) else repr(preprocess),
            "precision": probe_precision,
            "device": device.type,
            "torch": torch.__version__,
            **settled,
        }
        return cache.get_or_compute(parts, compute, shared=shared)[0]

    return decide_precision(precision, device, probe), probed


def _batch_plan(
    images: Any,
    batch_size: int,
    volume_mode: str,
    max_slices: int | None,
    is_volume: bool | None,
) -> tuple[bool, int]:
    """(volumes?, items per extraction batch): volumes fill a batch with their slices."""
    if is_volume is False:
        return False, batch_size
    first = np.asarray(images[np.array([0])])
    if not (is_volume or looks_like_volumes(first)):
        return False, batch_size
    slices_each = sum(p.shape[1] for p in volume_planes(first, volume_mode, max_slices))
    return True, max(1, batch_size // slices_each)


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
        """Mean over all slices of all requested planes, per volume; each distinct slice of the
        batch is embedded once."""
        total = np.zeros((len(volumes), self.backbone.feature_dim), dtype=np.float64)
        count = 0
        for plane in volume_planes(volumes, mode, max_slices):
            b, s = plane.shape[:2]
            distinct, inverse = unique_slices(plane.reshape(b * s, *plane.shape[2:]))
            feats = self(distinct)[inverse]
            total += feats.reshape(b, s, -1).sum(axis=1)
            count += s
        return (total / count).astype(np.float32)
