"""CoCoOp: Zhou, Yang, Loy and Liu 2022, "Conditional Prompt Learning for Vision-Language Models"
(CVPR).

CoOp's context made image-conditional: a meta-net (Linear d -> d/16, ReLU, Linear d/16 -> token
width) maps the image embedding to a token pi(x) added to every context vector, so each image gets
its own class embeddings, ``[V_1 + pi(x)] ... [V_M + pi(x)] [CLASS_k].``, and the context and the
meta-net train together with cross-entropy (the paper's defaults: 10 epochs, batch 1, lr 0.002).
Every image then needs the text encoder once per class prompt, in training and at prediction.
One deviation: the meta-net's last layer starts at zero, so training starts where CoOp does (the
zero-shot classifier of the first template, with ``init=template``) rather than from a random
image-dependent offset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from clinadapt.adapt.base import METHODS
from clinadapt.adapt.vl.coop import CoOp
from clinadapt.adapt.vl.prompts import PromptOptions

PROMPTS_PER_PASS = 512
"""Prompts through the text encoder at once when predicting (images x class prompts)."""


@dataclass
class CoCoOpConfig(PromptOptions):
    epochs: int = field(default=10, metadata={"help": "passes over the support set"})
    batch_size: int = field(default=1, metadata={"help": "support examples per step"})


class CoCoOp(CoOp):
    """``fitted_parameters`` counts the context and the meta-net."""

    config_cls = CoCoOpConfig
    description = (
        "CoCoOp: CoOp's context plus a token from each image's embedding (meta-net), so class "
        "embeddings are image-conditional"
    )

    def __init__(self, config: CoCoOpConfig | None = None) -> None:
        super().__init__(config)
        self._meta: nn.Sequential | None = None

    def _build(self, seed: int) -> None:
        dim, width = self._space.dim, self._space.text.token_width
        hidden = max(dim // 16, 1)
        self._meta = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, width))
        nn.init.zeros_(self._meta[2].weight)
        nn.init.zeros_(self._meta[2].bias)

    def _freeze(self) -> None:
        """Class embeddings depend on the image: nothing to compute ahead."""

    def _parameters(self) -> list[nn.Parameter]:
        return [*self._contexts, *self._meta.parameters()]

    def _logits(self, z: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        if rows is None:  # queries: in passes of at most PROMPTS_PER_PASS prompts
            step = max(1, PROMPTS_PER_PASS // len(self._prompts.texts))
            return torch.cat([self._conditional(z[i : i + step]) for i in range(0, len(z), step)])
        return self._conditional(z)

    def _conditional(self, z: torch.Tensor) -> torch.Tensor:
        shift = self._meta(z)[:, None, :]  # (B, 1, width): one token added to every slot
        weights = self._class_weights([ctx[None] + shift for ctx in self._contexts])
        return self._space.logit_scale * torch.einsum("nd,nhkd->nhk", z, weights)


METHODS.register("cocoop", CoCoOp)
