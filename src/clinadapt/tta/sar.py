"""SAR: sharpness-aware and reliable entropy minimisation, with model recovery.

Niu, Wu, Zhang, Wen, Chen, Zhao and Tan 2023, "Towards Stable Test-Time Adaptation in Dynamic Wild
World" (ICLR). On the normalisation affine parameters Theta (see ``gradient``):

- reliable samples: S(x) = 1[E(x) < E_0], with E_0 = ``margin`` * ln C (0.4 ln C);
- sharpness-aware entropy (SAM with radius ``rho``): the step ascends to
  Theta + eps, eps = rho * g / ||g||_2 with g the gradient of the mean reliable entropy, takes the
  gradient of the entropy there over the samples still reliable at Theta + eps, and applies it
  (SGD, momentum 0.9) at Theta;
- model recovery: e_m = 0.9 e_{m-1} + 0.1 L_t tracks the loss of the second pass; when
  e_m < e_0 the model has collapsed (trivial, over-confident predictions) and is reset to the
  source state (counted in ``collapses``); the moving average restarts with it.

The paper's e_0 = 0.2 nats is given for 1000 classes; here it is ``reset_below`` * ln C with
``reset_below`` = 0.2 / ln 1000, the same fraction of the largest possible entropy, so that it
means the same for two classes. A batch where no sample is reliable is predicted but not learnt
from. Unlike the paper, which leaves the top layers' norms frozen for some architectures, every
normalisation layer adapts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from clinadapt.errors import ConfigError
from clinadapt.tta.base import TTA_METHODS, Session, TTAResult, entropy
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
class SARConfig:
    lr: float = lr_field()
    margin: float = margin_field()
    rho: float = field(default=0.05, metadata={"help": "SAM neighbourhood radius"})
    reset_below: float = field(
        default=0.2 / math.log(1000),
        metadata={
            "help": "reset to the source model when the moving average of the loss falls below "
            "reset_below * ln C (the paper's 0.2 nats at 1000 classes)"
        },
    )

    def __post_init__(self) -> None:
        check_positive("sar", lr=self.lr, margin=self.margin, rho=self.rho)
        if not self.reset_below >= 0:
            raise ConfigError(f"tta 'sar': reset_below must be 0 or more, got {self.reset_below}")


class SARSession(NormAffineSession):
    def __init__(self, model: TTAModel, result: TTAResult, config: SARConfig, lr: float) -> None:
        super().__init__(model, result, lr)
        classes = model.head.out_features
        self.margin = config.margin * math.log(classes)
        self.reset_below = config.reset_below * math.log(classes)
        self.rho = config.rho
        self.ema: float | None = None
        result.details.update(margin_nats=self.margin, reset_below_nats=self.reset_below)

    def forget(self) -> None:
        self.ema = None

    def step(self, images: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            logits = self.model(images)
            ent = entropy(logits)
            reliable = ent < self.margin
            count = int(reliable.sum())
            self.result.adapted += count
            self.result.filtered += len(images) - count
            if count:
                self._sharpness_aware_step(images, ent[reliable], reliable)
        return logits.detach().softmax(1)

    def _sharpness_aware_step(
        self, images: torch.Tensor, first: torch.Tensor, reliable: torch.Tensor
    ) -> None:
        if not self.backward(first.mean()):
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        norm = torch.norm(torch.stack([g.norm(2) for g in grads]), 2)
        scale = self.rho / (norm + 1e-12)
        original = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, g in zip(self.params, grads, strict=True):
                p.add_(g * scale)
        second = entropy(self.model(images))[reliable]
        second = second[second < self.margin]
        learn = len(second) > 0 and self.backward(second.mean())
        with torch.no_grad():
            for p, value in zip(self.params, original, strict=True):
                p.copy_(value)
        if not learn:
            self.optimizer.zero_grad(set_to_none=True)
            return
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.result.updates += 1
        loss = float(second.detach().mean())
        self.ema = loss if self.ema is None else EMA * self.ema + (1 - EMA) * loss
        if self.ema < self.reset_below:
            self.reset()
            self.result.collapses += 1


class SAR(NormAffineMethod):
    name = "sar"
    config_cls = SARConfig
    description = "SAR (Niu et al. 2023): sharpness-aware reliable entropy minimisation, resets"
    config: SARConfig

    def start(
        self,
        model: TTAModel,
        batch_size: int,
        result: TTAResult,
        source: Iterable[torch.Tensor] | None,
    ) -> Session:
        return SARSession(model, result, self.config, self.scaled_lr(batch_size))


TTA_METHODS.register("sar", SAR)
