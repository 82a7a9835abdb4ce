"""Optimisers and learning-rate schedules for the training loop.

Schedules are stepped once per optimiser step (not per epoch) so that warm-up is smooth even
for short runs; epoch-based recipes (the MedMNIST v2 step decay at epochs 50 and 75) are
translated to optimiser steps with the number of steps per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "step", "constant")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters only, biases and norm weights (1-D tensors) without weight decay:
    decaying them towards zero hurts normalisation layers and buys no regularisation."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    groups: Iterable[dict], name: str, lr: float, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """``adamw`` (decoupled decay), ``adam`` (L2 decay, the MedMNIST v2 recipe) or ``sgd``."""
    groups = list(groups)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    raise ValueError(f"unknown optimizer {name!r}")  # TrainConfig validates names first


def lr_factor(
    schedule: str,
    steps_per_epoch: int,
    epochs: int,
    warmup_epochs: float = 0.0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> Callable[[int], float]:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based).

    ``cosine``: linear warm-up from ``1 / warmup_steps`` to 1, then half a cosine down to 0 at
    the end of the last epoch. ``step``: ``gamma ** (number of milestones reached)``, milestones
    in epochs. ``constant``: 1.
    """
    total = max(1, steps_per_epoch * epochs)
    warmup = min(total - 1, round(warmup_epochs * steps_per_epoch))
    bounds = sorted(m * steps_per_epoch for m in milestones)

    def cosine(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def stepwise(step: int) -> float:
        return gamma ** sum(step >= b for b in bounds)

    if schedule == "cosine":
        return cosine
    if schedule == "step":
        return stepwise
    if schedule == "constant":
        return lambda step: 1.0
    raise ValueError(f"unknown schedule {schedule!r}")  # TrainConfig validates names first
