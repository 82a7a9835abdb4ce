"""What frozen-feature and trained runs share: preprocessing, labelled subsets, record blocks."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clinadapt.config import from_dict
from clinadapt.data.info import DatasetInfo
from clinadapt.errors import ConfigError

if TYPE_CHECKING:
    from clinadapt.engine.train_config import TrainConfig
    from clinadapt.tasks import Task

PROTOCOL_NOTES = {
    "nearest": "MedMNIST v2 protocol: images upsampled to the backbone size by nearest neighbour",
    "bilinear": "images resized to the backbone size with bilinear interpolation",
    "pad": "MedMNIST+ protocol: images zero-padded into the backbone canvas without resizing",
}


def weights_tag(weights: str) -> str:
    """A short, path-safe label for a weights option (used in record paths and reports)."""
    if weights in ("pretrained", "none"):
        return weights
    name = Path(weights).name.replace(".safetensors", "") or "weights"
    digest = hashlib.sha256(str(Path(weights).resolve()).encode()).hexdigest()[:6]
    return f"{name}-{digest}"


def dataset_task(cfg: Any) -> Task:
    """The task of ``cfg.dataset``, known without reading the data: a registered dataset's, a
    segmentation folder layout's, else classification (image folders, manifests)."""
    from clinadapt.data.registry import DATASETS
    from clinadapt.data.segmentation import segmentation_layout
    from clinadapt.tasks import TASKS, task_for

    if cfg.dataset in DATASETS:
        return task_for(DATASETS.get(cfg.dataset).task)
    folder = Path(cfg.dataset).expanduser()
    if folder.is_dir() and segmentation_layout(folder) is not None:
        return TASKS.get("segmentation")
    return TASKS.get("classification")


def resize_mode(cfg: Any, task: Task) -> str:
    """``cfg.resize`` with ``auto`` made the task's default."""
    return task.default_resize if cfg.resize == "auto" else cfg.resize


def head_kind(cfg: Any, task: Task) -> str:
    """``cfg.head`` with ``auto`` made the task's default, checked against the task's heads."""
    if cfg.head == "auto":
        return task.head_kinds[0]
    if cfg.head not in task.head_kinds:
        raise ConfigError(
            f"head={cfg.head!r}: {task.name} heads are {list(task.head_kinds)} (or auto)"
        )
    return cfg.head


def make_preprocess(backbone: Any, cfg: Any, task: Task | None = None) -> Any:
    """2D preprocessing, or the volume version for volume-native backbones; ``cfg`` needs
    ``backbone``, ``input_size`` and ``resize``. Segmentation brings image and mask to the
    network's shape together (``SegmentationPreprocess``)."""
    from clinadapt.backbones import get_spec
    from clinadapt.data import Preprocess
    from clinadapt.data.transforms import PairResize, SegmentationPreprocess, VolumePreprocess

    task = task or dataset_task(cfg)
    resize = resize_mode(cfg, task)
    pcfg = backbone.pretrained_cfg
    size = cfg.input_size or pcfg.input_size
    volume = getattr(get_spec(cfg.backbone), "ndim", 2) == 3
    if volume:
        normalise: Any = VolumePreprocess(
            input_size=size,
            mean=pcfg.mean,
            std=pcfg.std,
            resize="trilinear" if resize == "bilinear" else resize,
            channels=pcfg.channels,
        )
    else:
        normalise = Preprocess(
            input_size=size, mean=tuple(pcfg.mean), std=tuple(pcfg.std), resize=resize
        )
    if not task.dense_targets:
        return normalise
    pair = PairResize(size, "linear" if resize in ("bilinear", "trilinear") else resize)
    return SegmentationPreprocess(pair, normalise)


def protocol(preprocess: Any, source_size: int, resize: str) -> dict[str, Any]:
    """The ``preprocessing`` block: how images reached the backbone, so that numbers are compared
    only under the same protocol."""
    return {
        **preprocess.describe(),
        "source_size": source_size,
        "note": PROTOCOL_NOTES.get(resize, ""),
    }


def sample_support(cfg: Any, info: DatasetInfo, labels: np.ndarray) -> tuple:
    """The seeded few-shot support set, from the training split only."""
    from clinadapt.data import few_shot_indices

    return few_shot_indices(
        labels,
        info.task,
        info.num_classes,
        cfg.shots_value(),
        cfg.seed,
        allow_fewer=cfg.allow_fewer_shots,
        class_names=list(info.labels),
    )


def take_rows(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``array[rows]``, or ``array`` itself when ``rows`` are all its rows in order (shots=all):
    the features of a large split are not copied."""
    if len(rows) == len(array) and np.array_equal(rows, np.arange(len(array))):
        return array
    return array[rows]


def sample_validation(cfg: Any, info: DatasetInfo, labels: np.ndarray) -> np.ndarray:
    """The labelled validation examples a run may use: a few-shot run gets no more per class than
    its label budget (``val_shots``), drawn from the validation split with the run's seed."""
    from clinadapt.data import few_shot_indices

    budget = cfg.val_shots_value()
    if budget == "all":
        return np.arange(len(labels))
    indices, _ = few_shot_indices(
        labels,
        info.task,
        info.num_classes,
        budget,
        cfg.seed,
        allow_fewer=True,
        class_names=list(info.labels),
    )
    return indices


def labels_used(support: int, val: int, uses_val: bool) -> dict[str, int]:
    """How many labelled images a run used: the support set, plus the validation examples that
    chose its hyper-parameters or epoch (none for methods that ignore validation)."""
    used_val = val if uses_val else 0
    return {"train": support, "val": used_val, "total": support + used_val}


def backbone_summary(backbone: Any, weights: str, parameters: int) -> dict[str, Any]:
    """The ``backbone`` block of a run record."""
    return {
        "name": backbone.name,
        "weights": weights,
        "weights_id": backbone.weights_id,
        "is_pretrained": backbone.is_pretrained,
        "feature_dim": backbone.feature_dim,
        "source": backbone.pretrained_cfg.source,
        "parameters": parameters,
    }


def dataset_summary(
    info: DatasetInfo, split_sizes: dict[str, int], provenance: dict[str, Any]
) -> dict[str, Any]:
    """The ``dataset`` block of a run record."""
    return {
        "name": info.name,
        "task": info.task.value,
        "num_classes": info.num_classes,
        "labels": list(info.labels),
        "ndim": info.ndim,
        "channels": info.channels,
        "split_sizes": split_sizes,
        "provenance": provenance,
    }


CARRIED_TO_TRAINING = ("precision", "batch_size", "max_slices")
"""Run options that mean the same in training; given in both places they must agree."""


def train_config(cfg: Any, task: Task | None = None) -> TrainConfig:
    """The training options of a run: ``train.*`` plus the run options that carry over
    (precision, batch size, slices per volume), the run's seed and the task's defaults (e.g.
    segmentation selects its epoch by Dice) unless given."""
    from clinadapt.engine.train_config import TrainConfig

    task = task or dataset_task(cfg)
    options = {"seed": cfg.seed, **task.train_defaults, **cfg.train}
    for key in CARRIED_TO_TRAINING:
        value = getattr(cfg, key)
        if value is None or (key == "precision" and value == "auto"):
            continue
        if key in cfg.train and cfg.train[key] != value:
            raise ConfigError(
                f"{key}={value!r} and train.{key}={cfg.train[key]!r} disagree; give one of them"
            )
        options[key] = value
    return from_dict(TrainConfig, options, where="train options")


def save_trained(model: Any, method: Any, run_dir: Path) -> int:
    """Write the run's adapter (main process only) and return its size in bytes (0 elsewhere)."""
    from clinadapt.adapt.checkpoint import save_adapter
    from clinadapt.runner.records import is_main_process

    if not is_main_process():  # other ranks only need the size for the record
        return 0
    adapter_dir = save_adapter(model, method, run_dir / "adapter")
    return sum(p.stat().st_size for p in adapter_dir.iterdir())


def trained_method(
    cfg: Any, method: Any, train_cfg: Any, model: Any, result: Any, adapter_bytes: int
) -> dict[str, Any]:
    """The ``method`` block of a trained run's record."""
    from clinadapt.config import to_dict

    trainable = model.trainable_parameters()
    return {
        "name": cfg.method,
        "kind": "finetune",
        "head": model.head_kind,
        "config": to_dict(method.config),
        "train": to_dict(train_cfg),
        "selected": {
            "best_epoch": result.best_epoch,
            "gradient_checkpointing": result.gradient_checkpointing,
        },
        "fitted_parameters": trainable,
        "trainable_backbone_parameters": trainable
        - sum(p.numel() for p in model.head.parameters()),
        "trainable_percent_of_backbone": 100.0 * trainable / max(model.base_parameters, 1),
        "adapter_bytes": adapter_bytes,
        "stopped_early": result.stopped_early,
    }


def case_targets(split: Any, num_classes: int) -> Any:
    """The ground truth of a segmentation split as ``SegmentationTask.score_cases`` takes it:
    masks at each case's own size with their spacing and ids."""
    from clinadapt.tasks.segmentation import CaseTargets

    meta = split.meta or [{} for _ in range(len(split))]
    return CaseTargets(
        masks=split.labels,
        num_classes=num_classes,
        spacing=[m.get("spacing") for m in meta],
        ids=[str(m.get("id", i)) for i, m in enumerate(meta)],
    )


def count_empty(masks: Any, picked: np.ndarray) -> int:
    """Cases without foreground among ``picked``: they train and score like any other (Dice
    conventions in ``clinadapt.eval.segmentation``), and the record says how many there were."""
    return sum(int(not np.any(masks[int(i)])) for i in picked)


def capped_budget(budget: int | str, n: int) -> int | str:
    """A validation budget larger than the split takes the whole split."""
    return "all" if budget == "all" or int(budget) >= n else budget


def training_cases(split: Any, picked: np.ndarray, slices: bool) -> tuple[Any, Any]:
    """(images, masks) of the picked cases; with ``slices`` every axial slice is a case."""
    from clinadapt.data.dataset import Subset
    from clinadapt.data.slices import VolumeSlices

    images, masks = Subset(split.images, picked), Subset(split.labels, picked)
    if not slices:
        return images, masks
    depths = [int(split.meta[i]["shape"][0]) for i in picked]
    return VolumeSlices(images, depths), VolumeSlices(masks, depths)
