"""Gradient-based runs: build backbone + method, train on the support set, evaluate once on test.

Training and evaluation are separate steps (``train_source``, ``evaluate_trained``) so that runs
differing only in their test-time options (``shift``, ``tta*``, ``adaptive_temperature``) can be
evaluated with one trained model: that of their source run (``source_config``).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from clinadapt.config import to_dict
from clinadapt.errors import ConfigError
from clinadapt.runner import tta
from clinadapt.runner.calibrate import calibration_block
from clinadapt.runner.common import (
    backbone_summary,
    dataset_summary,
    labels_used,
    make_preprocess,
    protocol,
    resize_mode,
    sample_support,
    sample_validation,
    save_trained,
    train_config,
    trained_method,
)

if TYPE_CHECKING:
    from clinadapt.runner.experiment import ExperimentConfig

TEST_TIME_FIELDS = ("shift", "tta", "tta_options", "tta_mode", "tta_batch_size")
"""With ``adaptive_temperature``: the options that change only how a trained model is tested."""


@dataclass
class TrainedSource:
    """A trained classification model and what testing it needs; ``run_id`` and ``run_dir``
    are those of the run that trained it (its adapter, history and checkpoint lie there)."""

    run_id: str
    """The id of ``source_config`` of the run that trained it."""
    trained_for: str
    """The id of the run that trained it (the source run itself, or a run with test-time
    options trained and tested in one go)."""
    run_dir: Path
    dataset: Any
    model: Any
    method: Any
    preprocess: Any
    slice_volumes: bool
    train_cfg: Any
    result: Any
    adapter_bytes: int
    support: np.ndarray
    actual_shots: Any
    val_picked: np.ndarray
    val_scores: np.ndarray
    """The model's clean validation outputs, which fit the temperature of every run it tests."""
    setup_s: float
    train_s: float
    """Training, saving the adapter and predicting the validation images."""


def source_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with the test-time options at their defaults: the run whose trained model every
    run differing from it only in those options is evaluated with."""
    defaults = {f.name: f for f in dataclasses.fields(cfg)}
    values = {
        name: defaults[name].default_factory()
        if defaults[name].default is dataclasses.MISSING
        else defaults[name].default
        for name in (*TEST_TIME_FIELDS, "adaptive_temperature")
    }
    return dataclasses.replace(cfg, **values)


def run_finetune(cfg: ExperimentConfig, run_dir: Path, *, progress: bool = True) -> dict[str, Any]:
    """Train ``cfg.method`` and return the run record; the adapter is saved in ``run_dir``."""
    return evaluate_trained(cfg, train_source(cfg, run_dir, progress=progress), run_dir)


def train_source(cfg: ExperimentConfig, run_dir: Path, *, progress: bool = True) -> TrainedSource:
    """Train ``cfg.method`` (or resume it from ``run_dir``'s checkpoint), save its adapter in
    ``run_dir`` and predict the validation images once. Test-time options of ``cfg`` that cannot
    apply to the model fail here, before training."""
    from clinadapt.adapt import create_method
    from clinadapt.adapt.finetune import AdaptedModel
    from clinadapt.backbones import create_backbone
    from clinadapt.data import load_dataset
    from clinadapt.data.dataset import Subset
    from clinadapt.data.shifts import apply_shift
    from clinadapt.data.transforms import slices_volumes
    from clinadapt.engine.predict import predict_proba
    from clinadapt.engine.train import train
    from clinadapt.runner.identity import run_id
    from clinadapt.tasks import task_for

    setup_start = time.perf_counter()
    dataset = load_dataset(cfg.dataset, root=cfg.data_root, size=cfg.size)
    apply_shift(dataset, cfg.shift)  # a test set that cannot be made fails before training
    info = dataset.info
    task = task_for(info.task)
    train_cfg = train_config(cfg, task)
    backbone = create_backbone(cfg.backbone, cfg.weights, trust_pickle=cfg.trust_pickle)
    preprocess = make_preprocess(backbone, cfg, task)
    slice_volumes = slices_volumes(info.ndim, preprocess)
    if slice_volumes and cfg.volume_mode != "axial":
        raise ConfigError(
            f"volume_mode={cfg.volume_mode!r}: training feeds volumes to a 2D backbone as axial "
            "slices only; use volume_mode=axial, a frozen-feature method, or a 3D backbone"
        )
    train_split, val_split = dataset["train"], dataset["val"]
    support, actual_shots = sample_support(cfg, info, train_split.labels)
    val_picked = sample_validation(cfg, info, val_split.labels)
    method = create_method(cfg.method, cfg.method_options)
    with torch.random.fork_rng():  # the new head and adapter layers start the same for a seed
        torch.manual_seed(cfg.seed)
        model = method.apply(AdaptedModel(backbone, info.num_classes, task.name))
    check_trained(cfg, info.task, model, slice_volumes)
    setup_s = time.perf_counter() - setup_start
    train_start = time.perf_counter()
    val_images = val_split.images
    if len(val_picked) < len(val_split):
        val_images = Subset(val_images, val_picked)
    result = train(
        model,
        (Subset(train_split.images, support), train_split.labels[support]),
        (val_images, val_split.labels[val_picked]),
        task=info.task,
        num_classes=info.num_classes,
        preprocess=preprocess,
        config=train_cfg,
        out_dir=run_dir,
        resume=cfg.resume,
        progress=progress,
        volume=slice_volumes,
    )
    adapter_bytes = save_trained(model, method, run_dir)
    val_scores = predict_proba(
        model,
        val_images,
        task=info.task,
        preprocess=preprocess,
        batch_size=train_cfg.batch_size,
        precision=result.precision,
        volume=slice_volumes,
        max_slices=train_cfg.max_slices,
        progress=progress,
    )
    return TrainedSource(
        run_id=run_id(source_config(cfg)),
        trained_for=run_id(cfg),
        run_dir=run_dir,
        dataset=dataset,
        model=model,
        method=method,
        preprocess=preprocess,
        slice_volumes=slice_volumes,
        train_cfg=train_cfg,
        result=result,
        adapter_bytes=adapter_bytes,
        support=support,
        actual_shots=actual_shots,
        val_picked=val_picked,
        val_scores=val_scores,
        setup_s=setup_s,
        train_s=time.perf_counter() - train_start,
    )


def evaluate_trained(
    cfg: ExperimentConfig, source: TrainedSource, run_dir: Path, *, progress: bool = True
) -> dict[str, Any]:
    """The record of ``cfg``: ``source``'s model tested under ``cfg``'s test-time options (a
    shifted test set, test-time adaptation, adaptive temperature). A run other than the source
    itself records where its model was trained (``trained_in``) and, as its own time, only its
    testing."""
    from clinadapt.data.shifts import apply_shift
    from clinadapt.engine.predict import predict_proba
    from clinadapt.runner.identity import run_block
    from clinadapt.runner.records import build_record
    from clinadapt.tasks import task_for

    run = run_block(cfg)
    if run_block(source_config(cfg))["id"] != source.run_id:
        raise ConfigError(
            f"run {run['id']} differs from the run that trained {source.run_dir} in more than "
            f"its test-time options ({', '.join(TEST_TIME_FIELDS)}, adaptive_temperature)"
        )
    own = run["id"] == source.trained_for
    start = time.perf_counter()
    dataset = apply_shift(source.dataset, cfg.shift)
    info = dataset.info
    task = task_for(info.task)
    model, train_cfg, result = source.model, source.train_cfg, source.result
    if not own:
        check_trained(cfg, info.task, model, source.slice_volumes)
    test_split = dataset["test"]
    predict_start = time.perf_counter()
    with tta.attention_patch(cfg.adaptive_temperature, model.backbone) as patched:
        if cfg.tta == "none":
            scores = predict_proba(
                model,
                test_split.images,
                task=info.task,
                preprocess=source.preprocess,
                batch_size=train_cfg.batch_size,
                precision=result.precision,
                volume=source.slice_volumes,
                max_slices=train_cfg.max_slices,
                progress=progress,
            )
        else:
            batches = tta.image_batches(
                test_split.images,
                source.preprocess,
                cfg.tta_batch_size,
                volume_mode="axial" if source.slice_volumes else None,
                max_slices=train_cfg.max_slices or None,
            )
            adapted = tta.trained_model(model, source.slice_volumes, result.precision)
            scores, tta_block = tta.adapt(
                adapted, batches, **tta.settings(cfg), inputs="images", precision=result.precision
            )
    predict_s = time.perf_counter() - predict_start
    if cfg.tta == "none":
        tta_block = tta.unadapted_block(predict_s, len(test_split))
    sharpened = None
    if tta.output_on(cfg):
        scores, sharpened = tta.adaptive_output(scores, info.task)
    test_y = np.asarray(test_split.labels)
    calibration = calibration_block(
        info.task,
        test_y,
        scores,
        (np.asarray(dataset["val"].labels)[source.val_picked], source.val_scores),
        run_dir=run_dir if cfg.reliability_diagram else None,
        title=f"{info.name}: {model.backbone.name} {cfg.method}{tta.describe(cfg)}, test split",
    )
    metrics: dict[str, Any] = {
        "test": task.evaluate(test_y, scores, info.task),
        "val": result.best_val,
    }
    if cfg.bootstrap > 0:
        metrics["test_ci95"] = task.bootstrap(
            test_y, scores, info.task, n_resamples=cfg.bootstrap, seed=cfg.seed
        )
    extra: dict[str, Any] = {}
    training_times = {
        "time_per_epoch_s": result.time_per_epoch_s,
        "train_s": result.total_s,
        "train_throughput": result.throughput,
    }
    if not own:  # the training and its time are the source run's record's
        extra["trained_in"] = {"run": source.run_id, "dir": str(source.run_dir)}
        training_times = {}
    return build_record(
        "finetune",
        to_dict(cfg),
        run=run,
        task=task.name,
        dataset=dataset_summary(
            info, {k: len(v) for k, v in dataset.splits.items()}, dict(dataset.provenance)
        ),
        backbone=backbone_summary(model.backbone, cfg.weights, model.base_parameters),
        preprocessing={
            **protocol(source.preprocess, dataset.size, resize_mode(cfg, task)),
            "precision": result.precision,
            "precision_check": result.precision_check,
        },
        method=trained_method(cfg, source.method, train_cfg, model, result, source.adapter_bytes),
        shots={
            "requested": cfg.shots_value(),
            "actual_per_class": source.actual_shots,
            "support_size": len(source.support),
            "val_requested": cfg.val_shots_value(),
        },
        labels_used=labels_used(len(source.support), len(source.val_picked), uses_val=True),
        metrics=metrics,
        calibration=calibration,
        tta=tta_block,
        adaptive_temperature=tta.adaptive_block(
            cfg.adaptive_temperature, info.task, patched, sharpened
        ),
        **extra,
        history=result.history,
        timings={
            "setup_s": source.setup_s,
            "setup_key": source.run_id,
            **training_times,
            "predict_s": predict_s,
            "run_s": time.perf_counter() - start + (source.train_s if own else 0.0),
        },
        peak_memory=result.peak_memory_mb,
    )


def check_trained(cfg: ExperimentConfig, task: Any, model: Any, slices: bool) -> None:
    """Test-time options that cannot apply to this model fail before training: a multi-label
    task, a tta method the network lacks the layers for, adaptive attention without attention."""
    if not tta.active(cfg):
        return
    tta.check_test_time(cfg, task)
    tta.check_attention(cfg.adaptive_temperature, model.backbone)
    if cfg.tta != "none":
        from clinadapt.tta import create_tta

        create_tta(cfg.tta, cfg.tta_options).check(tta.trained_model(model, slices))
