"""Tip-Adapter and Tip-Adapter-F (Zhang et al. 2022, "Tip-Adapter: Training-free Adaption of
CLIP for Few-shot Classification", ECCV).

A cache model beside the zero-shot classifier: keys are the support images' unit embeddings,
values their one-hot labels. For a query embedding f, affinities A = exp(-beta (1 - f K^T)) and

    logits = zero-shot logits + alpha * A V.

``tip_adapter`` uses the cache as it is (training-free); ``tip_adapter_f`` first trains the keys
with cross-entropy on the support set (AdamW, cosine schedule, alpha and beta at their defaults),
as the paper does, but on cached features: the training inputs are the support embeddings
themselves, not the paper's augmented views. Both then choose alpha and beta on the run's
validation examples (no more than its label budget) over the paper's grid, by accuracy with ties
broken by lower cross-entropy; without validation examples they keep the defaults.
Multi-label tasks get one cache head per label over (absent, present).
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

_VAL_BLOCK = 1 << 22  # affinity entries per block of validation rows


@dataclass
class TipAdapterConfig(TextOptions):
    alpha: float = field(
        default=1.0, metadata={"help": "weight of the cache logits when nothing is searched"}
    )
    beta: float = field(
        default=1.0, metadata={"help": "sharpness of the cache affinities when nothing is searched"}
    )
    search_scale: tuple[float, float] = field(
        default=(7.0, 3.0),
        metadata={"help": "upper ends of the beta and alpha grids (each starts at 0.1)"},
    )
    search_step: tuple[int, int] = field(
        default=(200, 20), metadata={"help": "grid points for beta and alpha; (0, 0): no search"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.alpha >= 0 and self.beta >= 0):
            raise ConfigError(f"alpha and beta must not be negative, got {self.alpha}, {self.beta}")
        if len(self.search_scale) != 2 or any(not s > 0.1 for s in self.search_scale):
            raise ConfigError(
                f"search_scale must be two numbers above 0.1, got {self.search_scale}"
            )
        if len(self.search_step) != 2 or any(s < 0 for s in self.search_step):
            raise ConfigError(f"search_step must be two counts >= 0, got {self.search_step}")
        if (self.search_step[0] == 0) != (self.search_step[1] == 0):
            raise ConfigError(f"search_step must both be 0 or both positive: {self.search_step}")

    def grids(self) -> tuple[np.ndarray, np.ndarray]:
        """The paper's grids: ``0.1 + i (scale - 0.1) / steps`` for i < steps."""
        (beta_top, alpha_top), (beta_n, alpha_n) = self.search_scale, self.search_step
        betas = 0.1 + np.arange(beta_n) * (beta_top - 0.1) / max(beta_n, 1)
        alphas = 0.1 + np.arange(alpha_n) * (alpha_top - 0.1) / max(alpha_n, 1)
        return betas, alphas


@dataclass
class TipAdapterFConfig(TipAdapterConfig):
    epochs: int = field(default=20, metadata={"help": "passes over the support set"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the cache keys"})
    batch_size: int = field(default=256, metadata={"help": "support examples per step"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ConfigError(
                f"epochs and batch_size must be positive and lr > 0, got {self.epochs}, "
                f"{self.batch_size}, {self.lr}"
            )


def cache_logits(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, beta: float):
    """(N, H, K) cache logits: exp(-beta (1 - f K^T)) V, with values (M, H, K)."""
    affinity = torch.exp(-beta * (1.0 - query @ keys.T))
    return torch.einsum("nm,mhk->nhk", affinity, values)


class TipAdapter(TextMethod):
    """Training-free: the cache is the support set; ``selected()`` has alpha, beta and how they
    were chosen."""

    config_cls = TipAdapterConfig
    description = "Tip-Adapter: zero-shot text classifier plus a cache of the support embeddings"
    uses_validation = True
    config: TipAdapterConfig

    def __init__(self, config: TipAdapterConfig | None = None) -> None:
        super().__init__(config)
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        self._alpha, self._beta = self.config.alpha, self.config.beta
        self._selected: dict[str, Any] = {}

    def fit(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        task: TaskType,
        num_classes: int,
        val: tuple[np.ndarray, np.ndarray] | None = None,
        seed: int = 0,
    ) -> TipAdapter:
        x, y, task, val = check_fit_inputs(features, labels, task, num_classes, val)
        clf = self._prepare(task, num_classes)
        options = clf.weights.shape[1]
        targets = torch.from_numpy(head_targets(y, task.single_label, options))
        self._keys = self._joint(x)
        self._values = F.one_hot(targets, options).double()
        self._train_keys(targets, seed)
        self._alpha, self._beta = self.config.alpha, self.config.beta
        self._selected = {"alpha": self._alpha, "beta": self._beta, "selection": "default"}
        if val is not None and self.config.search_step[0] > 0:
            self._search(self._joint(val[0], "validation features"), val[1])
        return self

    def _train_keys(self, targets: torch.Tensor, seed: int) -> None:
        """Training-free: the keys stay the support embeddings."""

    def _search(self, z: torch.Tensor, labels: np.ndarray) -> None:
        """Every (beta, alpha) of the grid on the validation examples; best accuracy, then the
        lowest cross-entropy."""
        betas, alphas = self.config.grids()
        options = self._classifier.weights.shape[1]
        t = torch.from_numpy(head_targets(labels, self._task.single_label, options))
        zero = self._classifier.logits(z).double()
        a = torch.as_tensor(alphas, dtype=torch.float64).view(-1, 1, 1, 1)
        best_key, best = (-np.inf, -np.inf), (self._alpha, self._beta)
        for beta in betas:
            logits = zero + a * self._cache(z, float(beta))  # (alphas, N, H, K)
            acc = (logits.argmax(-1) == t).double().mean(dim=(1, 2))
            picked = t.expand(len(alphas), -1, -1)[..., None]
            nll = -torch.log_softmax(logits, -1).gather(-1, picked).mean(dim=(1, 2, 3))
            for i in range(len(alphas)):
                key = (float(acc[i]), -float(nll[i]))
                if key > best_key:
                    best_key, best = key, (float(alphas[i]), float(beta))
        self._alpha, self._beta = best
        self._selected = {
            "alpha": self._alpha,
            "beta": self._beta,
            "selection": "validation accuracy, ties by cross-entropy",
            "val_acc": best_key[0],
            "val_cross_entropy": -best_key[1],
            "grid": [len(betas), len(alphas)],
        }

    def _cache(self, z: torch.Tensor, beta: float) -> torch.Tensor:
        step = max(1, _VAL_BLOCK // max(len(self._keys), 1))
        return torch.cat(
            [
                cache_logits(z[i : i + step].double(), self._keys.double(), self._values, beta)
                for i in range(0, len(z), step)
            ]
        )

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        self._check_fitted()
        z = self._joint(features, "query features")
        logits = self._classifier.logits(z).double() + self._alpha * self._cache(z, self._beta)
        return self._scores(logits)

    def selected(self) -> dict[str, Any]:
        return dict(self._selected)


class TipAdapterF(TipAdapter):
    """The keys are fine-tuned first; ``fitted_parameters`` counts them."""

    config_cls = TipAdapterFConfig
    description = "Tip-Adapter-F: Tip-Adapter with its cache keys trained on the support set"
    config: TipAdapterFConfig

    def _train_keys(self, targets: torch.Tensor, seed: int) -> None:
        cfg = self.config
        generator = torch.Generator().manual_seed(seed)
        keys = torch.nn.Parameter(self._keys.clone())
        optimiser = torch.optim.AdamW([keys], lr=cfg.lr, eps=1e-4)
        steps_per_epoch = -(-len(keys) // cfg.batch_size)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimiser, cfg.epochs * steps_per_epoch
        )
        inputs, zero = self._keys, self._classifier.logits(self._keys)
        values = self._values.float()
        for _ in range(cfg.epochs):
            order = torch.randperm(len(inputs), generator=generator)
            for start in range(0, len(order), cfg.batch_size):
                rows = order[start : start + cfg.batch_size]
                affinity = torch.exp(-cfg.beta * (1.0 - inputs[rows] @ keys.T))
                logits = zero[rows] + cfg.alpha * torch.einsum("nm,mhk->nhk", affinity, values)
                loss = F.cross_entropy(logits.flatten(0, 1), targets[rows].flatten())
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
        self._keys = keys.detach()

    def fitted_parameters(self) -> int:
        return 0 if self._keys is None else int(self._keys.numel())


METHODS.register("tip_adapter", TipAdapter)
METHODS.register("tip_adapter_f", TipAdapterF)
