"""No adaptation: the source model's softmax in eval mode, the baseline every method is set
against (its ``seconds`` are the cost of plain inference)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from clinadapt.tta.base import TTA_METHODS, Session, TTAMethod, TTAResult
from clinadapt.tta.model import TTAModel


@dataclass
class NoneConfig:
    pass


class SourceSession(Session):
    def step(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(images).softmax(1)


class NoAdaptation(TTAMethod):
    name = "none"
    config_cls = NoneConfig
    adapts_network = False
    description = "no test-time adaptation: the source model's predictions"

    def start(
        self,
        model: TTAModel,
        batch_size: int,
        result: TTAResult,
        source: Iterable[torch.Tensor] | None,
    ) -> Session:
        return SourceSession(model.eval(), result)


TTA_METHODS.register("none", NoAdaptation)
