"""What tent, sar and eata share: the affine parameters of normalisation layers train, batch-norm
layers normalise with the statistics of the test batch, and SGD with momentum 0.9 updates them.

As in Wang et al. 2021 (Tent), Niu et al. 2022 (EATA) and Niu et al. 2023 (SAR): every other
parameter is frozen; batch-norm layers drop their running statistics, so they normalise (and back-
propagate) through the batch's mean and variance. Layer and group norms already normalise each
image by itself; their affine parameters train too (as SAR does for ViTs and GN ResNets). Unlike
the papers' code, which puts the whole network in train mode, only the normalisation layers are:
dropout and stochastic depth stay off, so predictions stay deterministic.

The learning rate is given at the papers' batch size of 64 (0.00025 for ImageNet with SGD) and
scaled linearly to the run's batch size (the first batch's), as SAR does.
"""

from __future__ import annotations

import math
from dataclasses import field
from typing import Any

import torch
from torch import nn

from clinadapt.errors import ClinadaptError, ConfigError
from clinadapt.tta.base import Session, TTAMethod, TTAResult
from clinadapt.tta.model import TTAModel, batch_norms, norm_affine_parameters

REFERENCE_BATCH = 64
MOMENTUM = 0.9


def lr_field() -> Any:
    return field(
        default=0.00025,
        metadata={
            "help": "SGD learning rate at batch size 64 (the papers' ImageNet value); scaled "
            "linearly to the batch size"
        },
    )


def margin_field() -> Any:
    return field(
        default=0.4,
        metadata={
            "help": "entropy margin as a fraction of ln C: only examples with entropy below "
            "margin * ln C adapt (0.4 in the paper)"
        },
    )


def check_positive(method: str, **values: float) -> None:
    for key, value in values.items():
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"tta {method!r}: {key} must be positive and finite, got {value}")


def configure_norms(model: nn.Module) -> list[nn.Parameter]:
    """Freeze everything but normalisation affine parameters; batch norms use batch statistics."""
    model.eval()
    model.requires_grad_(False)
    for module in batch_norms(model):
        module.train()
        module.track_running_stats = False
        module.running_mean = None
        module.running_var = None
    params = [p for _, p in norm_affine_parameters(model)]
    for p in params:
        p.requires_grad_(True)
    return params


class NormAffineMethod(TTAMethod):
    """A method that trains normalisation affine parameters by SGD from the batch's outputs."""

    def check(self, model: TTAModel) -> None:
        super().check(model)
        if not norm_affine_parameters(model):
            raise ClinadaptError(
                f"{self.name} updates the affine parameters of normalisation layers; "
                f"{model.name} has none (no BatchNorm, LayerNorm or GroupNorm with a scale or "
                "shift): use tta 't3a' or 'lame', which only need features and a linear head"
            )

    def min_batch(self, model: TTAModel) -> int:
        return 2 if batch_norms(model) else 1

    def uses_batch_statistics(self, model: TTAModel) -> bool:
        return bool(batch_norms(model))  # configure_norms switches them to batch statistics

    def scaled_lr(self, batch_size: int) -> float:
        return self.config.lr * batch_size / REFERENCE_BATCH


class NormAffineSession(Session):
    """SGD (momentum 0.9) on the normalisation affine parameters of ``model``."""

    def __init__(self, model: TTAModel, result: TTAResult, lr: float) -> None:
        super().__init__(model, result)
        self.params = configure_norms(model)
        self.optimizer = torch.optim.SGD(self.params, lr=lr, momentum=MOMENTUM)
        self.diverged = False
        result.details["lr"] = lr
        result.details["adapted_parameters"] = sum(p.numel() for p in self.params)

    def backward(self, loss: torch.Tensor) -> bool:
        """Gradients of ``loss``; False (and the state marked diverged) if it is not finite."""
        self.optimizer.zero_grad(set_to_none=True)
        if not bool(torch.isfinite(loss)):
            self.diverged = True
            return False
        loss.backward()
        return True

    def healthy(self) -> bool:
        return not self.diverged and all(bool(torch.isfinite(p).all()) for p in self.params)

    def reset(self) -> None:
        super().reset()
        self.diverged = False
