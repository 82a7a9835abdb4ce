"""One experiment: dataset x backbone x weights x method x shots x seed -> one JSON record."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clinadapt.config import to_dict
from clinadapt.data.info import DatasetInfo
from clinadapt.data.shifts import ShiftedSplit, apply_shift, parse_shift
from clinadapt.runner.common import (
    backbone_summary,
    dataset_summary,
    dataset_task,
    labels_used,
    make_preprocess,
    protocol,
    resize_mode,
    sample_support,
    sample_validation,
    take_rows,
)

EXTRACTION_BATCH = 64


def _opt(default: Any, scope: str, help_text: str, **kw: Any) -> Any:
    """A config field; ``scope`` says what it decides (see ``runner.identity``)."""
    return field(default=default, metadata={"help": help_text, "scope": scope}, **kw)


@dataclass
class ExperimentConfig:
    dataset: str = _opt(
        "breastmnist",
        "features",
        "MedMNIST name, synthetic-* name, image folder, CSV manifest or .npz of arrays",
    )
    data_root: str | None = _opt(
        None, "place", "folder with the .npz files (default: $CLINADAPT_DATA)"
    )
    size: int = _opt(28, "features", "MedMNIST image size: 28, 64, 128 or 224")
    backbone: str = _opt("resnet18", "features", "backbone name or timm:<name>")
    weights: str = _opt(
        "pretrained",
        "features",
        "'pretrained' (hub), 'none' (random control) or a safetensors path",
    )
    method: str = _opt("linear", "run", "adaptation method name")
    method_options: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "options of the method's config dataclass", "scope": "run"},
    )
    train: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "training options for gradient-based methods (TrainConfig fields)",
            "scope": "run",
        },
    )
    resume: bool = _opt(False, "place", "continue an interrupted training run from its checkpoint")
    shots: str = _opt(
        "all", "run", "examples per class, or 'all'; 0 for zero-shot methods (zeroshot)"
    )
    val_shots: str = _opt(
        "auto",
        "run",
        "labelled validation examples per class for choosing hyper-parameters or the epoch: "
        "auto (as many as shots; all when shots=all), a number, or all",
    )
    seed: int = _opt(0, "run", "seed of the few-shot sample, training and bootstrap")
    class_text: str | None = _opt(
        None,
        "run",
        "YAML/JSON file of class names, descriptions and templates for vision-language methods "
        "(default: the dataset's built-in text; MedMNIST datasets have one)",
    )
    resize: str = _opt(
        "auto",
        "features",
        "nearest, bilinear or pad; auto: nearest for classification (the MedMNIST protocol), "
        "bilinear for segmentation (masks are always resized nearest)",
    )
    head: str = _opt(
        "auto",
        "run",
        "the new output layer: auto, linear, or decoder (segmentation: a light upsampling "
        "decoder, the default there; linear is a 1x1 convolution)",
    )
    input_size: int | None = _opt(
        None, "features", "backbone input size (default: its pretrained size)"
    )
    precision: str = _opt(
        "auto",
        "features",
        "auto (bf16 only where it agrees with fp32 on this data), bf16 or fp32",
    )
    batch_size: int | None = _opt(
        None, "features", "batch size (default: 64 for feature extraction, train.batch_size)"
    )
    volume_mode: str = _opt(
        "axial", "features", "3D through 2D: axial, coronal, sagittal or planes"
    )
    max_slices: int | None = _opt(
        None, "features", "3D through 2D: embed at most this many evenly spread slices per plane"
    )
    allow_fewer_shots: bool = _opt(False, "run", "use all examples of a class smaller than shots")
    bootstrap: int = _opt(1000, "run", "bootstrap resamples for 95% CIs")
    tta: str = _opt(
        "none",
        "run",
        "test-time adaptation of a single-label classifier at evaluation: none, bn, tent, sar, "
        "eata, t3a or lame (trained runs and linear probes; see clinadapt.tta)",
    )
    tta_options: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "options of the tta method (tta.NAME=VALUE)", "scope": "run"},
    )
    tta_mode: str = _opt(
        "episodic",
        "run",
        "episodic (reset to the source model before every test batch) or continual (keep "
        "adapting along the test stream)",
    )
    tta_batch_size: int = _opt(64, "run", "test images per test-time adaptation batch")
    adaptive_temperature: str = _opt(
        "off",
        "run",
        "adaptive-temperature softmax at inference (Velickovic et al. 2024): off, output "
        "(the classifier's softmax), attention (timm ViTs' attention softmax) or both; the "
        "output rule is a no-op for binary and multi-label classifiers",
    )
    trust_pickle: bool = _opt(False, "place", "allow loading pickle (.pt/.pth/.bin) checkpoints")
    cache_dir: str | None = _opt(None, "place", "feature cache (default: $CLINADAPT_CACHE)")
    reliability_diagram: bool = _opt(
        True,
        "place",
        "draw the reliability diagram of the test predictions in the run folder; off keeps the "
        "calibration block without the picture (grids of many test settings)",
    )
    shift: str = _opt(
        "none",
        "features",
        "test set: none, medmnistc:<corruption|all>:<severity 1-5|lo-hi>, size:<n> (another "
        "released size) or target:<folder or .csv>",
    )

    def __post_init__(self) -> None:
        """Bad numbers fail here, before any data is read or feature extracted."""
        from clinadapt.errors import ConfigError
        from clinadapt.runner.tta import check_choices

        bounds = {
            "seed": 0,
            "bootstrap": 0,
            "batch_size": 1,
            "input_size": 1,
            "max_slices": 1,
            "tta_batch_size": 1,
        }
        for key, low in bounds.items():
            value = getattr(self, key)
            if value is not None and value < low:
                rule = "must not be negative" if low == 0 else f"must be at least {low}"
                raise ConfigError(f"{key} {rule}, got {value}")
        self.val_shots_value()
        check_budget_and_text(self)
        if parse_shift(self.shift).kind != "none" and dataset_task(self).dense_targets:
            raise ConfigError(f"shift={self.shift!r}: shifted test sets are for classification")
        check_choices(self)

    def shots_value(self) -> int | str:
        return _budget(self.shots, "shots", zero=True)

    def val_shots_value(self) -> int | str:
        """The validation budget per class; ``auto`` follows the training budget."""
        if str(self.val_shots).lower() == "auto":
            return self.shots_value()
        return _budget(self.val_shots, "val_shots")


def _budget(value: Any, name: str, *, zero: bool = False) -> int | str:
    if str(value).lower() == "all":
        return "all"
    try:
        shots = int(value)
    except ValueError:
        shots = -1
    if shots < (0 if zero else 1):
        from clinadapt.errors import ConfigError

        allowed = "a positive integer, 0 for zero-shot methods," if zero else "a positive integer"
        raise ConfigError(f"{name} must be {allowed} or 'all', got {value!r}")
    return shots


def check_budget_and_text(cfg: Any) -> None:
    """Zero-shot methods run with shots 0, and only they: a method that learns from labels
    given none, or a zero-shot method given labels it would not use, is an error; so is class
    text for a method that reads none."""
    from clinadapt.adapt import METHODS
    from clinadapt.errors import ConfigError

    if cfg.method not in METHODS:
        return  # unknown names are reported where the method is created
    zero = [n for n in METHODS.names() if getattr(METHODS.get(n), "zero_shot", False)]
    shots = cfg.shots_value()
    if shots == 0 and cfg.method.lower() not in zero:
        raise ConfigError(
            f"shots=0: method {cfg.method!r} learns from labelled examples; only zero-shot "
            f"methods ({', '.join(zero)}) run without any, so give shots >= 1 or 'all'"
        )
    if shots != 0 and cfg.method.lower() in zero:
        raise ConfigError(
            f"method {cfg.method!r} uses no labelled examples: run it with shots=0 (it is the "
            "0-shot point of the label-efficiency curve)"
        )
    if cfg.class_text is not None and not getattr(METHODS.get(cfg.method), "needs_text", False):
        texts = [n for n in METHODS.names() if getattr(METHODS.get(n), "needs_text", False)]
        raise ConfigError(
            f"class_text={cfg.class_text!r}: method {cfg.method!r} uses no class text (those "
            f"that do: {', '.join(texts)}); drop it"
        )


@dataclass
class FeatureSource:
    """What a frozen run's test-time options need beyond the features: the backbone, its
    preprocessing and the images of every split, embedded as ``prepare_features`` did."""

    backbone: Any
    preprocess: Any
    images: dict[str, Any]
    precision: str
    batch_size: int
    slices: bool
    """Volumes through a 2D backbone, slice by slice (``volume_mode``, ``max_slices``)."""
    volume_mode: str
    max_slices: int | None

    def extract(self, split: str, *, progress: bool = True) -> np.ndarray:
        """The features of ``split`` computed again (not cached): for a backbone changed at
        inference time, such as adaptive attention."""
        from clinadapt.engine import extract_features

        return extract_features(
            self.backbone,
            self.images[split],
            self.preprocess,
            batch_size=self.batch_size,
            precision=self.precision,
            volume_mode=self.volume_mode,
            max_slices=self.max_slices,
            is_volume=self.slices,
            progress=progress,
            desc=f"{split} {self.backbone.name}",
        )


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
    key: str
    source: FeatureSource | None = None
    domains: dict[str, np.ndarray] = field(default_factory=dict)
    """Per split, the domain of each example where the data names one."""
    extraction: dict[str, Any] | None = None
    """``engine.flops.throughput`` of the splits extracted (not read from the cache)."""


def prepare_features(cfg: ExperimentConfig, *, progress: bool = True) -> FeatureBundle:
    """Load data and backbone, then extract (or read cached) features for every split. Under
    ``accelerate launch`` / ``torchrun`` each process embeds its share of every split, all of
    them get all the features, and only the first process reads and writes the cache."""
    from clinadapt.backbones import create_backbone
    from clinadapt.data import load_dataset
    from clinadapt.data.transforms import slices_volumes
    from clinadapt.engine import FeatureCache, extract_features, extraction_precision
    from clinadapt.engine.flops import throughput
    from clinadapt.runner.identity import bundle_key
    from clinadapt.runner.records import package_versions
    from clinadapt.tasks import task_for

    timings: dict[str, float] = {}
    start = time.perf_counter()
    dataset = apply_shift(load_dataset(cfg.dataset, root=cfg.data_root, size=cfg.size), cfg.shift)
    timings["load_data_s"] = time.perf_counter() - start
    task = task_for(dataset.info.task)

    start = time.perf_counter()
    backbone = create_backbone(cfg.backbone, cfg.weights, trust_pickle=cfg.trust_pickle)
    timings["load_backbone_s"] = time.perf_counter() - start
    preprocess = make_preprocess(backbone, cfg, task)
    slices = slices_volumes(dataset.info.ndim, preprocess)
    cache = FeatureCache(Path(cfg.cache_dir)) if cfg.cache_dir else FeatureCache()
    versions = {k: v for k, v in package_versions().items() if k in ("clinadapt", "torch", "timm")}
    start = time.perf_counter()
    precision_check = extraction_precision(
        backbone,
        dataset["train"].images,
        preprocess,
        precision=cfg.precision,
        batch_size=cfg.batch_size or EXTRACTION_BATCH,
        volume_mode=cfg.volume_mode,
        max_slices=cfg.max_slices,
        is_volume=slices,
        cache=cache,
        distributed=True,
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
            "model_kwargs": backbone.model_kwargs,
            "preprocess": preprocess.describe(),
            "precision": precision,
            "volume_mode": cfg.volume_mode if slices else None,
            "max_slices": cfg.max_slices if slices else None,
            "versions": versions,
        }
        if isinstance(split, ShiftedSplit):
            parts["shift"] = split.provenance
        start = time.perf_counter()
        features[split_name], hits[split_name] = cache.get_or_compute(
            parts,
            lambda split=split, split_name=split_name: extract_features(
                backbone,
                split.images,
                preprocess,
                batch_size=cfg.batch_size or EXTRACTION_BATCH,
                precision=precision,
                volume_mode=cfg.volume_mode,
                max_slices=cfg.max_slices,
                is_volume=slices,
                progress=progress,
                desc=f"{dataset.info.name}/{split_name} {backbone.name}",
                distributed=True,
            ),
            shared=True,
        )
        timings[f"features_{split_name}_s"] = time.perf_counter() - start
        labels[split_name] = np.asarray(split.labels)
    extracted = [name for name, hit in hits.items() if not hit]
    extraction = None
    if extracted:
        extraction = throughput(
            sum(len(dataset[name]) for name in extracted),
            sum(timings[f"features_{name}_s"] for name in extracted),
            None if slices else _embedding_flops(backbone, preprocess, dataset["train"].images),
        )
    preprocessing = protocol(preprocess, dataset.size, resize_mode(cfg, task))
    if slices:
        preprocessing["volume_mode"] = cfg.volume_mode
        preprocessing["max_slices"] = cfg.max_slices
    return FeatureBundle(
        info=dataset.info,
        features=features,
        labels=labels,
        provenance=dict(dataset.provenance),
        backbone=backbone_summary(
            backbone, cfg.weights, sum(p.numel() for p in backbone.parameters())
        ),
        preprocessing={
            **preprocessing,
            "precision": precision,
            "precision_check": precision_check.to_dict(),
        },
        timings=timings,
        cache_hits=hits,
        key=bundle_key(cfg),
        domains={n: s.domains for n, s in dataset.splits.items() if s.domains is not None},
        extraction=extraction,
        source=FeatureSource(
            backbone=backbone,
            preprocess=preprocess,
            images={name: split.images for name, split in dataset.splits.items()},
            precision=precision,
            batch_size=cfg.batch_size or EXTRACTION_BATCH,
            slices=slices,
            volume_mode=cfg.volume_mode,
            max_slices=cfg.max_slices,
        ),
    )


def _embedding_flops(backbone: Any, preprocess: Any, images: Any) -> float:
    """FLOPs of embedding one image (the first) as extraction does."""
    import torch

    from clinadapt.engine.flops import counting_flops

    device = next(backbone.parameters()).device  # where extraction left it
    x = torch.as_tensor(preprocess(np.asarray(images[np.array([0])]))).float().to(device)
    with torch.inference_mode(), counting_flops() as count:
        backbone.eval().embed(x)
    return float(count.total)


def run_on_features(
    cfg: ExperimentConfig,
    bundle: FeatureBundle,
    *,
    run_dir: Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Sample the support set, fit the method, evaluate on test once; return the record.
    ``run_dir``, when given, gets the run's reliability diagram."""
    from clinadapt.adapt import create_method
    from clinadapt.runner import tta
    from clinadapt.runner.calibrate import calibration_block
    from clinadapt.runner.identity import run_block
    from clinadapt.runner.records import build_record
    from clinadapt.runner.text import attach_text, domain_rows
    from clinadapt.tasks import task_for

    run_start = time.perf_counter()
    info = bundle.info
    task = task_for(info.task)
    tta.check_test_time(cfg, info.task)
    train_x, train_y = bundle.features["train"], bundle.labels["train"]
    support, actual_shots = sample_support(cfg, info, train_y)
    method = create_method(cfg.method, cfg.method_options)
    text_block = attach_text(cfg, method, bundle)
    domains = domain_rows(method, bundle)
    val = None
    if "val" in bundle.features and cfg.val_shots_value() != 0:
        picked = sample_validation(cfg, info, bundle.labels["val"])
        val = (take_rows(bundle.features["val"], picked), bundle.labels["val"][picked])
    if "train" in domains:
        method.use_domains(domains["train"][support])
    start = time.perf_counter()
    method.fit(
        take_rows(train_x, support),
        train_y[support],
        info.task,
        info.num_classes,
        val=val,
        seed=cfg.seed,
    )
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    if domains:
        method.query_domains(domains.get("test"))
    test_scores, tta_block, patched = tta.frozen_predictions(
        cfg, method, bundle.features["test"], bundle.source, progress=progress
    )
    predict_s = time.perf_counter() - start
    if tta_block is None:
        tta_block = tta.unadapted_block(predict_s, len(test_scores))
    sharpened = None
    if tta.output_on(cfg):
        test_scores, sharpened = tta.adaptive_output(test_scores, info.task)
    test_y = bundle.labels["test"]
    metrics: dict[str, Any] = {"test": task.evaluate(test_y, test_scores, info.task)}
    if domains and val is not None:
        method.query_domains(domains["val"][picked] if "val" in domains else None)
    val_scores = None if val is None else method.predict_proba(val[0])
    if val is not None:
        metrics["val"] = task.evaluate(val[1], val_scores, info.task)
    if cfg.bootstrap > 0:
        metrics["test_ci95"] = task.bootstrap(
            test_y, test_scores, info.task, n_resamples=cfg.bootstrap, seed=cfg.seed
        )
    uses_val = val is not None and type(method).uses_validation
    calibration = calibration_block(
        info.task,
        test_y,
        test_scores,
        (val[1], val_scores) if uses_val else None,
        not_fitted=(
            f"method {cfg.method!r} uses no validation labels, and fitting a temperature would "
            "add labels the run did not use"
            if val is not None
            else "the dataset has no validation split"
        ),
        run_dir=run_dir if cfg.reliability_diagram else None,
        title=f"{info.name}: {bundle.backbone['name']} {cfg.method}{tta.describe(cfg)}, test split",
    )
    return build_record(
        "frozen",
        to_dict(cfg),
        run=run_block(cfg),
        task=task.name,
        dataset=dataset_summary(
            info, {k: len(v) for k, v in bundle.labels.items()}, bundle.provenance
        ),
        backbone=bundle.backbone,
        preprocessing=bundle.preprocessing,
        method={
            "name": cfg.method,
            "kind": "frozen",
            "config": to_dict(method.config),
            "selected": method.selected(),
            "fitted_parameters": method.fitted_parameters(),
            "trainable_backbone_parameters": 0,
        },
        shots={
            "requested": cfg.shots_value(),
            "actual_per_class": actual_shots,
            "support_size": len(support),
            "val_requested": cfg.val_shots_value(),
        },
        labels_used=labels_used(len(support), 0 if val is None else len(val[1]), uses_val),
        **({"text": text_block} if text_block else {}),
        metrics=metrics,
        calibration=calibration,
        tta=tta_block,
        adaptive_temperature=tta.adaptive_block(
            cfg.adaptive_temperature, info.task, patched, sharpened
        ),
        feature_cache_hits=bundle.cache_hits,
        timings={
            **bundle.timings,
            "fit_s": fit_s,
            "predict_s": predict_s,
            "setup_s": sum(bundle.timings.values()),
            "extraction_throughput": bundle.extraction,
            "setup_key": bundle.key,
            "run_s": time.perf_counter() - run_start,
        },
    )


def check_frozen_options(cfg: ExperimentConfig) -> None:
    """Training options and ``resume`` given to a frozen-feature or prompted method would be
    ignored: say so instead."""
    from clinadapt.adapt import METHODS
    from clinadapt.errors import ConfigError
    from clinadapt.runner.text import check_text_options

    check_text_options(cfg)
    trained = ", ".join(n for n in METHODS.names() if trains(n))
    what = {"prompted": "segments from prompts without training"}.get(
        METHODS.get(cfg.method).kind, "fits on frozen features"
    )
    if cfg.train:
        given = ", ".join(f"train.{key}" for key in cfg.train)
        raise ConfigError(
            f"{given}: training options only apply to gradient-based methods "
            f"({trained}); {cfg.method!r} {what}, so drop them"
        )
    if cfg.resume:
        raise ConfigError(
            f"--resume only applies to trained runs ({trained}); {cfg.method!r} {what}, so drop it"
        )


def trains(name: str) -> bool:
    """Whether method ``name`` trains a model (fine-tuning, or a prompted method that adapts its
    SAM first): it needs a run folder, takes ``train.*`` options and resumes."""
    from clinadapt.adapt import METHODS

    cls = METHODS.get(name)
    return cls.kind == "finetune" or bool(getattr(cls, "trains", False))


def method_kind(name: str) -> str:
    """'frozen' (features only), 'finetune' (gradient updates) or 'prompted' (zero-shot
    promptable segmentation)."""
    from clinadapt.adapt import METHODS

    return METHODS.get(name).kind


def run_experiment(
    cfg: ExperimentConfig, *, run_dir: Path | None = None, progress: bool = True
) -> dict[str, Any]:
    """One run; gradient-based methods need ``run_dir`` for checkpoints and the adapter,
    prompted ones write their overlays there when given one."""
    from clinadapt.errors import ConfigError
    from clinadapt.runner.common import dataset_task
    from clinadapt.runner.tta import check_test_time

    check_test_time(cfg)
    if method_kind(cfg.method) == "prompted":
        from clinadapt.runner.prompted import run_prompted

        if not trains(cfg.method):
            check_frozen_options(cfg)
        elif run_dir is None:
            raise ConfigError(f"method {cfg.method!r} trains a model: pass run_dir")
        return run_prompted(cfg, run_dir, progress=progress)
    dense = dataset_task(cfg).dense_targets
    if method_kind(cfg.method) == "finetune":
        from clinadapt.runner.finetune import run_finetune
        from clinadapt.runner.segmentation import run_segmentation

        if run_dir is None:
            raise ConfigError(f"method {cfg.method!r} trains a model: pass run_dir")
        run = run_segmentation if dense else run_finetune
        return run(cfg, run_dir, progress=progress)
    if dense:
        from clinadapt.adapt import METHODS

        trained = ", ".join(n for n in METHODS.names() if METHODS.get(n).kind == "finetune")
        raise ConfigError(
            f"{cfg.method!r} fits on pooled features, which hold no map to segment "
            f"{cfg.dataset}; use a trained head: head (frozen backbone), or one of {trained}"
        )
    check_frozen_options(cfg)
    bundle = prepare_features(cfg, progress=progress)
    return run_on_features(cfg, bundle, run_dir=run_dir, progress=progress)
