"""Probabilities from a trained model, streamed batch by batch like feature extraction."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from clinadapt.data.info import TaskType
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
    if precision not in ("bf16", "fp16", "fp32"):
        raise ConfigError(f"precision must be bf16, fp16 or fp32 (as trained), got {precision!r}")
    task_type = TaskType(task)
    scores = task_for(task_type).scores
    device = next(model.parameters()).device
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    autocast = (
        torch.autocast(device.type, dtype=dtypes[precision])
        if precision in dtypes
        else contextlib.nullcontext()
    )
    net = (SliceMean(model) if volume else model).eval()
    layout = memory_format_for(model)
    collate = Collate(preprocess, volume, max_slices)
    n, chunks = len(images), []
    with (
        torch.inference_mode(),
        autocast,
        tqdm(total=n, desc="predict", unit="img", disable=not progress) as bar,
    ):
        for start in range(0, n, batch_size):
            x = collate.images(np.asarray(images[np.arange(start, min(start + batch_size, n))]))
            x = x.to(device, memory_format=layout if x.ndim == 4 else torch.contiguous_format)
            chunks.append(scores(net(x), task_type).double().cpu().numpy())
            bar.update(len(x))
    return np.concatenate(chunks) if chunks else np.empty((0, 0))
