"""Batches for the training loop: indexable numpy sources in, normalised tensors out.

Images are read one at a time (memory-mapped arrays stay on disk) and preprocessed in the
collate function, so with ``num_workers > 0`` decoding and resizing happen in worker processes.
The epoch order comes from a numpy generator whose state is checkpointed, so a resumed run sees
the same batches as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Sampler

from clinadapt.data.checks import class_frequencies
from clinadapt.data.info import TaskType
from clinadapt.data.transforms import PairPreprocess
from clinadapt.engine.features import slice_indices
from clinadapt.errors import ConfigError, DataError
from clinadapt.tasks import Task


class ArraySource(Dataset):
    """``(image, label row, index)`` per example of an indexable image source."""

    def __init__(self, images: Any, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, int]:
        return np.asarray(self.images[i]), self.labels[i], i


class Collate:
    """Stacks examples and preprocesses them: (B, 3, S, S), or (B, 3, D, S, S) for volumes whose
    axial slices (``max_slices`` evenly spread, 0 for all) are preprocessed as 2D images."""

    def __init__(
        self, preprocess: Callable[[np.ndarray], Any], volume: bool, max_slices: int
    ) -> None:
        self.preprocess, self.volume, self.max_slices = preprocess, volume, max_slices

    def __call__(
        self, items: list[tuple[np.ndarray, np.ndarray, int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        try:
            images = np.stack([item[0] for item in items])
        except ValueError:
            shapes = sorted({item[0].shape for item in items})
            raise DataError(
                f"images in one batch differ in shape {shapes}; bring them to one size first"
            ) from None
        labels = torch.from_numpy(np.stack([item[1] for item in items]))
        index = torch.tensor([item[2] for item in items])
        return self.images(images), labels, index

    def images(self, images: np.ndarray) -> torch.Tensor:
        """A stacked numpy batch, preprocessed."""
        if not self.volume:
            return torch.as_tensor(self.preprocess(images)).float()
        if images.ndim != 4:
            raise DataError(f"volume batches must be (B, D, H, W), got shape {images.shape}")
        keep = slice_indices(images.shape[1], self.max_slices or None)
        b, d = images.shape[0], len(keep)
        slices = images[:, keep].reshape(b * d, *images.shape[2:])
        x = torch.as_tensor(self.preprocess(slices)).float()
        return x.view(b, d, *x.shape[1:]).transpose(1, 2).contiguous()


class PairCollate:
    """Segmentation batches: each image and its mask brought to the network's shape together by
    a ``PairPreprocess``; (x, y, index) with y the (B, *shape) int64 label maps."""

    def __init__(self, preprocess: PairPreprocess) -> None:
        self.preprocess = preprocess

    def __call__(
        self, items: list[tuple[np.ndarray, np.ndarray, int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = self.preprocess([item[0] for item in items], [item[1] for item in items])
        return x, y, torch.tensor([item[2] for item in items])


def collate_for(
    task: Task, preprocess: Callable[..., Any], volume: bool, max_slices: int
) -> Collate | PairCollate:
    """The batching of ``task``'s examples: images with label rows, or images with masks."""
    if not task.dense_targets:
        return Collate(preprocess, volume, max_slices)
    if not isinstance(preprocess, PairPreprocess):
        raise ConfigError(
            f"{task.name} trains on images and masks brought to one shape together: pass a "
            f"PairPreprocess (e.g. SegmentationPreprocess), not {type(preprocess).__name__}"
        )
    return PairCollate(preprocess)


class EpochSampler(Sampler[int]):
    """A fresh permutation each epoch, or, with ``weights``, ``n`` draws with replacement in
    proportion to them (class-balanced sampling), from a checkpointable numpy generator."""

    def __init__(self, n: int, seed: int, weights: np.ndarray | None = None) -> None:
        self.n, self.weights = n, weights
        self.rng = np.random.default_rng(seed)

    def __iter__(self) -> Iterator[int]:
        if self.weights is None:
            order = self.rng.permutation(self.n)
        else:
            order = self.rng.choice(self.n, size=self.n, replace=True, p=self.weights)
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.n

    def state(self) -> dict[str, Any]:
        return self.rng.bit_generator.state

    def load_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state


class SliceMean(nn.Module):
    """A 2D classifier applied to every slice of (B, C, D, H, W) volumes, logits averaged per
    volume. For a linear head this equals the head on mean-pooled slice features, which is how
    feature extraction embeds volumes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d = x.shape[:3]
        logits = self.model(x.transpose(1, 2).reshape(b * d, c, *x.shape[3:]))
        return logits.view(b, d, -1).mean(dim=1)


def is_grayscale(images: Any, volume: bool) -> bool:
    """Volumes and (H, W) or (H, W, 1) images are grayscale; (H, W, 3) images are colour."""
    if volume:
        return True
    first = np.asarray(images[0])
    return first.ndim == 2 or first.shape[-1] == 1


def balanced_sample_weights(labels: np.ndarray, task: TaskType, num_classes: int) -> np.ndarray:
    """Per-example draw probabilities that make every class (label) equally frequent.

    Multi-label: the mean inverse frequency of an example's positive labels; examples with no
    positive label count as one more group.
    """
    freq = class_frequencies(labels, task, num_classes)
    if task.single_label:
        weights = 1.0 / freq[labels[:, 0]]
    else:
        positives = labels.sum(axis=1)
        inverse = labels @ np.where(freq > 0, 1.0 / np.maximum(freq, 1), 0.0)
        empty = max(1, int((positives == 0).sum()))
        weights = np.where(positives > 0, inverse / np.maximum(positives, 1), 1.0 / empty)
    return weights / weights.sum()
