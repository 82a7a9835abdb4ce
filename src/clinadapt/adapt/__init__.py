"""Adaptation methods registered by name (importing this package registers them all).

Three kinds share ``METHODS``: ``frozen`` methods (``FrozenFeatureMethod``: k-NN, prototypes, linear
probe) fit on frozen features; ``finetune`` methods (``FineTuneMethod``: full, bitfit, lora,
adapter, vpt) decide which parameters of an ``AdaptedModel`` (backbone + new head) train;
``prompted`` methods (``PromptedMethod``) segment from oracle prompts: without training (sam_box,
sam_point, sam_box_point, box_mask) or after training the SAM on prompts from a few labelled
images (sam_decoder, sam_lora, sam_full). Vision-language methods (``vl``: zeroshot,
tip_adapter, tip_adapter_f, linear_zs, coop, cocoop, dapl) are frozen methods that also take
class text (``TextMethod.use_text``).
"""

from __future__ import annotations

from typing import Any

from clinadapt.adapt import (  # noqa: F401  (registration on import)
    adapter,
    bitfit,
    full,
    head,
    knn,
    linear,
    lora,
    prompted,
    prompted_tuning,
    prototype,
    vl,
    vpt,
)
from clinadapt.adapt.base import METHODS, FrozenFeatureMethod
from clinadapt.adapt.checkpoint import load_adapted, save_adapter
from clinadapt.adapt.finetune import AdaptedModel, FineTuneMethod
from clinadapt.adapt.prompted import PromptedMethod
from clinadapt.config import from_dict

__all__ = [
    "METHODS",
    "AdaptedModel",
    "FineTuneMethod",
    "FrozenFeatureMethod",
    "PromptedMethod",
    "create_method",
    "load_adapted",
    "save_adapter",
]


def create_method(
    name: str, options: dict[str, Any] | None = None
) -> FrozenFeatureMethod | FineTuneMethod | PromptedMethod:
    """A method by registered name, configured from ``options`` (unknown keys are ConfigErrors).

    ``method.kind`` says which interface it has: ``frozen``, ``finetune`` or ``prompted``.
    """
    cls = METHODS.get(name)
    return cls(from_dict(cls.config_cls, options or {}, where=f"method {name.lower()!r}"))
