"""Segmentation runs: train a head (and whatever the method adapts) on a few labelled cases,
predict every test case at its own size, score it in its voxel spacing, picture it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from clinadapt.config import to_dict
from clinadapt.errors import ConfigError
from clinadapt.runner.common import (
    backbone_summary,
    capped_budget,
    case_targets,
    count_empty,
    dataset_summary,
    head_kind,
    labels_used,
    make_preprocess,
    save_trained,
    train_config,
    trained_method,
    training_cases,
)

if TYPE_CHECKING:
    from clinadapt.runner.experiment import ExperimentConfig


def run_segmentation(
    cfg: ExperimentConfig, run_dir: Path, *, progress: bool = True
) -> dict[str, Any]:
    """Train ``cfg.method`` on ``cfg.shots`` training cases; the record's test metrics are
    per-case Dice, IoU, HD95 and NSD summarised with bootstrap intervals over cases."""
    from clinadapt.adapt import create_method
    from clinadapt.adapt.finetune import AdaptedModel
    from clinadapt.backbones import create_backbone
    from clinadapt.data import few_shot_cases, load_dataset
    from clinadapt.engine.predict import predict_masks
    from clinadapt.engine.train import train
    from clinadapt.runner.identity import run_block
    from clinadapt.runner.overlays import case_overlays
    from clinadapt.runner.records import build_record, is_main_process
    from clinadapt.tasks import task_for

    setup_start = time.perf_counter()
    dataset = load_dataset(cfg.dataset, root=cfg.data_root, size=cfg.size)
    info = dataset.info
    task = task_for(info.task)
    train_cfg = train_config(cfg, task)
    backbone = create_backbone(cfg.backbone, cfg.weights, trust_pickle=cfg.trust_pickle)
    preprocess = make_preprocess(backbone, cfg, task)
    slices = _slices(info.ndim, preprocess.ndim, cfg)
    train_split, val_split, test_split = dataset["train"], dataset["val"], dataset["test"]
    support = few_shot_cases(len(train_split), cfg.shots_value(), cfg.seed)
    val_budget = cfg.val_shots_value()
    val_picked = few_shot_cases(len(val_split), capped_budget(val_budget, len(val_split)), cfg.seed)
    method = create_method(cfg.method, cfg.method_options)
    with torch.random.fork_rng():  # the new head and adapter layers start the same for a seed
        torch.manual_seed(cfg.seed)
        model = method.apply(
            AdaptedModel(backbone, info.num_classes, task.name, head_kind(cfg, task))
        )
    setup_s = time.perf_counter() - setup_start
    run_start = time.perf_counter()
    result = train(
        model,
        training_cases(train_split, support, slices),
        training_cases(val_split, val_picked, slices),
        task=info.task,
        num_classes=info.num_classes,
        preprocess=preprocess,
        config=train_cfg,
        out_dir=run_dir,
        resume=cfg.resume,
        progress=progress,
    )
    adapter_bytes = save_trained(model, method, run_dir)
    start = time.perf_counter()
    predictions = predict_masks(
        model,
        test_split.images,
        preprocess=preprocess,
        batch_size=train_cfg.batch_size,
        precision=result.precision,
        slices=slices,
        progress=progress,
    )
    predict_s = time.perf_counter() - start
    targets = case_targets(test_split, info.num_classes)
    start = time.perf_counter()
    cases = task.score_cases(predictions, targets)
    test, ci = task.summarise(cases, cfg.bootstrap, cfg.seed)
    score_s = time.perf_counter() - start
    overlays = (
        case_overlays(run_dir, test_split, predictions, cases, info) if is_main_process() else {}
    )
    run = run_block(cfg)
    metrics: dict[str, Any] = {"test": test, "val": result.best_val}
    if ci:
        metrics["test_ci95"] = ci
    return build_record(
        "finetune",
        to_dict(cfg),
        run=run,
        task=task.name,
        dataset={
            **dataset_summary(
                info, {k: len(v) for k, v in dataset.splits.items()}, dict(dataset.provenance)
            ),
            "empty_masks": {
                "train": count_empty(train_split.labels, support),
                "val": count_empty(val_split.labels, val_picked),
                "test": count_empty(test_split.labels, np.arange(len(test_split))),
            },
        },
        backbone=backbone_summary(backbone, cfg.weights, model.base_parameters),
        preprocessing={
            **preprocess.describe(),
            "slices": "axial slices through a 2D backbone" if slices else None,
            "precision": result.precision,
            "precision_check": result.precision_check,
        },
        method=trained_method(cfg, method, train_cfg, model, result, adapter_bytes),
        shots={
            "requested": cfg.shots_value(),
            "actual_cases": len(support),
            "support_size": len(support),
            "val_requested": val_budget,
        },
        labels_used=labels_used(len(support), len(val_picked), uses_val=True),
        metrics=metrics,
        overlays=overlays,
        history=result.history,
        timings={
            "setup_s": setup_s,
            "setup_key": run["id"],
            "time_per_epoch_s": result.time_per_epoch_s,
            "train_s": result.total_s,
            "train_throughput": result.throughput,
            "predict_s": predict_s,
            "score_s": score_s,
            "run_s": time.perf_counter() - run_start,
        },
        peak_memory=result.peak_memory_mb,
    )


def _slices(data_ndim: int, network_ndim: int, cfg: ExperimentConfig) -> bool:
    """Whether volumes reach a 2D network slice by slice; 2D data cannot reach a 3D one."""
    if data_ndim == 2 and network_ndim == 3:
        raise ConfigError(
            f"{cfg.backbone} takes volumes but {cfg.dataset} holds 2D images; use a 2D backbone"
        )
    if data_ndim == 3 and network_ndim == 2:
        if cfg.volume_mode != "axial":
            raise ConfigError(
                f"volume_mode={cfg.volume_mode!r}: segmentation through a 2D backbone predicts "
                "axial slices and stacks them back; use volume_mode=axial or a 3D backbone"
            )
        return True
    return False
