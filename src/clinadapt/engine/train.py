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
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from clinadapt.config import to_dict
from clinadapt.data.checks import check_labels
from clinadapt.data.info import TaskType
from clinadapt.data.transforms import VolumePreprocess
from clinadapt.engine.augment import AUGMENTS, resolve_augment
from clinadapt.engine.batches import Collate, SliceMean, is_grayscale
from clinadapt.engine.loop import Loop
from clinadapt.engine.precision import (
    decide_precision,
    forward_in,
    resolve_device,
    resolve_precision,
)
from clinadapt.engine.predict import predict_proba
from clinadapt.engine.runtime import accelerator_session, deterministic_kernels
from clinadapt.engine.schedule import OPTIMIZERS, SCHEDULES
from clinadapt.errors import ConfigError, DataError
from clinadapt.registry import did_you_mean

if TYPE_CHECKING:
    from clinadapt.adapt.finetune import AdaptedModel

__all__ = ["TrainConfig", "TrainResult", "predict_proba", "train"]

SELECT_METRICS = ("auc", "acc", "balanced_accuracy", "loss")
CLASS_BALANCE = ("none", "weights", "sampler")
TRAIN_PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DEVICES = ("auto", "cpu")
EpochCallback = Callable[[int, dict[str, Any]], None]


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class TrainConfig:
    """How to train; every field is part of the checkpoint's config hash except num_workers."""

    epochs: int = field(default=20, metadata=_help("training epochs"))
    batch_size: int = field(default=32, metadata=_help("examples per step and process"))
    lr: float = field(default=1e-3, metadata=_help("peak learning rate"))
    weight_decay: float = field(
        default=0.05, metadata=_help("weight decay (not applied to biases and norm weights)")
    )
    optimizer: str = field(default="adamw", metadata=_help("adamw | adam | sgd"))
    momentum: float = field(default=0.9, metadata=_help("SGD momentum (Nesterov when > 0)"))
    schedule: str = field(
        default="cosine",
        metadata=_help(
            "cosine (linear warm-up, then cosine to 0) | step (x gamma at milestones) | constant"
        ),
    )
    warmup_epochs: float = field(default=1.0, metadata=_help("warm-up length for cosine"))
    milestones: tuple[int, ...] = field(
        default=(50, 75), metadata=_help("epochs where the step schedule multiplies lr by gamma")
    )
    gamma: float = field(default=0.1, metadata=_help("step schedule decay factor"))
    grad_accumulation: int = field(
        default=1, metadata=_help("batches whose gradients are summed per optimiser step")
    )
    clip_grad_norm: float = field(
        default=1.0, metadata=_help("maximum gradient norm; 0 disables clipping")
    )
    early_stopping_patience: int = field(
        default=5, metadata=_help("evaluations without improvement before stopping; 0 disables")
    )
    select_metric: str = field(
        default="auc",
        metadata=_help(
            "validation metric choosing the best epoch: auc | acc | balanced_accuracy | loss"
        ),
    )
    class_balance: str = field(
        default="none",
        metadata=_help("none | weights (class-weighted loss) | sampler (class-balanced sampling)"),
    )
    label_smoothing: float = field(default=0.0, metadata=_help("label smoothing in [0, 1)"))
    norm_statistics: str = field(
        default="auto",
        metadata=_help(
            "batch-norm running statistics while training: update | frozen (eval mode; scale and "
            "shift still train) | auto (frozen for pretrained backbones, update from scratch)"
        ),
    )
    precision: str = field(
        default="auto",
        metadata=_help("auto (bf16 where native) | bf16 | fp16 (CUDA, with a GradScaler) | fp32"),
    )
    device: str = field(
        default="auto", metadata=_help("auto (a GPU when present, via accelerate) | cpu")
    )
    gradient_checkpointing: bool = field(
        default=False, metadata=_help("recompute activations to save memory (timm models)")
    )
    augment: str = field(
        default="auto",
        metadata=_help("auto (light; plus mild colour for RGB) | none | light | medium"),
    )
    augment_options: dict[str, Any] = field(
        default_factory=dict, metadata=_help("overrides of AugmentConfig fields, e.g. vflip: 0.5")
    )
    max_slices: int = field(
        default=0, metadata=_help("volumes: axial slices per volume, evenly spread; 0 for all")
    )
    seed: int = field(default=0, metadata=_help("seed of sampling, augmentation and dropout"))
    deterministic: bool = field(
        default=True, metadata=_help("deterministic algorithms (reproducible, a little slower)")
    )
    num_workers: int = field(default=0, metadata=_help("data-loading worker processes"))
    eval_every: int = field(default=1, metadata=_help("validate every this many epochs"))

    def __post_init__(self) -> None:
        for key, choices in (
            ("optimizer", OPTIMIZERS),
            ("schedule", SCHEDULES),
            ("select_metric", SELECT_METRICS),
            ("class_balance", CLASS_BALANCE),
            ("precision", TRAIN_PRECISIONS),
            ("device", DEVICES),
            ("augment", AUGMENTS),
        ):
            value = getattr(self, key)
            if value not in choices:
                raise ConfigError(
                    f"{key}={value!r} is not one of {list(choices)}."
                    f"{did_you_mean(str(value), list(choices))}"
                )
        for key in ("epochs", "batch_size", "grad_accumulation", "eval_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        for key in ("lr", "weight_decay", "clip_grad_norm", "warmup_epochs", "momentum"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must not be negative, got {getattr(self, key)}")
        for key in ("early_stopping_patience", "max_slices", "num_workers"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must not be negative, got {getattr(self, key)}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"gamma must be in (0, 1], got {self.gamma}")


@dataclass
class TrainResult:
    """What a run record needs; ``history`` has one dict per epoch (epoch, train_loss, lr,
    val_* metrics when validated, seconds)."""

    best_epoch: int
    best_val: dict[str, Any]
    history: list[dict[str, Any]]
    time_per_epoch_s: float
    total_s: float
    peak_memory_mb: float
    stopped_early: bool
    precision: str
    trainable_parameters: int
    precision_check: dict[str, Any] | None = None  # PrecisionDecision.to_dict()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    task = TaskType(task)
    native = isinstance(preprocess, VolumePreprocess)  # whole volumes, not slices
    train_split = _checked(train, task, num_classes, "train", volume, native)
    val_split = _checked(val, task, num_classes, "val", volume, native) if val is not None else None
    device = torch.device("cpu") if config.device == "cpu" else resolve_device()
    probe = _first_batch_probe(model, train_split, preprocess, config, volume, device)
    check = decide_precision(config.precision, device, probe)
    precision = training_precision(check.used, device)
    augment = resolve_augment(
        config.augment, config.augment_options, grayscale=is_grayscale(train_split[0], volume)
    )
    with (
        accelerator_session(precision, config.device, config.grad_accumulation) as accelerator,
        deterministic_kernels(config.deterministic),
        _grad_checkpointing(model, config.gradient_checkpointing),
    ):
        resolved = {
            **to_dict(config),
            "precision": precision,
            "augment_options": asdict(augment),
            "task": task.value,
            "num_classes": num_classes,
            "train_size": len(train_split[1]),
            "val_size": 0 if val_split is None else len(val_split[1]),
            "volume": volume,
            "world_size": accelerator.num_processes,
            "trainable": _trainable_digest(model),
        }
        resolved.pop("num_workers")
        loop = Loop(
            accelerator,
            model,
            train_split,
            val_split,
            task=task,
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
    return dataclasses.replace(result, precision_check=check.to_dict())


def _checked(
    split: tuple[Any, np.ndarray],
    task: TaskType,
    num_classes: int,
    name: str,
    volume: bool,
    native: bool = False,
) -> tuple[Any, np.ndarray]:
    images, labels = split
    labels = check_labels(labels, task, num_classes, f"{name} labels")
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
    preprocess: Callable[[np.ndarray], Any],
    config: TrainConfig,
    volume: bool,
    device: torch.device,
) -> Callable[[str], np.ndarray]:
    """What ``precision=auto`` compares in fp32 and bf16: the features of the model's backbone
    (its output when it has none) on the first training batch, prepared as for training."""
    body = model.backbone if isinstance(getattr(model, "backbone", None), nn.Module) else model
    net = SliceMean(body) if volume else body

    def probe(precision: str) -> np.ndarray:
        images = split[0]
        first = [np.asarray(images[i]) for i in range(min(len(images), config.batch_size))]
        x = Collate(preprocess, volume, config.max_slices).images(np.stack(first))
        return forward_in(net, x, precision, device)

    return probe


@contextlib.contextmanager
def _grad_checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """timm's ``set_grad_checkpointing`` on the outermost module offering it, for the run."""
    if not enabled:
        yield
        return
    owner = next(
        (m for m in model.modules() if callable(getattr(m, "set_grad_checkpointing", None))), None
    )
    message = (
        f"gradient_checkpointing=true is not supported by {type(model).__name__}: it needs a "
        "timm model with set_grad_checkpointing(); set gradient_checkpointing=false"
    )
    if owner is None:
        raise ConfigError(message)
    try:
        owner.set_grad_checkpointing(True)
    except (NotImplementedError, AssertionError) as err:
        raise ConfigError(f"{message} ({err})") from None
    try:
        yield
    finally:
        owner.set_grad_checkpointing(False)
