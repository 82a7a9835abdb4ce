"""Adaptation methods on frozen features, registered by name (importing this package registers
them all)."""

from __future__ import annotations

from typing import Any

from clinadapt.adapt import knn, linear, prototype  # noqa: F401  (registration on import)
from clinadapt.adapt.base import METHODS, FrozenFeatureMethod
from clinadapt.config import from_dict

__all__ = ["METHODS", "FrozenFeatureMethod", "create_method"]


def create_method(name: str, options: dict[str, Any] | None = None) -> FrozenFeatureMethod:
    """A method by registered name, configured from ``options`` (unknown keys are ConfigErrors)."""
    cls = METHODS.get(name)
    return cls(from_dict(cls.config_cls, options or {}, where=f"method {name.lower()!r}"))
