"""Streaming (bf16-capable) feature extraction and the on-disk feature cache."""

from clinadapt.engine.cache import FeatureCache, default_cache_root
from clinadapt.engine.features import (
    Precision,
    VolumeMode,
    extract_features,
    extraction_precision,
    slice_indices,
    volume_planes,
)
from clinadapt.engine.precision import (
    AUTO_MIN_COSINE,
    PrecisionDecision,
    bf16_supported,
    decide_precision,
    resolve_device,
    resolve_precision,
)

__all__ = [
    "AUTO_MIN_COSINE",
    "FeatureCache",
    "Precision",
    "PrecisionDecision",
    "VolumeMode",
    "bf16_supported",
    "decide_precision",
    "default_cache_root",
    "extract_features",
    "extraction_precision",
    "resolve_device",
    "resolve_precision",
    "slice_indices",
    "volume_planes",
]
