"""Zero-shot promptable segmentation (kind ``prompted``): a SAM-family model segments each test
case from prompts drawn from its ground truth (oracle prompts, ``clinadapt.data.prompts``), as
MedSAM is evaluated; nothing trains. ``box_mask``, the box itself as the mask, is the baseline
that tells what the model adds to the box.

``runner.prompted`` runs them; a method says which prompts it gives the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from clinadapt.adapt.base import METHODS
from clinadapt.data.prompts import PER
from clinadapt.errors import ConfigError

VOLUME_PROMPTS = ("slice", "box3d")
"""Volumes go slice by slice: prompts from each slice's truth, or from one 3D box per object."""


def _option(default: Any, help_text: str) -> Any:
    return field(default=default, metadata={"help": help_text})


def _jitter() -> Any:
    return _option(
        0,
        "px: each side of the ground-truth box moves outward by a random 0..jitter (MedSAM's "
        "evaluation); 0 gives the tight box",
    )


def _points() -> Any:
    return _option(
        1,
        "positive points per object: the pixel farthest from its boundary, then random pixels "
        "inside it",
    )


def _negatives() -> Any:
    return _option(0, "negative points per object, random pixels outside its box")


def _per() -> Any:
    return _option(
        "component",
        "one prompt per connected component of each class, or per instance (datasets with "
        "instance masks, e.g. DSB2018 nuclei)",
    )


def _volume_prompt() -> Any:
    return _option(
        "slice",
        "volumes: prompts from each axial slice's truth (slice), or one 3D box per object whose "
        "extent gives the 2D box on every slice it covers (box3d)",
    )


def _check_common(name: str, config: Any) -> None:
    if config.per not in PER:
        raise ConfigError(f"{name}: per must be one of {list(PER)}, got {config.per!r}")
    if config.volume_prompt not in VOLUME_PROMPTS:
        raise ConfigError(
            f"{name}: volume_prompt must be one of {list(VOLUME_PROMPTS)}, got "
            f"{config.volume_prompt!r}"
        )
    for key in ("jitter", "negatives"):
        if getattr(config, key, 0) < 0:
            raise ConfigError(f"{name}: {key} must not be negative, got {getattr(config, key)}")
    if getattr(config, "points", 1) < 1:
        raise ConfigError(f"{name}: points must be at least 1, got {config.points}")
    if hasattr(config, "points") and config.volume_prompt == "box3d":
        raise ConfigError(
            f"{name}: volume_prompt=box3d draws boxes only, but point prompts come from each "
            "slice's truth; use volume_prompt=slice"
        )


@dataclass
class BoxPromptConfig:
    jitter: int = _jitter()
    per: str = _per()
    volume_prompt: str = _volume_prompt()

    def __post_init__(self) -> None:
        _check_common("box prompts", self)


@dataclass
class PointPromptConfig:
    points: int = _points()
    negatives: int = _negatives()
    per: str = _per()
    volume_prompt: str = _volume_prompt()

    def __post_init__(self) -> None:
        _check_common("point prompts", self)


@dataclass
class BoxPointPromptConfig:
    jitter: int = _jitter()
    points: int = _points()
    negatives: int = _negatives()
    per: str = _per()
    volume_prompt: str = _volume_prompt()

    def __post_init__(self) -> None:
        _check_common("box and point prompts", self)


class PromptedMethod:
    """Which prompts the model gets (``box``, ``points``) and whether there is a model at all
    (``box_mask`` fills the box). ``options`` are the keywords of ``data.prompts``."""

    kind: ClassVar[str] = "prompted"
    config_cls: ClassVar[type]
    description: ClassVar[str] = ""
    prompt: ClassVar[str]
    box: ClassVar[bool] = True
    uses_model: ClassVar[bool] = True
    trains: ClassVar[bool] = False
    """Whether the model trains on labelled images first (``prompted_tuning``)."""
    encoder_frozen: ClassVar[bool] = True
    """Whether the image encoder stays the checkpoint's, so its embeddings can be cached."""

    def __init__(self, config: Any | None = None) -> None:
        self.config = config if config is not None else self.config_cls()

    @property
    def points(self) -> bool:
        return hasattr(self.config, "points")

    @property
    def random(self) -> bool:
        """Whether the prompts depend on the seed."""
        o = self.options()
        return o["jitter"] > 0 or o["points"] > 1 or o["negatives"] > 0

    def options(self) -> dict[str, int]:
        c = self.config
        return {
            "jitter": getattr(c, "jitter", 0),
            "points": getattr(c, "points", 0),
            "negatives": getattr(c, "negatives", 0),
        }


class SamBox(PromptedMethod):
    config_cls = BoxPromptConfig
    description = "zero-shot SAM with a box per object from the ground truth (oracle prompts)"
    prompt = "box"


class SamPoint(PromptedMethod):
    config_cls = PointPromptConfig
    description = "zero-shot SAM with points per object from the ground truth (oracle prompts)"
    prompt = "points"
    box = False


class SamBoxPoint(PromptedMethod):
    config_cls = BoxPointPromptConfig
    description = "zero-shot SAM with a box and points per object from the ground truth (oracle)"
    prompt = "box+points"


class BoxMask(PromptedMethod):
    config_cls = BoxPromptConfig
    description = "baseline: the ground-truth box of each object filled as its mask (no model)"
    prompt = "box as mask"
    uses_model = False


METHODS.register("sam_box", SamBox)
METHODS.register("sam_point", SamPoint)
METHODS.register("sam_box_point", SamBoxPoint)
METHODS.register("box_mask", BoxMask)
