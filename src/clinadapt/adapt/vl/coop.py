"""CoOp: Zhou, Yang, Loy and Liu 2022, "Learning to Prompt for Vision-Language Models" (IJCV).

The words before each class phrase become learned context vectors: the prompt of class k is
``[V]_1 ... [V]_M [CLASS_k].`` in the text encoder's input-embedding space, and the class
embedding is the frozen encoder's output for it. Logits are ``logit_scale`` times the cosine
similarity of the image embedding to each class embedding, and the context is trained with
cross-entropy on the support set, back-propagating through the frozen text encoder (SGD with
momentum, cosine decay, as the paper; its first-epoch warm-up is left out). The context is
unified (one for all classes) or class-specific (``class_specific``); it starts from the
template's words by default (see ``adapt.vl.prompts``), so training starts at the zero-shot
classifier of the first template. Needs a text encoder with token-level access.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from clinadapt.adapt._checks import check_fit_inputs
from clinadapt.adapt.base import METHODS
from clinadapt.adapt.vl.base import TextMethod
from clinadapt.adapt.vl.prompts import PromptOptions, PromptSet, build_prompts
from clinadapt.data.info import TaskType
from clinadapt.text.classifier import head_targets


@dataclass
class CoOpConfig(PromptOptions):
    pass


class CoOp(TextMethod):
    """``selected()`` reports the context (tokens per group, the prompts it started from) and the
    last training loss; ``fitted_parameters`` counts the context values."""

    config_cls = CoOpConfig
    needs_tokens: ClassVar[bool] = True
    """The text encoder must give token-level access (``TextEncoder.tokenize`` and kin)."""
    description = (
        "CoOp: learned context vectors before each class phrase, trained through the frozen "
        "text encoder"
    )
    config: PromptOptions

    def __init__(self, config: PromptOptions | None = None) -> None:
        super().__init__(config)
        self._prompts: PromptSet | None = None
        self._contexts: nn.ParameterList | None = None
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
    ) -> CoOp:
        x, y, task, _ = check_fit_inputs(features, labels, task, num_classes, val)
        self._prepare(task, num_classes)
        self._weights = None
        self._prompts = build_prompts(
            self._space.text,
            self._class_text,
            task,
            self.config,
            extra_slots=self._extra_slots(),
            seed=seed,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self._contexts = nn.ParameterList(
                [nn.Parameter(c.clone()) for c in self._initial_contexts()]
            )
            self._build(seed)
        z = self._joint(x)
        targets = torch.from_numpy(head_targets(y, task.single_label, self._prompts.options))
        loss = self._train(z, targets, seed)
        with torch.no_grad():
            self._freeze()
        self._selected = {
            **self._prompts.describe(),
            "init": self.config.init,
            "class_specific": self.config.class_specific,
            "final_cross_entropy": loss,
        }
        return self

    def _extra_slots(self) -> int:
        """Context slots after the initialised ones (domain prompts)."""
        return 0

    def _initial_contexts(self) -> list[torch.Tensor]:
        return self._prompts.init

    def _build(self, seed: int) -> None:
        """Parameters trained beside the context (CoCoOp's meta-net, domain contexts)."""

    def _freeze(self) -> None:
        """After training: the class embeddings queries are compared with."""
        self._weights = self._class_weights()

    def _parameters(self) -> list[nn.Parameter]:
        return list(self._contexts)

    def _train(self, z: torch.Tensor, targets: torch.Tensor, seed: int) -> float:
        cfg = self.config
        params = self._parameters()
        optimiser = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
        steps = cfg.epochs * -(-len(z) // cfg.batch_size)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
        generator = torch.Generator().manual_seed(seed)
        loss = torch.zeros(())
        for _ in range(cfg.epochs):
            order = torch.randperm(len(z), generator=generator)
            for start in range(0, len(order), cfg.batch_size):
                rows = order[start : start + cfg.batch_size]
                logits = self._logits(z[rows], rows)
                loss = F.cross_entropy(logits.flatten(0, 1), targets[rows].flatten())
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
        return float(loss.detach())

    def _class_weights(self, contexts: list[torch.Tensor] | None = None) -> torch.Tensor:
        """(H, K, d) class embeddings from the given contexts (default: the learned ones), or
        (B, H, K, d) from a batch of contexts."""
        contexts = list(self._contexts) if contexts is None else contexts
        embedded = self._prompts.embed(contexts)
        tokens = self._prompts.tokens
        if embedded.ndim == 4:
            b, p = embedded.shape[:2]
            raw = self._space.text.encode_embeddings(_repeat(tokens, b), embedded.flatten(0, 1))
            return self._prompts.weights(raw.unflatten(0, (b, p)))
        return self._prompts.weights(self._space.text.encode_embeddings(tokens, embedded))

    def _logits(self, z: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """(N, H, K) logits of unit image embeddings; ``rows`` index the support set in
        training, None for queries."""
        weights = self._class_weights() if self._weights is None else self._weights
        return self._space.logit_scale * torch.einsum("nd,hkd->nhk", z, weights)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        self._check_fitted()
        z = self._joint(features, "query features")
        with torch.no_grad():
            return self._scores(self._logits(z, None).double())

    def selected(self) -> dict[str, Any]:
        return dict(self._selected)

    def fitted_parameters(self) -> int:
        return sum(p.numel() for p in self._parameters()) if self._contexts is not None else 0


def _repeat(tokens: Any, times: int) -> Any:
    """The token batch repeated ``times`` (one copy per image)."""
    from clinadapt.backbones.text_side import Tokens

    return Tokens(
        tokens.ids.repeat(times, 1), {k: v.repeat(times, 1) for k, v in tokens.extra.items()}
    )


METHODS.register("coop", CoOp)
