"""T3A: test-time template adjuster, a training-free update of the linear classifier.

Iwasawa and Matsuo 2021, "Test-Time Classifier Adjustment Module for Model-Agnostic Domain
Generalization" (NeurIPS). The backbone and head stay as trained (eval mode); the head is
replaced by class prototypes of test features:

- supports S_k start as the head's weight row w_k (pseudo-labelled by the head itself);
- each test feature z joins the supports of its pseudo-label argmax_k (w_k z + b_k);
- filtering: only the M = ``filter_k`` supports of lowest prediction entropy per class are kept;
- prototypes: c_k = sum_{z in S_k} z / ||z||, normalised, and the logits are z . c_k / ||c_k||
  (no bias, no temperature, as in the paper's code).

A batch is predicted with the supports after it joined them. Continual mode keeps the supports
across the test stream, as in the paper; episodic mode starts each batch from the head's rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from clinadapt.errors import ConfigError
from clinadapt.tta.base import TTA_METHODS, Session, TTAMethod, TTAResult, entropy
from clinadapt.tta.model import TTAModel


@dataclass
class T3AConfig:
    filter_k: int | None = field(
        default=100,
        metadata={
            "help": "supports kept per class, those of lowest entropy (M in the paper); "
            "null keeps all"
        },
    )

    def __post_init__(self) -> None:
        if self.filter_k is not None and self.filter_k < 1:
            raise ConfigError(
                f"tta 't3a': filter_k must be at least 1 (or null to keep all), got {self.filter_k}"
            )


class T3ASession(Session):
    def __init__(self, model: TTAModel, result: TTAResult, filter_k: int | None) -> None:
        super().__init__(model.eval(), result)
        self.filter_k = filter_k
        self.classes = model.head.out_features
        with torch.no_grad():
            rows = model.head.weight.detach().clone()
            logits = model.head(rows)
        self.warmup = (rows, logits.argmax(1), entropy(logits))
        self.forget()

    def forget(self) -> None:
        self.supports, self.labels, self.entropies = self.warmup

    def step(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = self.model.features(images)
            logits = self.model.head(z)
            old = len(self.supports)
            supports = torch.cat([self.supports, z])
            labels = torch.cat([self.labels, logits.argmax(1)])
            ent = torch.cat([self.entropies, entropy(logits)])
            keep = self._select(labels, ent)
            self.supports, self.labels, self.entropies = supports[keep], labels[keep], ent[keep]
            kept = int((keep >= old).sum())
            self.result.adapted += kept
            self.result.filtered += len(images) - kept
            prototypes = F.normalize(self.supports, dim=1).T @ F.one_hot(
                self.labels, self.classes
            ).to(z.dtype)
            return (z @ F.normalize(prototypes, dim=0)).softmax(1)

    def _select(self, labels: torch.Tensor, ent: torch.Tensor) -> torch.Tensor:
        """Indices of the ``filter_k`` lowest-entropy supports of each class, class by class."""
        keep = []
        for k in range(self.classes):
            members = torch.nonzero(labels == k).flatten()
            order = torch.sort(ent[members], stable=True).indices
            keep.append(members[order][: self.filter_k])
        return torch.cat(keep)


class T3A(TTAMethod):
    name = "t3a"
    config_cls = T3AConfig
    adapts_network = False
    description = "T3A (Iwasawa & Matsuo 2021): classifier prototypes from filtered test features"
    config: T3AConfig

    def start(
        self,
        model: TTAModel,
        batch_size: int,
        result: TTAResult,
        source: Iterable[torch.Tensor] | None,
    ) -> Session:
        return T3ASession(model, result, self.config.filter_k)


TTA_METHODS.register("t3a", T3A)
