"""Test-time adaptation of a trained classifier, registered by name (importing this package
registers them all): ``none``, ``bn``, ``tent``, ``sar``, ``eata``, ``t3a``, ``lame``.

    tta = create_tta("tent", {"lr": 0.00025})
    result = tta.run(TTAModel.from_adapted(model), batches, mode="episodic", seed=0)
    result.probabilities  # (N, C), test order;  result.stats()  # counts for the record

``batches`` yields preprocessed image tensors (B, C, H, W) (or volumes), in test order. The
source model is never modified: ``run`` adapts a deep copy. Methods that adapt the network
(bn, tent, sar, eata) need normalisation layers; output-level methods (t3a, lame) need only the
``TTAModel`` split into features and a linear head. Probabilities are softmax outputs: the
methods are defined for single-label classifiers.
"""

from __future__ import annotations

from typing import Any

from clinadapt.config import from_dict
from clinadapt.tta import bn, eata, lame, none, sar, t3a, tent  # noqa: F401  (registration)
from clinadapt.tta.base import MODES, TTA_METHODS, TTAMethod, TTAResult
from clinadapt.tta.model import TTAModel

__all__ = ["MODES", "TTA_METHODS", "TTAMethod", "TTAModel", "TTAResult", "create_tta"]


def create_tta(name: str, options: dict[str, Any] | None = None) -> TTAMethod:
    """A test-time adaptation method by registered name, configured from ``options`` (unknown
    names and keys raise ``UnknownNameError`` / ``ConfigError`` with a 'did you mean')."""
    cls = TTA_METHODS.get(name)
    return cls(from_dict(cls.config_cls, options or {}, where=f"tta {name.lower()!r}"))
