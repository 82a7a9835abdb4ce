"""A tiny training run, also used by the DDP test:

    accelerate launch --num_processes 2 --cpu tests/engine/ddp_script.py OUT_DIR

Each process saves its final parameters as ``rank<N>.pt``; the main process also writes
``result.json``. ``TinyNet`` and ``tiny_data`` are shared with the single-process tests.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from clinadapt.data import Dataset, Preprocess, make_synthetic
from clinadapt.engine.train import train
from clinadapt.engine.train_config import TrainConfig

PREPROCESS = Preprocess(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "nearest")


class TinyNet(nn.Module):
    """Conv + BatchNorm + dropout features and a linear head: CPU-fast, with the parts whose
    handling the tests check."""

    def __init__(self, num_classes: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
        )
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def tiny_model(num_classes: int = 2, *, dropout: float = 0.0, frozen: bool = False) -> TinyNet:
    """The same initial weights on every call (and every process)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TinyNet(num_classes, dropout)
    model.features.requires_grad_(not frozen)
    return model


def tiny_data(task: str = "binary", **kwargs) -> Dataset:
    options = {"n_train": 48, "n_val": 24, "n_test": 1, "size": 16, **kwargs}
    return make_synthetic(task, **options)


def run(
    model,
    data,
    tmp_path,
    task="binary",
    num_classes=2,
    val=True,
    volume=False,
    preprocess=PREPROCESS,
    on_epoch_end=None,
    resume=False,
    **options,
):
    """A fast single-process ``train`` on ``data``; ``options`` override ``TrainConfig``."""
    fast = {"batch_size": 16, "precision": "fp32", "device": "cpu", "augment": "none"}
    config = TrainConfig(**{**fast, "epochs": 2, **options})
    return train(
        model,
        (data["train"].images, data["train"].labels),
        (data["val"].images, data["val"].labels) if val else None,
        task=task,
        num_classes=num_classes,
        preprocess=preprocess,
        config=config,
        out_dir=tmp_path,
        resume=resume,
        progress=False,
        volume=volume,
        on_epoch_end=on_epoch_end,
    )


def main(out: Path) -> None:
    data = tiny_data()
    model = tiny_model(dropout=0.1)
    result = train(
        model,
        (data["train"].images, data["train"].labels),
        (data["val"].images, data["val"].labels),
        task="binary",
        num_classes=2,
        preprocess=PREPROCESS,
        config=TrainConfig(epochs=2, batch_size=8, lr=0.05, precision="fp32"),  # device auto
        out_dir=out,
        progress=False,
    )
    rank = int(os.environ.get("RANK", "0"))
    torch.save(model.state_dict(), out / f"rank{rank}.pt")
    if rank == 0:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        (out / "result.json").write_text(json.dumps({**result.to_dict(), "world_size": world}))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
