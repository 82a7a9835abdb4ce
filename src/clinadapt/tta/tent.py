"""Tent: fully test-time adaptation by entropy minimisation.

Wang, Shelhamer, Liu, Olshausen and Darrell 2021, "Tent: Fully Test-time Adaptation by Entropy
Minimization" (ICLR). Each test batch is normalised with its own statistics and the affine
parameters (gamma, beta) of the normalisation layers, x_out = gamma * (x - mu) / sigma + beta,
take ``steps`` SGD steps on the mean prediction entropy

    L(x) = 1/B sum_i H(y_hat_i),    H(y_hat) = -sum_c p(y_hat_c) log p(y_hat_c).

As in the paper's code, a batch's prediction is the output of the (last) forward pass before its
update: in episodic mode with one step, Tent therefore predicts exactly what ``bn`` predicts, and
adaptation shows from the next batch on in continual mode (or with ``steps`` > 1).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from clinadapt.tta.base import TTA_METHODS, Session, TTAResult, entropy
from clinadapt.tta.gradient import NormAffineMethod, NormAffineSession, check_positive, lr_field
from clinadapt.tta.model import TTAModel


@dataclass
class TentConfig:
    lr: float = lr_field()
    steps: int = field(default=1, metadata={"help": "entropy-minimisation steps per test batch"})

    def __post_init__(self) -> None:
        check_positive("tent", lr=self.lr, steps=self.steps)


class TentSession(NormAffineSession):
    def __init__(self, model: TTAModel, result: TTAResult, lr: float, steps: int) -> None:
        super().__init__(model, result, lr)
        self.steps = steps

    def step(self, images: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            for _ in range(self.steps):
                logits = self.model(images)
                if self.backward(entropy(logits).mean()):
                    self.optimizer.step()
                    self.result.updates += 1
        self.result.adapted += len(images)
        return logits.detach().softmax(1)


class Tent(NormAffineMethod):
    name = "tent"
    config_cls = TentConfig
    description = "Tent (Wang et al. 2021): entropy minimisation of normalisation affine params"
    config: TentConfig

    def start(
        self,
        model: TTAModel,
        batch_size: int,
        result: TTAResult,
        source: Iterable[torch.Tensor] | None,
    ) -> Session:
        return TentSession(model, result, self.scaled_lr(batch_size), self.config.steps)


TTA_METHODS.register("tent", Tent)
