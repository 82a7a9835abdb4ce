"""LAME: Laplacian-regularised maximum-likelihood estimation of the batch's class assignments.

Boudiaf, Mueller, Ben Ayed and Bertinetto 2022, "Parameter-free Online Test-time Adaptation"
(CVPR). The model is not touched (eval mode); only its outputs change. For a batch with source
probabilities p_i and L2-normalised features z_i, LAME finds assignments y_i on the simplex that
minimise (lambda = 1)

    L(Y) = -sum_i y_i . log p_i - sum_{i,j} w_ij y_i . y_j + sum_i y_i . log y_i,

with w_ij = 1 if z_j is among the ``knn`` nearest neighbours (Euclidean) of z_i, else 0. The
concave-convex procedure gives the fixed-point iteration

    y_i <- softmax(log p_i + sum_j w_ij y_j),

run from y_i = p_i until the relative change of L is at most 1e-8 (or ``max_steps``), as in the
paper's code. Nothing carries over between batches, so episodic and continual runs agree.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from clinadapt.errors import ConfigError
from clinadapt.tta.base import TTA_METHODS, Session, TTAMethod, TTAResult
from clinadapt.tta.model import TTAModel

TOLERANCE = 1e-8


@dataclass
class LAMEConfig:
    knn: int = field(default=5, metadata={"help": "neighbours per example in the affinity"})
    max_steps: int = field(default=100, metadata={"help": "most fixed-point iterations"})
    force_symmetry: bool = field(
        default=False, metadata={"help": "use (W + W^T) / 2 as the affinity"}
    )

    def __post_init__(self) -> None:
        for key in ("knn", "max_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"tta 'lame': {key} must be at least 1, got {getattr(self, key)}")


def knn_affinity(features: torch.Tensor, k: int) -> torch.Tensor:
    """W (N, N): w_ij = 1 for the k nearest other examples j of each example i."""
    n = len(features)
    dist = torch.cdist(features, features)
    dist.fill_diagonal_(float("inf"))
    nearest = dist.topk(min(k, n - 1), dim=1, largest=False).indices
    return torch.zeros(n, n, dtype=features.dtype, device=features.device).scatter_(1, nearest, 1.0)


def laplacian_assignments(
    probs: torch.Tensor, kernel: torch.Tensor, max_steps: int
) -> torch.Tensor:
    """Minimise L(Y) by the fixed-point iteration of the module docstring."""
    unary = -torch.log(probs + 1e-10)
    y = (-unary).softmax(1)
    previous = float("inf")
    for step in range(max_steps):
        pairwise = kernel @ y
        y = (-unary + pairwise).softmax(1)
        energy = float((unary * y - pairwise * y + y * torch.log(y.clamp_min(1e-20))).sum())
        if step > 1 and abs(energy - previous) <= TOLERANCE * abs(previous):
            break
        previous = energy
    return y


class LAMESession(Session):
    def __init__(self, model: TTAModel, result: TTAResult, config: LAMEConfig) -> None:
        super().__init__(model.eval(), result)
        self.config = config

    def step(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = self.model.features(images)
            probs = self.model.head(z).softmax(1)
            kernel = knn_affinity(F.normalize(z, dim=1), self.config.knn)
            if self.config.force_symmetry:
                kernel = (kernel + kernel.T) / 2
            self.result.adapted += len(images)
            return laplacian_assignments(probs, kernel, self.config.max_steps)


class LAME(TTAMethod):
    name = "lame"
    config_cls = LAMEConfig
    adapts_network = False
    description = "LAME (Boudiaf et al. 2022): Laplacian-regularised outputs on a kNN graph"
    config: LAMEConfig

    def start(
        self,
        model: TTAModel,
        batch_size: int,
        result: TTAResult,
        source: Iterable[torch.Tensor] | None,
    ) -> Session:
        return LAMESession(model, result, self.config)


TTA_METHODS.register("lame", LAME)
