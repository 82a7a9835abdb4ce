"""Domain prompts in the spirit of DAPL: Ge, Huang, Wang, Zhou, Yu, Wang and Huang 2022, "Domain
Adaptation via Prompt Learning" (IEEE TNNLS).

When a dataset pools several sources (hospitals, scanners, modalities), each prompt holds a
domain-agnostic context shared by all of them and a domain-specific one per source:
``[V_1 .. V_M] [D^d_1 .. D^d_N] [CLASS_k].`` An example is classified with its own domain's
prompts; both contexts train together with cross-entropy on the support set (the paper also
trains on pseudo-labelled unlabelled target images, left out here: every domain is labelled).
The agnostic context starts as CoOp's does (``init``), the domain-specific ones from
N(0, 0.02^2). A query of a domain that had no support example, or given without its domain,
gets the mean of the probabilities under every trained domain's prompts.

The domain of each example comes from the data (a CSV manifest's ``domain`` column): runs give it
with ``use_domains`` before ``fit`` and ``query_domains`` before each ``predict_proba``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from clinadapt.adapt.base import METHODS
from clinadapt.adapt.vl.coop import CoOp
from clinadapt.adapt.vl.prompts import RANDOM_STD, PromptOptions
from clinadapt.data.info import TaskType
from clinadapt.errors import ConfigError, DataError


@dataclass
class DomainPromptsConfig(PromptOptions):
    domain_ctx: int = field(
        default=4, metadata={"help": "domain-specific context vectors per domain"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.domain_ctx < 1:
            raise ConfigError(f"domain_ctx must be positive, got {self.domain_ctx}")


class DomainPrompts(CoOp):
    """``selected()`` adds the domains and their support counts."""

    config_cls = DomainPromptsConfig
    description = (
        "domain prompts (DAPL): a shared context plus one per domain before each class phrase, "
        "for data pooled from several sources (a domain column)"
    )
    uses_domains = True
    config: DomainPromptsConfig

    def __init__(self, config: DomainPromptsConfig | None = None) -> None:
        super().__init__(config)
        self._support_domains: np.ndarray | None = None
        self._queries: np.ndarray | None = None
        self._domains: list[str] = []
        self._rows: torch.Tensor | None = None  # domain index of each support example
        self._domain_ctx: nn.Parameter | None = None
        self._domain_weights: torch.Tensor | None = None

    def use_domains(self, support: Sequence[str] | np.ndarray) -> DomainPrompts:
        """The domain of each support example, in the order ``fit`` gets them."""
        self._support_domains = _names(support, "support domains")
        return self

    def query_domains(self, domains: Sequence[str] | np.ndarray | None) -> DomainPrompts:
        """The domain of each row the next ``predict_proba`` gets (None: not known)."""
        self._queries = None if domains is None else _names(domains, "query domains")
        return self

    def fit(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        task: TaskType,
        num_classes: int,
        val: tuple[np.ndarray, np.ndarray] | None = None,
        seed: int = 0,
    ) -> DomainPrompts:
        if self._support_domains is None:
            raise ConfigError(
                "dapl learns one context per domain and needs the domain of every support "
                "example: give the data a domain column (a CSV manifest with path,label,domain)"
            )
        if len(self._support_domains) != len(features):
            raise DataError(
                f"{len(self._support_domains)} support domains for {len(features)} examples"
            )
        self._domains = sorted(set(self._support_domains.tolist()))
        index = {d: i for i, d in enumerate(self._domains)}
        self._rows = torch.tensor([index[d] for d in self._support_domains.tolist()])
        super().fit(features, labels, task, num_classes, val=val, seed=seed)
        counts = Counter(self._support_domains.tolist())
        self._selected["domains"] = {d: counts[d] for d in self._domains}
        self._selected["domain_context_tokens"] = self.config.domain_ctx
        return self

    def _extra_slots(self) -> int:
        return self.config.domain_ctx

    def _initial_contexts(self) -> list[torch.Tensor]:
        return [c[: -self.config.domain_ctx] for c in self._prompts.init]

    def _build(self, seed: int) -> None:
        shape = (len(self._domains), self.config.domain_ctx, self._space.text.token_width)
        generator = torch.Generator().manual_seed(seed + 1)
        self._domain_ctx = nn.Parameter(RANDOM_STD * torch.randn(shape, generator=generator))

    def _parameters(self) -> list[nn.Parameter]:
        return [*self._contexts, self._domain_ctx]

    def _domain_weights_of(self, d: int) -> torch.Tensor:
        return self._class_weights([torch.cat([c, self._domain_ctx[d]]) for c in self._contexts])

    def _freeze(self) -> None:
        self._domain_weights = torch.stack(
            [self._domain_weights_of(d) for d in range(len(self._domains))]
        )

    def _logits(self, z: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        domains = self._rows[rows]
        out = torch.zeros(len(z), self._prompts.heads, self._prompts.options)
        for d in domains.unique().tolist():
            at = domains == d
            out[at] = torch.einsum("nd,hkd->nhk", z[at], self._domain_weights_of(d))
        return self._space.logit_scale * out

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        self._check_fitted()
        z = self._joint(features, "query features")
        queries, self._queries = self._queries, None
        if queries is not None and len(queries) != len(z):
            raise DataError(f"{len(queries)} query domains for {len(z)} query rows")
        with torch.no_grad():
            logits = self._space.logit_scale * torch.einsum(
                "nd,ehkd->enhk", z, self._domain_weights
            )
        per_domain = np.stack([self._scores(lg.double()) for lg in logits])  # (D, N, C)
        out = per_domain.mean(axis=0)
        if queries is not None:
            index = {d: i for i, d in enumerate(self._domains)}
            for i, name in enumerate(queries.tolist()):
                if name in index:
                    out[i] = per_domain[index[name], i]
        return out


def _names(values: Sequence[str] | np.ndarray, what: str) -> np.ndarray:
    out = np.asarray(values, dtype=object).reshape(-1)
    bad = [v for v in out.tolist() if not isinstance(v, str) or not v.strip()]
    if bad:
        raise DataError(f"{what} must be non-empty strings, got {bad[0]!r}")
    return out.astype(str)


METHODS.register("dapl", DomainPrompts)
