"""Which precision a run uses: ``auto`` takes bf16 only where it does not change the features.

bf16 keeps 8 mantissa bits. On some backbone and data pairs that is harmless; on others it
moves the features far enough to change results. So the hardware alone cannot decide: ``auto``
runs a probe batch of the run's own data in fp32 and under bf16 autocast and keeps bf16 only
when every probe image agrees to a cosine of at least ``AUTO_MIN_COSINE``. The decision, with
the measured agreement, goes into every record.

Why 0.99 (benchmarks/results/bf16.json, real MedMNIST at 28 px on an AMX CPU): the shipped
ImageNet MobileNets on 2D images have probe minima from 0.85 to 0.987, and there bf16 costs
results (the BreastMNIST linear probe fitted on fp32 features scores AUC 0.925 on them and 0.862
on bf16 ones for MobileNetV2 PTQ; 0.864 against 0.845 for the TFLite MobileNetV2, minimum 0.98).
The random-init control (0.9999) and the slice-pooled AdrenalMNIST3D features of two of the
MobileNets (0.998) change nothing measurable and keep bf16's speed. 0.99 lies between the groups.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from clinadapt.errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp32")
AUTO_MIN_COSINE = 0.99
Probe = Callable[[str], np.ndarray]  # precision ("fp32" / "bf16") -> (n, ...) outputs


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


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def resolve_precision(precision: str, device: str | torch.device | None = None) -> str:
    """``bf16`` or ``fp32`` from the hardware alone: ``auto`` is bf16 where the device runs it
    natively. Runs decide with ``decide_precision``, which also checks the data."""
    check_precision(precision)
    if precision != "auto":
        return precision
    return "bf16" if bf16_supported(resolve_device(device)) else "fp32"


@dataclass(frozen=True)
class PrecisionDecision:
    """What was asked, what is used and why; the agreement fields are set when ``auto`` measured
    it (per-image cosine between fp32 and bf16 outputs on ``probe_images`` probe images)."""

    requested: str
    used: str
    reason: str
    cosine_mean: float | None = None
    cosine_min: float | None = None
    threshold: float | None = None
    probe_images: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide_precision(
    requested: str,
    device: str | torch.device | None,
    probe: Probe,
    *,
    threshold: float = AUTO_MIN_COSINE,
) -> PrecisionDecision:
    """An explicit precision as given (``probe`` is not run); ``auto``: fp32 where bf16 is not
    native, else bf16 only when ``probe("bf16")`` agrees with ``probe("fp32")`` row by row to a
    cosine of at least ``threshold``."""
    if requested != "auto":
        return PrecisionDecision(requested, requested, "requested explicitly")
    dev = resolve_device(device)
    if not bf16_supported(dev):
        return PrecisionDecision(requested, "fp32", f"bf16 is not native on this {dev.type}")
    cosines = row_cosine(probe("fp32"), probe("bf16"))
    if len(cosines) == 0:
        return PrecisionDecision(requested, "fp32", "no data to compare fp32 and bf16 on")
    low, mean = float(cosines.min()), float(cosines.mean())
    agrees = low >= threshold
    reason = (
        f"bf16 {'agrees' if agrees else 'disagrees'} with fp32 on the probe batch: "
        f"min per-image cosine {low:.4f} {'>=' if agrees else '<'} {threshold}"
    )
    return PrecisionDecision(
        requested,
        "bf16" if agrees else "fp32",
        reason,
        cosine_mean=mean,
        cosine_min=low,
        threshold=threshold,
        probe_images=len(cosines),
    )


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b`` (float64; two zero
    rows agree, a zero row against a non-zero one does not)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a, b = a.reshape(len(a), a[:1].size), b.reshape(len(b), b[:1].size)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = ~a.any(axis=1) & ~b.any(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(norms > 0, (a * b).sum(axis=1) / norms, 0.0)
    return np.where(both_zero, 1.0, np.nan_to_num(cos, nan=0.0))


def forward_in(net: nn.Module, x: torch.Tensor, precision: str, device: torch.device) -> np.ndarray:
    """``net(x)`` on ``device`` in eval mode, under bf16 autocast when ``precision`` is bf16:
    the probe of a model about to train there."""
    layout = memory_format_for(net)
    net.to(device, memory_format=layout).eval()
    x = x.to(device, dtype=torch.float32)
    x = x.contiguous(memory_format=layout) if x.ndim == 4 else x
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )
    with torch.inference_mode(), autocast:
        return net(x).float().cpu().numpy()


def memory_format_for(model: nn.Module) -> torch.memory_format:
    """Channels-last for CNNs (about 2x faster on oneDNN CPUs and cuDNN); ViTs, whose only
    convolution is the patch embedding, stay contiguous (channels-last slows them a little)."""
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    return torch.channels_last if convs > 1 else torch.contiguous_format
