"""EATA: efficient anti-forgetting test-time adaptation.

Niu, Wu, Zhang, Chen, Zheng, Zhao and Tan 2022, "Efficient Test-Time Model Adaptation without
Forgetting" (ICML). Entropy minimisation of the normalisation affine parameters (see
``gradient``) on the samples that pass two filters, each weighted by its certainty:

- reliability: S_ent(x) = 1[E(x) < E_0], E_0 = ``margin`` * ln C (0.4 ln C in the paper);
- non-redundancy: S_div(x) = 1[|cos(m_{t-1}, y_hat(x))| < ``d_margin``], where m_t, a moving
  average (0.9) of the mean probabilities of the samples that passed both filters, starts as the
  mean over the first batch's reliable samples (no redundancy filter on that batch);
- weighting: S(x) = 1 / exp(E(x) - E_0), so the loss is 1/B sum_i S(x_i) E(x_i) over the kept
  samples (B: their number).

The anti-forgetting term, ``fisher_alpha`` * sum_i F(theta_i) (theta_i - theta_i^o)^2,
needs source images to estimate the diagonal Fisher information F (the squared gradient of the
cross-entropy to the model's own predictions, averaged over the source batches): it is off by
default (``fisher_alpha`` = 0; the paper uses 2000 with 2000 images) and, when on, ``run`` takes
the images as ``source=``. ``d_margin`` = 0.05 is the paper's ImageNet value; with few classes the
cosine between probability vectors is rarely that small (the paper uses 0.4 for CIFAR-10), so few
samples pass the redundancy filter after the first batch unless it is raised.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from clinadapt.errors import ConfigError
from clinadapt.tta.base import TTA_METHODS, Session, TTAResult, check_batch, entropy
from clinadapt.tta.gradient import (
    NormAffineMethod,
    NormAffineSession,
    check_positive,
    lr_field,
    margin_field,
)
from clinadapt.tta.model import TTAModel

EMA = 0.9


@dataclass
class EATAConfig:
    lr: float = lr_field()
    margin: float = margin_field()
    d_margin: float = field(
        default=0.05,
        metadata={
            "help": "redundancy filter: adapt only on samples whose probabilities have cosine "
            "similarity below d_margin to the moving average of recent ones"
        },
    )
    fisher_alpha: float = field(
        default=0.0,
        metadata={
            "help": "weight of the Fisher anti-forgetting term; > 0 needs source images "
            "(run(..., source=...)); 0 turns it off"
        },
    )

    def __post_init__(self) -> None:
        check_positive("eata", lr=self.lr, margin=self.margin, d_margin=self.d_margin)
        if not self.fisher_alpha >= 0:
            raise ConfigError(
                f"tta 'eata': fisher_alpha must be 0 or more, got {self.fisher_alpha}"
            )


class EATASession(NormAffineSession):
    def __init__(self, model: TTAModel, result: TTAResult, config: EATAConfig, lr: float) -> None:
        super().__init__(model, result, lr)
        self.margin = config.margin * math.log(model.head.out_features)
        self.d_margin = config.d_margin
        self.alpha = config.fisher_alpha
        self.fisher: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.average: torch.Tensor | None = None
        result.details["margin_nats"] = self.margin

    def estimate_fisher(self, source: Iterable[torch.Tensor]) -> None:
        """Diagonal Fisher information of the adapted parameters and their source values."""
        squares = [torch.zeros_like(p) for p in self.params]
        batches = images = 0
        like = self.params[0]
        with torch.enable_grad():
            for index, batch in enumerate(source):
                x = check_batch(batch, f"source batch {index}", like)
                logits = self.model(x)
                self.optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(logits, logits.argmax(1)).backward()
                for total, p in zip(squares, self.params, strict=True):
                    if p.grad is not None:
                        total += p.grad.detach() ** 2
                batches += 1
                images += len(x)
        self.optimizer.zero_grad(set_to_none=True)
        if not batches:
            raise ConfigError("tta 'eata': the source images for the Fisher term are empty")
        self.fisher = [
            (s / batches, p.detach().clone()) for s, p in zip(squares, self.params, strict=True)
        ]
        self.result.details["fisher_images"] = images

    def forget(self) -> None:
        self.average = None

    def step(self, images: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            logits = self.model(images)
            probs = logits.softmax(1)
            ent = entropy(logits)
            reliable = ent < self.margin
            ent, chosen = ent[reliable], probs[reliable].detach()
            if self.average is not None:
                cosine = F.cosine_similarity(self.average.unsqueeze(0), chosen, dim=1)
                diverse = cosine.abs() < self.d_margin
                ent, chosen = ent[diverse], chosen[diverse]
            if len(chosen):
                mean = chosen.mean(0)
                self.average = (
                    mean if self.average is None else EMA * self.average + (1 - EMA) * mean
                )
            self.result.adapted += len(ent)
            self.result.filtered += len(images) - len(ent)
            if len(ent):
                weights = torch.exp(-(ent.detach() - self.margin))
                loss = (ent * weights).mean() + self._anti_forgetting()
                if self.backward(loss):
                    self.optimizer.step()
                    self.result.updates += 1
        return probs.detach()

    def _anti_forgetting(self) -> torch.Tensor | float:
        """The Fisher penalty, 0 without a Fisher estimate."""
        if not self.fisher:
            return 0.0
        penalty = sum(
            (f * (p - anchor) ** 2).sum()
            for p, (f, anchor) in zip(self.params, self.fisher, strict=True)
        )
        return self.alpha * penalty


class EATA(NormAffineMethod):
    name = "eata"
    config_cls = EATAConfig
    description = "EATA (Niu et al. 2022): filtered, weighted entropy minimisation"
    config: EATAConfig

    @property
    def uses_source(self) -> bool:
        return self.config.fisher_alpha > 0

    def start(
        self,
        model: TTAModel,
        batch_size: int,
        result: TTAResult,
        source: Iterable[torch.Tensor] | None,
    ) -> Session:
        session = EATASession(model, result, self.config, self.scaled_lr(batch_size))
        if source is not None:
            session.estimate_fisher(source)
        return session


TTA_METHODS.register("eata", EATA)
