"""One experiment: dataset x backbone x weights x method x shots x seed -> one JSON record."""

from __future__ import annotations

import hashlib
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clinadapt.config import to_dict
from clinadapt.data.info import DatasetInfo

PROTOCOL_NOTES = {
    "nearest": "MedMNIST v2 protocol: images upsampled to the backbone size by nearest neighbour",
    "bilinear": "images resized to the backbone size with bilinear interpolation",
    "pad": "MedMNIST+ protocol: images zero-padded into the backbone canvas without resizing",
}


@dataclass
class ExperimentConfig:
    dataset: str = field(
        default="breastmnist",
        metadata={"help": "MedMNIST name, synthetic-* name, image folder or CSV manifest"},
    )
    data_root: str | None = field(
        default=None, metadata={"help": "folder with the .npz files (default: $CLINADAPT_DATA)"}
    )
    size: int = field(default=28, metadata={"help": "MedMNIST image size: 28, 64, 128 or 224"})
    backbone: str = field(default="resnet18", metadata={"help": "backbone name or timm:<name>"})
    weights: str = field(
        default="pretrained",
        metadata={"help": "'pretrained' (hub), 'none' (random control) or a safetensors path"},
    )
    method: str = field(default="linear", metadata={"help": "adaptation method name"})
    method_options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "options of the method's config dataclass"}
    )
    train: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "training options for gradient-based methods (TrainConfig fields)"},
    )
    resume: bool = field(
        default=False, metadata={"help": "continue an interrupted training run from its checkpoint"}
    )
    shots: str = field(default="all", metadata={"help": "examples per class, or 'all'"})
    seed: int = field(default=0, metadata={"help": "seed of the few-shot sample and bootstrap"})
    resize: str = field(default="nearest", metadata={"help": "nearest, bilinear or pad"})
    input_size: int | None = field(
        default=None, metadata={"help": "backbone input size (default: its pretrained size)"}
    )
    precision: str = field(default="auto", metadata={"help": "auto, bf16 or fp32 extraction"})
    batch_size: int = field(default=64, metadata={"help": "feature-extraction batch size"})
    volume_mode: str = field(
        default="axial", metadata={"help": "3D through 2D: axial, coronal, sagittal or planes"}
    )
    max_slices: int | None = field(
        default=None,
        metadata={"help": "3D through 2D: embed at most this many evenly spread slices per plane"},
    )
    allow_fewer_shots: bool = field(
        default=False, metadata={"help": "use all examples of a class smaller than shots"}
    )
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap resamples for 95% CIs"})
    trust_pickle: bool = field(
        default=False, metadata={"help": "allow loading pickle (.pt/.pth/.bin) checkpoints"}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "feature cache (default: $CLINADAPT_CACHE)"}
    )

    def shots_value(self) -> int | str:
        if str(self.shots).lower() == "all":
            return "all"
        try:
            shots = int(self.shots)
        except ValueError:
            shots = 0
        if shots < 1:
            from clinadapt.errors import ConfigError

            raise ConfigError(f"shots must be a positive integer or 'all', got {self.shots!r}")
        return shots


@dataclass
class FeatureBundle:
    """Features of every split for one (dataset, backbone, weights, preprocessing)."""

    info: DatasetInfo
    features: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    provenance: dict[str, Any]
    backbone: dict[str, Any]
    preprocessing: dict[str, Any]
    timings: dict[str, float]
    cache_hits: dict[str, bool]


def weights_tag(weights: str) -> str:
    """A short, path-safe label for a weights option (used in record paths and reports)."""
    if weights in ("pretrained", "none"):
        return weights
    name = Path(weights).name.replace(".safetensors", "") or "weights"
    digest = hashlib.sha256(str(Path(weights).resolve()).encode()).hexdigest()[:6]
    return f"{name}-{digest}"


def peak_memory_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def make_preprocess(backbone: Any, cfg: ExperimentConfig) -> Any:
    """2D preprocessing, or the volume version for volume-native backbones."""
    from clinadapt.backbones import get_spec
    from clinadapt.data import Preprocess
    from clinadapt.data.transforms import VolumePreprocess

    pcfg = backbone.pretrained_cfg
    size = cfg.input_size or pcfg.input_size
    if getattr(get_spec(cfg.backbone), "ndim", 2) == 3:
        resize = "trilinear" if cfg.resize == "bilinear" else cfg.resize
        return VolumePreprocess(
            input_size=size, mean=pcfg.mean, std=pcfg.std, resize=resize, channels=pcfg.channels
        )
    return Preprocess(
        input_size=size, mean=tuple(pcfg.mean), std=tuple(pcfg.std), resize=cfg.resize
    )


def prepare_features(cfg: ExperimentConfig, *, progress: bool = True) -> FeatureBundle:
    """Load data and backbone, then extract (or read cached) features for every split."""
    from clinadapt.backbones import create_backbone
    from clinadapt.data import load_dataset
    from clinadapt.data.transforms import slices_volumes
    from clinadapt.engine import FeatureCache, extract_features, extraction_precision

    timings: dict[str, float] = {}
    start = time.perf_counter()
    dataset = load_dataset(cfg.dataset, root=cfg.data_root, size=cfg.size)
    timings["load_data_s"] = time.perf_counter() - start

    start = time.perf_counter()
    backbone = create_backbone(cfg.backbone, cfg.weights, trust_pickle=cfg.trust_pickle)
    timings["load_backbone_s"] = time.perf_counter() - start
    preprocess = make_preprocess(backbone, cfg)
    slices = slices_volumes(dataset.info.ndim, preprocess)
    cache = FeatureCache(Path(cfg.cache_dir)) if cfg.cache_dir else FeatureCache()
    start = time.perf_counter()
    precision_check = extraction_precision(
        backbone,
        dataset["train"].images,
        preprocess,
        precision=cfg.precision,
        batch_size=cfg.batch_size,
        volume_mode=cfg.volume_mode,
        max_slices=cfg.max_slices,
        is_volume=slices,
        cache=cache,
    )
    timings["precision_check_s"] = time.perf_counter() - start
    precision = precision_check.used
    features, labels, hits = {}, {}, {}
    for split_name, split in dataset.splits.items():
        parts = {
            "dataset": dataset.info.name,
            "data_md5": dataset.provenance.get("md5"),
            "size": dataset.size,
            "split": split_name,
            "n": len(split),
            "backbone": backbone.name,
            "weights_id": backbone.weights_id,
            "preprocess": preprocess.describe(),
            "precision": precision,
            "volume_mode": cfg.volume_mode if slices else None,
            "max_slices": cfg.max_slices if slices else None,
        }
        start = time.perf_counter()
        features[split_name], hits[split_name] = cache.get_or_compute(
            parts,
            lambda split=split, split_name=split_name: extract_features(
                backbone,
                split.images,
                preprocess,
                batch_size=cfg.batch_size,
                precision=precision,
                volume_mode=cfg.volume_mode,
                max_slices=cfg.max_slices,
                is_volume=slices,
                progress=progress,
                desc=f"{dataset.info.name}/{split_name} {backbone.name}",
            ),
        )
        timings[f"features_{split_name}_s"] = time.perf_counter() - start
        labels[split_name] = np.asarray(split.labels)
    protocol = preprocess.describe()
    protocol["source_size"] = dataset.size
    protocol["note"] = PROTOCOL_NOTES.get(cfg.resize, "")
    if slices:
        protocol["volume_mode"] = cfg.volume_mode
        protocol["max_slices"] = cfg.max_slices
    return FeatureBundle(
        info=dataset.info,
        features=features,
        labels=labels,
        provenance=dict(dataset.provenance),
        backbone=backbone_summary(
            backbone, cfg.weights, sum(p.numel() for p in backbone.parameters())
        ),
        preprocessing={
            **protocol,
            "precision": precision,
            "precision_check": precision_check.to_dict(),
        },
        timings=timings,
        cache_hits=hits,
    )


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


def sample_support(cfg: ExperimentConfig, info: DatasetInfo, labels: np.ndarray) -> tuple:
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


def run_on_features(cfg: ExperimentConfig, bundle: FeatureBundle) -> dict[str, Any]:
    """Sample the support set, fit the method, evaluate on test once; return the record."""
    from clinadapt.adapt import create_method
    from clinadapt.eval import bootstrap_ci, evaluate
    from clinadapt.runner.records import RECORD_VERSION, hardware, package_versions

    info = bundle.info
    train_x, train_y = bundle.features["train"], bundle.labels["train"]
    support, actual_shots = sample_support(cfg, info, train_y)
    method = create_method(cfg.method, cfg.method_options)
    val = (bundle.features["val"], bundle.labels["val"]) if "val" in bundle.features else None
    start = time.perf_counter()
    method.fit(
        train_x[support], train_y[support], info.task, info.num_classes, val=val, seed=cfg.seed
    )
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    test_scores = method.predict_proba(bundle.features["test"])
    predict_s = time.perf_counter() - start
    test_y = bundle.labels["test"]
    metrics = evaluate(test_y, test_scores, info.task)
    record: dict[str, Any] = {
        "record_version": RECORD_VERSION,
        "config": to_dict(cfg),
        "dataset": dataset_summary(
            info, {k: len(v) for k, v in bundle.labels.items()}, bundle.provenance
        ),
        "backbone": bundle.backbone,
        "preprocessing": bundle.preprocessing,
        "method": {
            "name": cfg.method,
            "config": to_dict(method.config),
            "selected": method.selected(),
            "fitted_parameters": method.fitted_parameters(),
            "trainable_backbone_parameters": 0,
        },
        "shots": {
            "requested": cfg.shots_value(),
            "actual_per_class": actual_shots,
            "support_size": len(support),
        },
        "metrics": {"test": metrics},
        "timings": {**bundle.timings, "fit_s": fit_s, "predict_s": predict_s},
        "feature_cache_hits": bundle.cache_hits,
        "peak_memory_mb": peak_memory_mb(),
        "packages": package_versions(),
        "hardware": hardware(),
    }
    if val is not None:
        record["metrics"]["val"] = evaluate(val[1], method.predict_proba(val[0]), info.task)
    if cfg.bootstrap > 0:
        record["metrics"]["test_ci95"] = bootstrap_ci(
            test_y, test_scores, info.task, n_resamples=cfg.bootstrap, seed=cfg.seed
        )
    return record


def method_kind(name: str) -> str:
    """'frozen' (features only) or 'finetune' (gradient updates)."""
    from clinadapt.adapt import METHODS

    return METHODS.get(name).kind


def run_experiment(
    cfg: ExperimentConfig, *, run_dir: Path | None = None, progress: bool = True
) -> dict[str, Any]:
    """One run; gradient-based methods need ``run_dir`` for checkpoints and the adapter."""
    if method_kind(cfg.method) == "finetune":
        from clinadapt.errors import ConfigError
        from clinadapt.runner.finetune import run_finetune

        if run_dir is None:
            raise ConfigError(
                f"method {cfg.method!r} trains a model: give an output folder (--out)"
            )
        return run_finetune(cfg, run_dir, progress=progress)
    bundle = prepare_features(cfg, progress=progress)
    record = run_on_features(cfg, bundle)
    record["timings"]["total_s"] = sum(v for k, v in record["timings"].items() if k != "total_s")
    return record
