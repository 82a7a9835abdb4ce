"""The one interface every backbone offers, whatever library it comes from."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch
from torch import nn

from clinadapt.errors import ClinadaptError

if TYPE_CHECKING:
    from clinadapt.backbones.text_side import JointSpace


@dataclass(frozen=True)
class PretrainedConfig:
    """How images must look when they reach the backbone (timm's pretrained_cfg, trimmed)."""

    input_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    channels: int = 3
    source: str = ""  # e.g. "timm:resnet18.a1_in1k", a weights path, or "random"


class Backbone(nn.Module):
    """A frozen-feature extractor: ``embed(images) -> [B, feature_dim]``, and
    ``dense(images) -> [B, dense_dim, *grid]`` for heads that need a spatial map (segmentation);
    ``dense_levels(images)`` adds a CNN's finer stage maps, for decoders with skip connections.

    ``weights_id`` identifies the weights exactly (``none``, a sha256 of a local file, or the hub
    tag) and, with ``model_kwargs`` (constructor options such as a weights folder's
    ``create_model_kwargs``), is part of every feature-cache key. ``is_pretrained`` is False for
    random initialisation, which reports mark as an untrained control. ``ndim`` is 2 for image
    backbones and 3 for volume-native ones. ``text`` is the text side of a vision-language
    backbone (``JointSpace``: texts and image features in one space), None for image-only ones.
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        feature_dim: int,
        pretrained_cfg: PretrainedConfig,
        weights_id: str,
        is_pretrained: bool,
        model_kwargs: dict | None = None,
        ndim: int = 2,
        text: JointSpace | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.model = model
        self.feature_dim = feature_dim
        self.pretrained_cfg = pretrained_cfg
        self.weights_id = weights_id
        self.is_pretrained = is_pretrained
        self.model_kwargs = dict(model_kwargs or {})
        self.ndim = ndim
        self.text = text

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features for a normalised batch of shape (B, C, H, W)."""
        return self.model(images)

    def dense(self, images: torch.Tensor) -> torch.Tensor:
        """The last feature map before pooling: (B, dense_dim, h, w) for images, (B, dense_dim,
        d, h, w) for volumes. Like ``embed`` it leaves gradient tracking to the caller."""
        return _dense_map(self.name, self.model, images)

    def dense_levels(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Channel-first feature maps from fine to coarse, the last being ``dense(images)``.

        A timm CNN gives the output of every stage (``forward_intermediates``: one forward), its
        last replaced by ``dense``'s map where they share a grid (MobileNet's and EfficientNet's
        ``forward_features`` add a 1x1 head convolution to the last stage). Token models, whose
        blocks all share one grid, and clinadapt's own nets give ``[dense(images)]``.
        """
        net = _unwrap(self.model)
        takes = getattr(net, "forward_intermediates", None)
        if _library(net) == "timm" and _is_cnn(net) and callable(takes):
            final, levels = takes(images)
            if getattr(net, "output_fmt", "NCHW") == "NHWC":
                final = final.movedim(-1, 1)
            if all(t.ndim == images.ndim for t in (final, *levels)):
                if levels and levels[-1].shape[2:] == final.shape[2:]:
                    levels = levels[:-1]
                return [*levels, final]
        return [self.dense(images)]

    @property
    def dense_dim(self) -> int:
        """Channels of ``dense``'s map (a ViT's width, not its projected ``feature_dim``)."""
        return self.dense_level_dims[-1]

    @property
    def dense_stride(self) -> tuple[int, ...]:
        """Input pixels per map cell along each spatial axis, at the backbone's input size."""
        return self.dense_level_strides[-1]

    @property
    def dense_level_dims(self) -> tuple[int, ...]:
        """Channels of each map of ``dense_levels``, fine to coarse."""
        return self._dense_geometry[0]

    @property
    def dense_level_strides(self) -> tuple[tuple[int, ...], ...]:
        """Input pixels per cell of each map of ``dense_levels`` along each axis, fine to coarse,
        at the backbone's input size."""
        return self._dense_geometry[1]

    @cached_property
    def _dense_geometry(self) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
        """Measured once, on first use, by one dummy forward at the input size: every library
        reports channels and stride differently (or not at all), the output never lies, and
        backbones used only for ``embed`` do not pay for it. The forward runs in eval mode so
        batch-norm statistics stay untouched."""
        cfg = self.pretrained_cfg
        size = (cfg.input_size,) * self.ndim
        param = next(self.model.parameters(), None)
        dummy = torch.zeros(
            1,
            cfg.channels,
            *size,
            device=param.device if param is not None else None,
            dtype=param.dtype if param is not None else None,
        )
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                levels = self.dense_levels(dummy)
        finally:
            self.model.train(training)
        dims = tuple(int(t.shape[1]) for t in levels)
        strides = tuple(
            tuple(s // m for s, m in zip(size, t.shape[2:], strict=True)) for t in levels
        )
        return dims, strides

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(images)


def _dense_map(name: str, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Channel-first spatial features from clinadapt, timm or open_clip models.

    clinadapt's own nets define ``forward_dense``. Token models (timm ViTs, open_clip's ViT
    tower) use the library's ``forward_intermediates`` for the last block, final norm applied,
    prefix tokens (class, registers) dropped and patches laid out on the grid. timm CNNs return
    the map from ``forward_features`` (channels last for Swin-like models, per ``output_fmt``).
    Models wrapped by PEFT (LoRA) are read through the wrapped module, which holds the layers.
    """
    model = _unwrap(model)
    own = getattr(model, "forward_dense", None)
    if callable(own):
        return own(images)
    library = _library(model)
    takes = getattr(model, "forward_intermediates", None)
    if library == "open_clip" and callable(takes) and hasattr(model, "ln_post"):
        out = takes(images, indices=1, normalize_intermediates=True, intermediates_only=True)
        return out["image_intermediates"][-1]
    if library == "timm" and not _is_cnn(model):
        if callable(takes):
            last = takes(images, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True)
            return last[-1]
    elif library == "timm" and callable(getattr(model, "forward_features", None)):
        out = model.forward_features(images)
        if getattr(model, "output_fmt", "NCHW") == "NHWC":
            out = out.movedim(-1, 1)
        if out.ndim == images.ndim:
            return out
    raise ClinadaptError(
        f"dense features are not available for {name} ({type(model).__name__}): it has no "
        "spatial feature map clinadapt knows how to read; use a timm CNN or ViT, an open_clip "
        "ViT or one of clinadapt's own backbones (clinadapt backbones lists them)"
    )


def _unwrap(model: nn.Module) -> nn.Module:
    """The library's own module under a PEFT wrapper (``peft.LoraModel``): LoRA replaces layers
    inside it, so its methods (``forward_features``, ``forward_intermediates``) run them."""
    while _library(model) == "peft" and isinstance(getattr(model, "model", None), nn.Module):
        model = model.model
    return model


def _library(model: nn.Module) -> str:
    return type(model).__module__.split(".")[0]


def _is_cnn(model: nn.Module) -> bool:
    """A timm model without prefix tokens: a CNN, or a hierarchical transformer (Swin) whose
    stages, like a CNN's, halve the grid."""
    return getattr(model, "num_prefix_tokens", None) is None
