"""The training half of a trained prompted run (``sam_decoder``, ``sam_lora``, ``sam_full``):
the SAM learns from prompts drawn from ``shots`` labelled training cases (volumes: their axial
slices), the best epoch chosen by Dice on a validation budget of as many cases, with the engine's
checkpoints, resume and early stopping; the adapter is written next to the run's record."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from clinadapt.config import to_dict

if TYPE_CHECKING:
    from clinadapt.adapt.prompted_tuning import SamTuning
    from clinadapt.adapt.sam_segmenter import PromptedSegmenter
    from clinadapt.backbones.sam import PromptableSAM
    from clinadapt.engine.train_config import TrainConfig, TrainResult
    from clinadapt.runner.experiment import ExperimentConfig
    from clinadapt.tasks import Task

PROMPTED_TRAIN_DEFAULTS = {"augment": "none", "batch_size": 8, "lr": 1e-4, "epochs": 20}
"""No augmentation by default: flips would move the encoder frame's zero padding off the right and
bottom, where the weights always saw it. lr 1e-4 (MedSAM fine-tunes with AdamW at 1e-4)."""
ENCODER_TRAINING_DEFAULTS = {"batch_size": 2, "grad_accumulation": 4}
"""sam_lora and sam_full back-propagate through the full-resolution encoder: about 1.4 GB of
activations per 256 px image on a CPU (a batch of 8 was killed for memory at 11.6 GB), so they
take 2 images a step and accumulate 4 steps, the same 8 images per update."""


@dataclass
class TrainedPrompted:
    segmenter: PromptedSegmenter
    result: TrainResult
    train_cfg: TrainConfig
    support: np.ndarray
    val_picked: np.ndarray
    adapter_bytes: int


def train_prompted(
    cfg: ExperimentConfig,
    method: SamTuning,
    sam: PromptableSAM,
    dataset: Any,
    task: Task,
    run_dir: Path,
    *,
    progress: bool,
) -> TrainedPrompted:
    from clinadapt.adapt.sam_checkpoint import save_sam_adapter
    from clinadapt.adapt.sam_segmenter import PromptedSegmenter
    from clinadapt.backbones.sam.pairs import SamPairs
    from clinadapt.data import few_shot_cases
    from clinadapt.engine.train import train
    from clinadapt.runner.common import capped_budget, training_cases
    from clinadapt.runner.records import is_main_process

    info = dataset.info
    train_cfg = prompted_train_config(cfg, task)
    train_split, val_split = dataset["train"], dataset["val"]
    support = few_shot_cases(len(train_split), cfg.shots_value(), cfg.seed)
    budget = cfg.val_shots_value()
    val_picked = few_shot_cases(len(val_split), capped_budget(budget, len(val_split)), cfg.seed)
    slices = info.ndim == 3
    with torch.random.fork_rng():  # LoRA layers start the same for a seed
        torch.manual_seed(cfg.seed)
        segmenter = method.apply(PromptedSegmenter(sam, info.num_classes, method.config.recipe()))
    result = train(
        segmenter,
        training_cases(train_split, support, slices),
        training_cases(val_split, val_picked, slices),
        task=info.task,
        num_classes=info.num_classes,
        preprocess=SamPairs(sam.image_size),
        config=train_cfg,
        out_dir=run_dir,
        resume=cfg.resume,
        progress=progress,
    )
    adapter_bytes = 0
    if is_main_process():
        adapter = save_sam_adapter(
            segmenter, method, cfg.method, str(cfg.weights), run_dir / "adapter"
        )
        adapter_bytes = sum(p.stat().st_size for p in adapter.iterdir())
    return TrainedPrompted(segmenter, result, train_cfg, support, val_picked, adapter_bytes)


def prompted_train_config(cfg: ExperimentConfig, task: Task) -> TrainConfig:
    """The run's training options over the prompted defaults over the task's."""
    from clinadapt.adapt import METHODS
    from clinadapt.runner.common import train_config

    defaults = dict(PROMPTED_TRAIN_DEFAULTS)
    if not METHODS.get(cfg.method).encoder_frozen:
        defaults.update(ENCODER_TRAINING_DEFAULTS)
    if cfg.batch_size is not None or "batch_size" in cfg.train:
        defaults.pop("batch_size")
        defaults.pop("grad_accumulation", None)
    return train_config(dataclasses.replace(cfg, train={**defaults, **cfg.train}), task)


def trained_block(trained: TrainedPrompted, method: SamTuning) -> dict[str, Any]:
    """What the record's ``method`` block adds for a trained prompted run."""
    s = trained.segmenter
    trainable = sum(p.numel() for p in s.parameters() if p.requires_grad)
    base = sum(p.numel() for n, p in s.named_parameters() if "lora_" not in n)
    return {
        "train": to_dict(trained.train_cfg),
        "selected": {"best_epoch": trained.result.best_epoch, **method.selected()},
        "fitted_parameters": trainable,
        "trainable_backbone_parameters": trainable,
        "trainable_percent_of_backbone": 100.0 * trainable / max(base, 1),
        "adapter_bytes": trained.adapter_bytes,
        "stopped_early": trained.result.stopped_early,
    }
