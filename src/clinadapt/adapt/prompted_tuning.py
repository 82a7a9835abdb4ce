"""Adapting a promptable SAM on a few labelled images (kind ``prompted``, ``trains``): prompts come
from each training image's ground truth (``sam_segmenter.PromptedSegmenter``) and the test cases
are then segmented from oracle prompts exactly as by the zero-shot methods.

* ``sam_decoder``: the mask decoder trains, image and prompt encoders frozen (MedSAM's recipe for
  new data, Ma et al. 2024);
* ``sam_lora``: LoRA (Hu et al. 2022, through PEFT) on the image encoder's attention projections,
  plus the mask decoder;
* ``sam_full``: every parameter trains.

``merge`` gives a plain ``PromptableSAM`` (LoRA folded in) whose state dict is a segment-anything
checkpoint again, loadable by ``load_sam`` and ``clinadapt segment --weights``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from clinadapt.adapt.base import METHODS
from clinadapt.adapt.prompted import VOLUME_PROMPTS, PromptedMethod
from clinadapt.adapt.sam_segmenter import PROMPT_KINDS, PromptRecipe
from clinadapt.data.prompts import PER
from clinadapt.errors import ClinadaptError, ConfigError

if TYPE_CHECKING:
    from clinadapt.adapt.sam_segmenter import PromptedSegmenter
    from clinadapt.backbones.sam import PromptableSAM


def _option(default: Any, help_text: str) -> Any:
    return field(default=default, metadata={"help": help_text})


@dataclass
class SamTuningConfig:
    prompt: str = _option("box", f"prompts in training and at test: one of {list(PROMPT_KINDS)}")
    jitter: int = _option(
        0, "px: test boxes, each side moved outward by a random 0..jitter (0: the tight box)"
    )
    train_jitter: int = _option(
        5,
        "px of the encoder frame: training boxes, each side moved outward by a random "
        "0..train_jitter (MedSAM: up to 20 px at 1024, i.e. 5 at 256)",
    )
    points: int = _option(1, "positive points per object when the prompt has points")
    negatives: int = _option(0, "negative points per object when the prompt has points")
    max_prompts: int = _option(
        16, "objects prompted per training image at most (a random subset each step)"
    )
    per: str = _option(
        "component", "test prompts per connected component, or per instance (instance masks)"
    )
    volume_prompt: str = _option(
        "slice", "test volumes: prompts from each slice's truth (slice) or one 3D box (box3d)"
    )

    def __post_init__(self) -> None:
        self.recipe()  # checks prompt, train_jitter, points, negatives, max_prompts
        if self.jitter < 0:
            raise ConfigError(f"jitter must not be negative, got {self.jitter}")
        if self.prompt != "box" and self.points < 1:
            raise ConfigError(f"prompt={self.prompt!r} needs points >= 1, got {self.points}")
        if self.per not in PER:
            raise ConfigError(f"per must be one of {list(PER)}, got {self.per!r}")
        if self.volume_prompt not in VOLUME_PROMPTS:
            raise ConfigError(
                f"volume_prompt must be one of {list(VOLUME_PROMPTS)}, got {self.volume_prompt!r}"
            )
        if self.volume_prompt == "box3d" and self.prompt != "box":
            raise ConfigError("volume_prompt=box3d draws boxes only: use prompt=box")

    def recipe(self) -> PromptRecipe:
        return PromptRecipe(
            self.prompt, self.train_jitter, self.points, self.negatives, self.max_prompts
        )


@dataclass
class SamLoRAConfig(SamTuningConfig):
    r: int = _option(8, "LoRA rank")
    alpha: float = _option(16.0, "LoRA scaling numerator: the update is (alpha / r) * B @ A")
    dropout: float = _option(0.0, "dropout on the input of the low-rank branch")
    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "image-encoder layers to adapt (names or suffixes); default: every attention "
            "qkv and proj Linear"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r < 1 or not self.alpha > 0 or not 0 <= self.dropout < 1:
            raise ConfigError(
                f"sam_lora: need r >= 1, alpha > 0, 0 <= dropout < 1; got r={self.r}, "
                f"alpha={self.alpha}, dropout={self.dropout}"
            )


class SamTuning(PromptedMethod):
    """A trained prompted method: ``apply`` marks what trains on a ``PromptedSegmenter``."""

    trains: ClassVar[bool] = True
    config_cls = SamTuningConfig
    trains_part: ClassVar[str]

    @property
    def prompt(self) -> str:  # type: ignore[override]
        return self.config.prompt

    @property
    def box(self) -> bool:  # type: ignore[override]
        return self.config.prompt != "points"

    @property
    def points(self) -> bool:
        return self.config.prompt != "box"

    def options(self) -> dict[str, int]:
        c = self.config
        return {
            "jitter": c.jitter if self.box else 0,
            "points": c.points if self.points else 0,
            "negatives": c.negatives if self.points else 0,
        }

    def apply(self, segmenter: PromptedSegmenter) -> PromptedSegmenter:
        segmenter.requires_grad_(False)
        segmenter.sam.mask_decoder.requires_grad_(True)
        return segmenter

    def merge(self, segmenter: PromptedSegmenter) -> PromptableSAM:
        """The trained SAM as a plain ``PromptableSAM`` (segment-anything key names)."""
        return copy.deepcopy(segmenter.sam).eval()

    def selected(self) -> dict[str, Any]:
        return {"trains": self.trains_part}


class SamDecoder(SamTuning):
    description = "SAM mask decoder trained on prompts from a few labelled images (MedSAM recipe)"
    trains_part = "mask decoder"


class SamFull(SamTuning):
    description = "SAM fully fine-tuned on prompts from a few labelled images"
    trains_part = "image encoder, prompt encoder and mask decoder"
    encoder_frozen = False

    def apply(self, segmenter: PromptedSegmenter) -> PromptedSegmenter:
        return segmenter.requires_grad_(True)


class SamLoRA(SamTuning):
    config_cls = SamLoRAConfig
    description = "SAM with LoRA on the image encoder's attention (PEFT) and its mask decoder"
    trains_part = "LoRA on image-encoder attention, mask decoder"
    encoder_frozen = False

    def __init__(self, config: SamLoRAConfig | None = None) -> None:
        super().__init__(config)
        self.targets: list[str] = []

    def apply(self, segmenter: PromptedSegmenter) -> PromptedSegmenter:
        from clinadapt.adapt.lora.model import import_peft

        peft = import_peft()
        super().apply(segmenter)
        encoder = segmenter.sam.image_encoder
        c = self.config
        requested = c.target_modules or attention_projections(encoder)
        if not requested:
            raise ClinadaptError(
                f"sam_lora: no attention qkv/proj Linear layers in {type(encoder).__name__}; "
                "set target_modules"
            )
        config = peft.LoraConfig(
            r=c.r,
            lora_alpha=c.alpha,
            lora_dropout=c.dropout,
            target_modules=list(requested),
            bias="none",
        )
        try:
            segmenter.sam.image_encoder = peft.LoraModel(encoder, config, "default")
        except (ValueError, TypeError) as err:
            raise ClinadaptError(
                f"sam_lora: cannot adapt target_modules {requested}: {err}. Default targets: "
                f"{attention_projections(encoder)}"
            ) from None
        layer = peft.tuners.tuners_utils.BaseTunerLayer
        self.targets = [
            n for n, m in segmenter.sam.image_encoder.model.named_modules() if isinstance(m, layer)
        ]
        return segmenter

    def merge(self, segmenter: PromptedSegmenter) -> PromptableSAM:
        sam = copy.deepcopy(segmenter.sam)
        sam.image_encoder = sam.image_encoder.merge_and_unload()
        return sam.eval()

    def selected(self) -> dict[str, Any]:
        return {**super().selected(), "target_modules": self.targets}


def attention_projections(encoder: nn.Module) -> list[str]:
    """The ``qkv`` and ``proj`` Linears of every ``attn`` module (TinyViT, SAM's ViT)."""
    return [
        name
        for name, module in encoder.named_modules()
        if isinstance(module, nn.Linear)
        and name.rpartition(".")[2] in ("qkv", "proj")
        and name.rpartition(".")[0].endswith("attn")
    ]


METHODS.register("sam_decoder", SamDecoder)
METHODS.register("sam_lora", SamLoRA)
METHODS.register("sam_full", SamFull)
