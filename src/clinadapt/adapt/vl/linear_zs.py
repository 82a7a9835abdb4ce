"""A linear probe that starts from the zero-shot classifier and is held near it: CLAP
(Silva-Rodriguez, Hajimiri, Ben Ayed and Dolz 2024, "A Closer Look at the Few-Shot Adaptation of
Large Vision-Language Models", CVPR).

Class prototypes W start at the class-text embeddings T; logits are ``logit_scale`` times the
cosine similarity of an image embedding to each prototype (the zero-shot classifier at the start),
and training minimises cross-entropy on the support set plus the class-adaptive penalty

    sum_c lambda_c ||w_c - t_c||^2 / C,

where lambda_c is the mean zero-shot probability of class c over the support examples of class c
(CLAP's initialisation of its multipliers): classes the text already recognises stay close to it,
classes it misses may move. No validation labels are needed. SGD with momentum on the
cross-entropy, each step followed by the penalty's proximal step (exact for a quadratic, so any
weight is stable); the multipliers are kept at their initial values (CLAP also updates them with
an augmented Lagrangian, left out here). Multi-label tasks get one (absent, present) head per
label.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from clinadapt.adapt._checks import check_fit_inputs
from clinadapt.adapt.base import METHODS
from clinadapt.adapt.vl.base import TextMethod, TextOptions
from clinadapt.data.info import TaskType
from clinadapt.errors import ConfigError
from clinadapt.text.classifier import head_targets


@dataclass
class LinearZSConfig(TextOptions):
    epochs: int = field(default=300, metadata={"help": "passes over the support set"})
    lr: float = field(default=0.1, metadata={"help": "SGD learning rate (momentum 0.9)"})
    batch_size: int = field(default=256, metadata={"help": "support examples per step"})
    penalty: float | None = field(
        default=None,
        metadata={
            "help": "weight of ||w_c - t_c||^2 for every class; null: CLAP's class-adaptive "
            "weights (mean zero-shot probability of the true class on the support set)"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ConfigError(
                f"epochs and batch_size must be positive and lr > 0, got {self.epochs}, "
                f"{self.batch_size}, {self.lr}"
            )
        if self.penalty is not None and not self.penalty >= 0:
            raise ConfigError(f"penalty must be null or >= 0, got {self.penalty}")


def clap_multipliers(zero_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(H, K) lambda: per head and option, the mean zero-shot probability of that option over the
    support examples that have it; 1 (stay at the text) for an option with none."""
    p = torch.softmax(zero_logits.double(), dim=-1)  # (N, H, K)
    hot = F.one_hot(targets, p.shape[-1]).double()
    counts = hot.sum(dim=0)
    mean = (p * hot).sum(dim=0) / counts.clamp(min=1)
    return torch.where(counts > 0, mean, torch.ones_like(mean)).float()


class LinearZS(TextMethod):
    """``selected()`` reports the multipliers (mean and per class) and the final loss."""

    config_cls = LinearZSConfig
    description = "linear probe initialised at the zero-shot text classifier, held near it (CLAP)"
    config: LinearZSConfig

    def __init__(self, config: LinearZSConfig | None = None) -> None:
        super().__init__(config)
        self._weights: torch.Tensor | None = None
        self._selected: dict[str, Any] = {}

    def fit(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        task: TaskType,
        num_classes: int,
        val: tuple[np.ndarray, np.ndarray] | None = None,
        seed: int = 0,
    ) -> LinearZS:
        x, y, task, _ = check_fit_inputs(features, labels, task, num_classes, val)
        clf = self._prepare(task, num_classes)
        cfg = self.config
        z = self._joint(x)
        anchors = clf.weights
        targets = torch.from_numpy(head_targets(y, task.single_label, anchors.shape[1]))
        if cfg.penalty is None:
            lam = clap_multipliers(clf.logits(z), targets)
        else:
            lam = torch.full(anchors.shape[:2], float(cfg.penalty))
        pull = (2 * cfg.lr * lam / lam.numel())[..., None]  # step size x d/dw of the mean penalty
        weights = torch.nn.Parameter(anchors.clone())
        optimiser = torch.optim.SGD([weights], lr=cfg.lr, momentum=0.9)
        generator = torch.Generator().manual_seed(seed)
        loss = torch.zeros(())
        for _ in range(cfg.epochs):
            order = torch.randperm(len(z), generator=generator)
            for start in range(0, len(order), cfg.batch_size):
                rows = order[start : start + cfg.batch_size]
                logits = self._logits(z[rows], weights)
                loss = F.cross_entropy(logits.flatten(0, 1), targets[rows].flatten())
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                with torch.no_grad():  # the penalty's proximal step: stable for any weight
                    weights.copy_((weights + pull * anchors) / (1 + pull))
        self._weights = weights.detach()
        self._selected = {
            "penalty": "clap" if cfg.penalty is None else cfg.penalty,
            "lambda_mean": float(lam.mean()),
            "lambda": lam.tolist(),
            "final_cross_entropy": float(loss.detach()),
            "moved": float((self._weights - anchors).norm(dim=-1).mean()),
        }
        return self

    def _logits(self, z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        scale = self._classifier.logit_scale
        return scale * torch.einsum("nd,hkd->nhk", z, F.normalize(weights, dim=-1))

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        self._check_fitted()
        if self._weights is None:
            raise RuntimeError("call fit() before predict_proba()")
        with torch.no_grad():
            return self._scores(
                self._logits(self._joint(features, "query features"), self._weights)
            )

    def selected(self) -> dict[str, Any]:
        return dict(self._selected)

    def fitted_parameters(self) -> int:
        return 0 if self._weights is None else int(self._weights.numel())


METHODS.register("linear_zs", LinearZS)
