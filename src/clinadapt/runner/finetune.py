"""Gradient-based runs: build backbone + method, train on the support set, evaluate once on test."""

from __future__ import annotations

import time
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


def run_finetune(cfg: ExperimentConfig, run_dir: Path, *, progress: bool = True) -> dict[str, Any]:
    """Train ``cfg.method`` and return the run record; the adapter is saved in ``run_dir``."""
    from clinadapt.adapt import create_method
    from clinadapt.adapt.finetune import AdaptedModel
    from clinadapt.backbones import create_backbone
    from clinadapt.data import load_dataset
    from clinadapt.data.dataset import Subset
    from clinadapt.data.shifts import apply_shift
    from clinadapt.data.transforms import slices_volumes
    from clinadapt.engine.predict import predict_proba
    from clinadapt.engine.train import train
    from clinadapt.runner.identity import run_block
    from clinadapt.runner.records import build_record
    from clinadapt.tasks import task_for

    setup_start = time.perf_counter()
    dataset = apply_shift(load_dataset(cfg.dataset, root=cfg.data_root, size=cfg.size), cfg.shift)
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
    train_split, val_split, test_split = dataset["train"], dataset["val"], dataset["test"]
    support, actual_shots = sample_support(cfg, info, train_split.labels)
    val_picked = sample_validation(cfg, info, val_split.labels)
    method = create_method(cfg.method, cfg.method_options)
    with torch.random.fork_rng():  # the new head and adapter layers start the same for a seed
        torch.manual_seed(cfg.seed)
        model = method.apply(AdaptedModel(backbone, info.num_classes, task.name))
    check_trained(cfg, info.task, model, slice_volumes)
    setup_s = time.perf_counter() - setup_start
    run_start = time.perf_counter()
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

    def predict(images: Any) -> np.ndarray:
        return predict_proba(
            model,
            images,
            task=info.task,
            preprocess=preprocess,
            batch_size=train_cfg.batch_size,
            precision=result.precision,
            volume=slice_volumes,
            max_slices=train_cfg.max_slices,
            progress=progress,
        )

    start = time.perf_counter()
    with tta.attention_patch(cfg.adaptive_temperature, model.backbone) as patched:
        if cfg.tta == "none":
            scores = predict(test_split.images)
        else:
            batches = tta.image_batches(
                test_split.images,
                preprocess,
                cfg.tta_batch_size,
                volume_mode="axial" if slice_volumes else None,
                max_slices=train_cfg.max_slices or None,
            )
            adapted = tta.trained_model(model, slice_volumes, result.precision)
            scores, tta_block = tta.adapt(
                adapted, batches, **tta.settings(cfg), inputs="images", precision=result.precision
            )
    predict_s = time.perf_counter() - start
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
        (np.asarray(val_split.labels)[val_picked], predict(val_images)),
        run_dir=run_dir,
        title=f"{info.name}: {backbone.name} {cfg.method}{tta.describe(cfg)}, test split",
    )
    metrics: dict[str, Any] = {
        "test": task.evaluate(test_y, scores, info.task),
        "val": result.best_val,
    }
    if cfg.bootstrap > 0:
        metrics["test_ci95"] = task.bootstrap(
            test_y, scores, info.task, n_resamples=cfg.bootstrap, seed=cfg.seed
        )
    run = run_block(cfg)
    return build_record(
        "finetune",
        to_dict(cfg),
        run=run,
        task=task.name,
        dataset=dataset_summary(
            info, {k: len(v) for k, v in dataset.splits.items()}, dict(dataset.provenance)
        ),
        backbone=backbone_summary(backbone, cfg.weights, model.base_parameters),
        preprocessing={
            **protocol(preprocess, dataset.size, resize_mode(cfg, task)),
            "precision": result.precision,
            "precision_check": result.precision_check,
        },
        method=trained_method(cfg, method, train_cfg, model, result, adapter_bytes),
        shots={
            "requested": cfg.shots_value(),
            "actual_per_class": actual_shots,
            "support_size": len(support),
            "val_requested": cfg.val_shots_value(),
        },
        labels_used=labels_used(len(support), len(val_picked), uses_val=True),
        metrics=metrics,
        calibration=calibration,
        tta=tta_block,
        adaptive_temperature=tta.adaptive_block(
            cfg.adaptive_temperature, info.task, patched, sharpened
        ),
        history=result.history,
        timings={
            "setup_s": setup_s,
            "setup_key": run["id"],
            "time_per_epoch_s": result.time_per_epoch_s,
            "train_s": result.total_s,
            "predict_s": predict_s,
            "run_s": time.perf_counter() - run_start,
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
