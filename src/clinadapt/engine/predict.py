"""Predictions of a trained model, streamed batch by batch: class probabilities, or label maps."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from clinadapt.data.info import TaskType
from clinadapt.data.transforms import SegmentationPreprocess
from clinadapt.engine.batches import Collate, SliceMean
from clinadapt.engine.precision import memory_format_for
from clinadapt.errors import ConfigError
from clinadapt.tasks import task_for


def predict_proba(
    model: nn.Module,
    images: Any,
    *,
    task: TaskType | str,
    preprocess: Callable[[np.ndarray], Any],
    batch_size: int = 64,
    precision: str = "fp32",
    volume: bool = False,
    max_slices: int = 0,
    progress: bool = True,
) -> np.ndarray:
    """(N, num_classes) float64 probabilities (softmax; per-label sigmoid for multi-label) of
    ``model`` in eval mode on its own device; ``precision`` is ``train``'s resolved one (bf16 /
    fp16 autocast, or fp32). Volumes are handled as in training (slice logits averaged)."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    task_type = TaskType(task)
    scores = task_for(task_type).scores
    device = next(model.parameters()).device
    net = (SliceMean(model) if volume else model).eval()
    layout = memory_format_for(model)
    collate = Collate(preprocess, volume, max_slices)
    n, chunks = len(images), []
    with (
        torch.inference_mode(),
        _autocast(precision, device),
        tqdm(total=n, desc="predict", unit="img", disable=not progress) as bar,
    ):
        for start in range(0, n, batch_size):
            x = collate.images(np.asarray(images[np.arange(start, min(start + batch_size, n))]))
            x = x.to(device, memory_format=layout if x.ndim == 4 else torch.contiguous_format)
            chunks.append(scores(net(x), task_type).double().cpu().numpy())
            bar.update(len(x))
    return np.concatenate(chunks) if chunks else np.empty((0, 0))


def predict_masks(
    model: nn.Module,
    images: Any,
    *,
    preprocess: SegmentationPreprocess,
    batch_size: int = 16,
    precision: str = "fp32",
    slices: bool = False,
    progress: bool = True,
) -> list[np.ndarray]:
    """Predicted uint8 label maps of every case of ``images`` at the case's own shape: each case
    (or, with ``slices``, each axial slice of a volume, predicted as a 2D image and stacked back)
    is brought to the network's shape by ``preprocess``, and the argmax map restored by its
    ``PairResize`` (nearest, or the pad cropped off)."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    net, layout = model.eval(), memory_format_for(model)
    out = []
    with (
        torch.inference_mode(),
        _autocast(precision, device),
        tqdm(total=len(images), desc="predict", unit="case", disable=not progress) as bar,
    ):
        for i in range(len(images)):
            case = np.asarray(images[i])
            items = list(case) if slices else [case]
            maps = []
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                x, _ = preprocess(chunk)
                x = x.to(device, memory_format=layout if x.ndim == 4 else torch.contiguous_format)
                labels = net(x).argmax(dim=1).to(torch.uint8).cpu().numpy()
                maps += [
                    preprocess.pair.restore(m, item.shape[: preprocess.ndim])
                    for m, item in zip(labels, chunk, strict=True)
                ]
            out.append(np.stack(maps) if slices else maps[0])
            bar.update(1)
    return out


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 / fp16 autocast as in training, or nothing for fp32."""
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in ("fp32", *dtypes):
        raise ConfigError(f"precision must be bf16, fp16 or fp32 (as trained), got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtypes[precision])
