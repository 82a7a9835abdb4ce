"""Gradient training of an adapted model (LoRA, adapters, prompts, BitFit, full fine-tuning).

Built on Hugging Face ``accelerate``: the same call trains on a CPU, one GPU, or several under
``accelerate launch`` (DDP; each process gets ``batch_size`` examples per step). Only the
parameters a method left trainable are optimised; frozen parameters keep their values bit for
bit, and BatchNorm layers with no trainable parameter stay in eval mode so their running
statistics do not drift towards the small medical training set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from clinadapt.config import to_dict
from clinadapt.data.info import TaskType
from clinadapt.data.transforms import VolumePreprocess
from clinadapt.engine.augment import resolve_augment
from clinadapt.engine.batches import ArraySource, SliceMean, collate_for, is_grayscale
from clinadapt.engine.loop import Loop, freezes_norm_statistics
from clinadapt.engine.precision import (
    decide_precision,
    forward_in,
    resolve_device,
    resolve_precision,
)
from clinadapt.engine.predict import predict_proba
from clinadapt.engine.runtime import accelerator_session, deterministic_kernels
from clinadapt.engine.train_config import EpochCallback, TrainConfig, TrainResult
from clinadapt.errors import ConfigError, DataError
from clinadapt.tasks import Task, task_for

if TYPE_CHECKING:
    from clinadapt.adapt.finetune import AdaptedModel

__all__ = ["predict_proba", "train"]


def train(
    model: AdaptedModel | nn.Module,
    train: tuple[Any, np.ndarray],
    val: tuple[Any, np.ndarray] | None,
    *,
    task: TaskType | str,
    num_classes: int,
    preprocess: Callable[[np.ndarray], Any],
    config: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    volume: bool = False,
    on_epoch_end: EpochCallback | None = None,
) -> TrainResult:
    """Train ``model`` in place and leave it in eval mode with the best epoch's weights.

    ``train`` / ``val`` are ``(images, labels)``: an indexable source of (H, W), (H, W, C) or,
    with ``volume``, (D, H, W) images, and int64 labels ((N, 1) class indices or (N, C) 0/1).
    ``model`` maps a ``preprocess``-ed batch to (B, num_classes) logits; volumes go through it
    slice by slice with the logits averaged. The best epoch is chosen on ``val`` by
    ``config.select_metric`` (the last epoch without ``val``). ``out_dir`` receives
    ``history.json``, ``curves.png`` and ``checkpoint/``; ``resume`` continues from that
    checkpoint (a different configuration is a ``ConfigError``). ``on_epoch_end(epoch, row)``
    runs after each epoch's checkpoint is written.
    """
    task_type = TaskType(task)
    kind = task_for(task_type)
    _check_task_options(kind, config)
    native = isinstance(getattr(preprocess, "normalise", preprocess), VolumePreprocess)
    train_split = _checked(train, kind, task_type, num_classes, "train", volume, native)
    val_split = (
        _checked(val, kind, task_type, num_classes, "val", volume, native)
        if val is not None
        else None
    )
    device = torch.device("cpu") if config.device == "cpu" else resolve_device()
    probe = _first_batch_probe(model, train_split, kind, preprocess, config, volume, device)
    check = decide_precision(config.precision, device, probe)
    precision = training_precision(check.used, device)
    augment = resolve_augment(
        config.augment, config.augment_options, grayscale=is_grayscale(train_split[0], volume)
    )
    with (
        accelerator_session(precision, config.device, config.grad_accumulation) as accelerator,
        deterministic_kernels(config.deterministic),
        _grad_checkpointing(model, config) as checkpointing,
    ):
        resolved = {
            **to_dict(config),
            "precision": precision,
            "augment_options": asdict(augment),
            "task": task_type.value,
            "num_classes": num_classes,
            "train_size": len(train_split[1]),
            "val_size": 0 if val_split is None else len(val_split[1]),
            "volume": volume,
            "world_size": accelerator.num_processes,
            "trainable": _trainable_digest(model),
            "gradient_checkpointing": checkpointing,
        }
        for speed_only in ("num_workers", "compile"):
            resolved.pop(speed_only)
        loop = Loop(
            accelerator,
            model,
            train_split,
            val_split,
            task=kind,
            task_type=task_type,
            num_classes=num_classes,
            preprocess=preprocess,
            config=config,
            augment=augment,
            resolved=resolved,
            out_dir=Path(out_dir),
            volume=volume,
            progress=progress,
        )
        result = loop.run(resume=resume, on_epoch_end=on_epoch_end)
    return dataclasses.replace(
        result, precision_check=check.to_dict(), gradient_checkpointing=checkpointing
    )


def _checked(
    split: tuple[Any, np.ndarray],
    task: Task,
    task_type: TaskType,
    num_classes: int,
    name: str,
    volume: bool,
    native: bool = False,
) -> tuple[Any, np.ndarray]:
    images, labels = split
    labels = task.check_targets(labels, task_type, num_classes, f"{name} labels")
    if len(images) != len(labels):
        raise DataError(f"{name}: {len(images)} images but {len(labels)} labels")
    if len(labels) == 0:
        raise DataError(f"{name}: no examples")
    shape = np.asarray(images[0]).shape
    if volume and len(shape) != 3:
        raise DataError(f"{name}: volumes must be (N, D, H, W), got items of shape {shape}")
    if not volume and not native and len(shape) == 3 and shape[-1] not in (1, 3):
        raise DataError(f"{name}: items of shape {shape} look like volumes; pass volume=True")
    return images, labels


def _check_task_options(task: Task, config: TrainConfig) -> None:
    if config.select_metric not in task.select_metrics:
        raise ConfigError(
            f"select_metric={config.select_metric!r} is not a {task.name} validation metric; "
            f"choose one of {list(task.select_metrics)}"
        )
    if task.dense_targets and config.class_balance == "sampler":
        raise ConfigError(
            f"class_balance='sampler' draws images by their class, which {task.name} images do "
            "not have; use class_balance='none'"
        )


def _trainable_digest(model: nn.Module) -> str:
    """Names and shapes of what trains: another method or model cannot resume this run."""
    trainable = [(n, list(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
    text = json.dumps([type(model).__name__, trainable])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def training_precision(precision: str, device: torch.device) -> str:
    """``bf16``, ``fp16`` or ``fp32``; fp16 needs a GradScaler, which accelerate runs on CUDA."""
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError(
                "precision='fp16' needs a CUDA GPU; use precision='bf16' or 'fp32' here"
            )
        return precision
    return resolve_precision(precision, device)


def _first_batch_probe(
    model: nn.Module,
    split: tuple[Any, np.ndarray],
    task: Task,
    preprocess: Callable[[np.ndarray], Any],
    config: TrainConfig,
    volume: bool,
    device: torch.device,
) -> Callable[[str], np.ndarray]:
    """What ``precision=auto`` compares in fp32 and bf16: the features of the model's backbone
    (its output when it has none; its dense map, flattened, for dense tasks: pooling would
    average away the per-pixel differences that decide a mask) on the first training batch,
    prepared as for training."""
    body = model.backbone if isinstance(getattr(model, "backbone", None), nn.Module) else model
    if task.dense_targets and callable(getattr(body, "dense", None)):
        body = _DenseFeatures(body)
    net = SliceMean(body) if volume else body

    @functools.cache
    def first_batch() -> torch.Tensor:
        source = ArraySource(*split)
        items = [source[i] for i in range(min(len(source), config.batch_size))]
        return collate_for(task, preprocess, volume, config.max_slices)(items)[0]

    def probe(precision: str) -> np.ndarray:
        return forward_in(net, first_batch(), precision, device)

    return probe


class _DenseFeatures(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.dense(images).flatten(1)


@contextlib.contextmanager
def _grad_checkpointing(model: nn.Module, config: TrainConfig) -> Iterator[bool]:
    """timm's ``set_grad_checkpointing`` on the outermost module offering it, for the run;
    yields whether it is on.

    ``auto`` turns it on for methods that freeze part of the model (LoRA, adapters, prompts,
    BitFit, a head alone): their optimiser state is small, so the activations kept for the
    backward pass are most of the memory, and recomputing each block's forward gives the same
    gradients. It stays off for full fine-tuning; where this timm cannot checkpoint without
    re-entrance (a frozen block's input needs no gradient, so a re-entrant checkpoint would
    drop the gradients of the adapter layers inside it); and where a batch norm updates its
    running statistics (the recomputed forward would update them twice).
    """
    setting = config.gradient_checkpointing
    owner = next(
        (m for m in model.modules() if callable(getattr(m, "set_grad_checkpointing", None))), None
    )
    reentrance = _reentrance_switch() if setting else None
    if setting == "auto":
        setting = (
            owner is not None
            and reentrance is not None
            and any(not p.requires_grad for p in model.parameters())
            and not _updates_norm_statistics(model, config.norm_statistics)
        )
    if not setting:
        yield False
        return
    message = (
        f"gradient_checkpointing=true is not supported by {type(model).__name__}: it needs a "
        "timm model with set_grad_checkpointing(); set gradient_checkpointing=false"
    )
    if owner is None:
        raise ConfigError(message)
    with reentrance or contextlib.nullcontext():
        try:
            owner.set_grad_checkpointing(True)
        except (NotImplementedError, AssertionError) as err:
            raise ConfigError(f"{message} ({err})") from None
        try:
            yield True
        finally:
            owner.set_grad_checkpointing(False)


def _reentrance_switch() -> contextlib.AbstractContextManager[None] | None:
    """A context in which timm checkpoints without re-entrance, or None where this timm cannot
    be told (its checkpoints then follow torch's default)."""
    import timm.layers

    use = getattr(timm.layers, "use_reentrant_ckpt", None)
    set_ = getattr(timm.layers, "set_reentrant_ckpt", None)
    if use is None or set_ is None:
        return None

    @contextlib.contextmanager
    def switched() -> Iterator[None]:
        before = use()
        set_(False)
        try:
            yield
        finally:
            set_(before)

    return switched()


def _updates_norm_statistics(model: nn.Module, mode: str) -> bool:
    """Whether a batch norm will update its running statistics while training (one with a
    trainable parameter, unless ``norm_statistics`` freezes them all; see ``Loop``)."""
    if freezes_norm_statistics(model, mode):
        return False
    return any(
        isinstance(m, nn.modules.batchnorm._NormBase)
        and m.track_running_stats
        and any(p.requires_grad for p in m.parameters(recurse=False))
        for m in model.modules()
    )
