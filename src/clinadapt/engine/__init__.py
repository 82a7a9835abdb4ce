"""Streaming (bf16-capable) feature extraction and the on-disk feature cache."""

from clinadapt.engine.cache import FeatureCache, default_cache_root
from clinadapt.engine.features import (
    Precision,
    VolumeMode,
    bf16_supported,
    extract_features,
    resolve_device,
    resolve_precision,
    slice_indices,
    volume_planes,
)

__all__ = [
    "FeatureCache",
    "Precision",
    "VolumeMode",
    "bf16_supported",
    "default_cache_root",
    "extract_features",
    "resolve_device",
    "resolve_precision",
    "slice_indices",
    "volume_planes",
]
