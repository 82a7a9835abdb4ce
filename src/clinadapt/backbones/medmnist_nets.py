"""The from-scratch ResNets of the MedMNIST v2 baselines (Yang et al., Scientific Data 2023), as one
ResNet over 2 or 3 spatial dimensions.

What the MedMNIST/experiments code does, and what this module reproduces:

* 2D at 28 px (``MedMNIST2D/models.py``, from kuangliu/pytorch-cifar): a 3x3 stride-1 first
  convolution, no max-pool, BasicBlocks ``[2, 2, 2, 2]`` of widths 64/128/256/512, 1x1-conv
  "shortcut" projections, global average pooling and a linear classifier. Images are normalised
  with mean 0.5 and std 0.5. That is ``stem="cifar"`` here. (For 224 px the paper used
  torchvision's ``resnet18``: 7x7 stride-2 convolution plus 3x3 stride-2 max-pool,
  ``stem="imagenet"``.)
* 3D (``MedMNIST3D/train_and_eval_pytorch.py``): the same 2D model, converted by ACSConv's
  converters. ``Conv2_5dConverter`` turns every ``Conv2d(k, stride=s, padding=p)`` into a
  ``Conv3d`` with kernel ``(1, k, k)``, padding ``(0, p, p)`` and stride ``(s, s, s)`` - the
  converter passes the scalar stride on, so stride-2 stages also halve the depth axis even though
  the kernels never mix neighbouring slices (``conv_mode="2.5d"``). ``Conv3dConverter`` makes
  ``Conv3d(k, k, k)`` with stride ``(s, s, s)`` and padding ``(p, p, p)`` (``conv_mode="3d"``).
  Both replace BatchNorm2d / pooling by their 3D versions (the max-pool of the imagenet stem
  becomes a cubic 3x3x3 pool in both modes). The script's default ``--pretrained_3d i3d`` builds
  the 3D kernels by inflating the 2D model's random initialisation (each 2D kernel stacked ``k``
  times along depth and divided by ``k``); ``inflate_init=True`` does the same.
* 3D input (``medmnist.MedMNIST3D``): one channel (three only with ``--as_rgb``, off by default),
  voxels divided by 255 and *not* mean/std normalised (mean 0, std 1). With ``--shape_transform``
  (meant for the shape datasets AdrenalMNIST3D / VesselMNIST3D) voxels are multiplied by a random
  U(0, 1) factor when training and by 0.5 when evaluating, i.e. std 2 at evaluation.

Module names follow the MedMNIST code (``conv1``, ``bn1``, ``layerN.i.shortcut``, ``linear``), so
state dicts of its released weights fit. ``num_classes=0`` replaces the classifier by an identity,
as timm does, and the model then returns pooled ``num_features``-wide features.

``MODELS`` also names small Vision Transformers trained from scratch, for comparison with these
ResNets at MedMNIST's sizes: ``vit_t_28`` (timm's ``VisionTransformer``, 4 px patches on 28 px
images, 49 tokens) and the volume-native ``vit3d_t_28`` (``vit3d.VisionTransformer3d``, 7^3
patches on 28^3 volumes, 64 tokens), both 192 wide, 6 blocks, 3 heads (ViT-Ti width, half
depth).

``MODELS`` also names MONAI's U-Net (``unet.py``), the from-scratch segmentation baseline:
``unet`` (2D, 224 px) and ``unet3d`` (64^3 volumes, one level fewer to suit a CPU).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from clinadapt.backbones.sam.backbone import LiteMedSAMEncoder
from clinadapt.backbones.unet import UNet
from clinadapt.backbones.vit3d import VisionTransformer3d
from clinadapt.errors import ConfigError, DataError, UnknownNameError
from clinadapt.registry import did_you_mean

ConvMode = Literal["2d", "2.5d", "3d"]
Stem = Literal["cifar", "imagenet"]
CONV_MODES = ("2d", "2.5d", "3d")
STEMS = ("cifar", "imagenet")

__all__ = [
    "ARCHITECTURES",
    "MODELS",
    "BasicBlock",
    "Bottleneck",
    "ModelDefaults",
    "ResNet",
    "create_model",
    "input_config",
]


def _conv(
    in_planes: int, out_planes: int, kernel: int, stride: int, mode: ConvMode
) -> nn.Conv2d | nn.Conv3d:
    """A bias-free ``kernel``-sized convolution with "same" padding, in ``mode``'s dimensions."""
    pad = kernel // 2
    if mode == "2d":
        return nn.Conv2d(in_planes, out_planes, kernel, stride, pad, bias=False)
    if mode == "2.5d":  # ACSConv Conv2_5d: (1, k, k) kernel, scalar stride on all three axes
        return nn.Conv3d(
            in_planes, out_planes, (1, kernel, kernel), stride, (0, pad, pad), bias=False
        )
    return nn.Conv3d(in_planes, out_planes, kernel, stride, pad, bias=False)


def _norm(planes: int, mode: ConvMode) -> nn.BatchNorm2d | nn.BatchNorm3d:
    return nn.BatchNorm2d(planes) if mode == "2d" else nn.BatchNorm3d(planes)


def _shortcut(in_planes: int, out_planes: int, stride: int, mode: ConvMode) -> nn.Sequential:
    """Identity (an empty Sequential) or a 1x1 projection, as in the MedMNIST code."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(_conv(in_planes, out_planes, 1, stride, mode), _norm(out_planes, mode))


class BasicBlock(nn.Module):
    expansion: ClassVar[int] = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, mode: ConvMode = "2d"):
        super().__init__()
        self.conv1 = _conv(in_planes, planes, 3, stride, mode)
        self.bn1 = _norm(planes, mode)
        self.conv2 = _conv(planes, planes, 3, 1, mode)
        self.bn2 = _norm(planes, mode)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride, mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion: ClassVar[int] = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, mode: ConvMode = "2d"):
        super().__init__()
        self.conv1 = _conv(in_planes, planes, 1, 1, mode)
        self.bn1 = _norm(planes, mode)
        self.conv2 = _conv(planes, planes, 3, stride, mode)
        self.bn2 = _norm(planes, mode)
        self.conv3 = _conv(planes, planes * self.expansion, 1, 1, mode)
        self.bn3 = _norm(planes * self.expansion, mode)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride, mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """``ResNet(BasicBlock, [2, 2, 2, 2], in_channels=3)`` is the MedMNIST v2 28 px ResNet-18.

    ``spatial_dims`` 2 takes (B, C, H, W), 3 takes (B, C, D, H, W). ``conv_mode`` defaults to
    ``2d`` / ``3d`` to match; ``2.5d`` (3D only) uses (1, k, k) kernels (see the module docstring).
    ``stem`` is ``cifar`` (3x3 stride 1, no pool) or ``imagenet`` (7x7 stride 2 + max-pool).
    Initialisation is PyTorch's default for ``cifar`` (as the MedMNIST models) and torchvision's
    (Kaiming-normal, fan-out) for ``imagenet``; ``inflate_init`` inflates 3D kernels from such a
    2D initialisation (ACSConv's i3d). ``widths`` shrink the model for tests.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: Sequence[int],
        in_channels: int = 3,
        spatial_dims: int = 2,
        conv_mode: ConvMode | None = None,
        stem: Stem = "cifar",
        num_classes: int = 0,
        widths: Sequence[int] = (64, 128, 256, 512),
        inflate_init: bool = False,
    ) -> None:
        super().__init__()
        mode = _check_args(spatial_dims, conv_mode, stem, layers, widths, in_channels)
        self.spatial_dims = spatial_dims
        self.conv_mode: ConvMode = mode
        self.stem = stem
        self.in_channels = in_channels
        self.grad_checkpointing = False
        first = widths[0]
        if stem == "cifar":
            self.conv1 = _conv(in_channels, first, 3, 1, mode)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = _conv(in_channels, first, 7, 2, mode)
            pool = nn.MaxPool2d if mode == "2d" else nn.MaxPool3d  # ACSConv: cubic in 2.5D too
            self.maxpool = pool(kernel_size=3, stride=2, padding=1)
        self.bn1 = _norm(first, mode)
        planes_in = first
        for i, (width, blocks) in enumerate(zip(widths, layers, strict=True)):
            stage = []
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(block(planes_in, width, stride, mode))
                planes_in = width * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.num_features = planes_in
        pool_cls = nn.AdaptiveAvgPool2d if spatial_dims == 2 else nn.AdaptiveAvgPool3d
        self.avgpool = pool_cls(1)
        self.num_classes = 0
        self.linear: nn.Module = nn.Identity()
        self.reset_classifier(num_classes)
        # tells clinadapt's weights loader which state-dict keys are the classifier (timm's field)
        self.pretrained_cfg: dict[str, Any] = {"classifier": "linear"}
        self._init_weights(inflate_init)

    def _stages(self) -> list[nn.Module]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def _init_weights(self, inflate: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Conv3d):
                if inflate and isinstance(m, nn.Conv3d):
                    _inflate_(m.weight, self.stem)
                elif self.stem == "imagenet":
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def get_classifier(self) -> nn.Module:
        return self.linear

    def reset_classifier(self, num_classes: int) -> None:
        """A new linear classifier with ``num_classes`` outputs; 0 makes the model a feature
        extractor returning (B, num_features)."""
        if num_classes < 0:
            raise ConfigError(f"num_classes must be 0 or more, got {num_classes}")
        self.num_classes = num_classes
        self.linear = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            want = "(B, C, H, W) images" if self.spatial_dims == 2 else "(B, C, D, H, W) volumes"
            hint = (
                "; use clinadapt.data.transforms.VolumePreprocess" if self.spatial_dims == 3 else ""
            )
            raise DataError(
                f"this {self.conv_mode} ResNet takes {want} with C={self.in_channels}, got shape "
                f"{tuple(x.shape)}{hint}"
            )
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        for stage in self._stages():
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return x

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's map, (B, num_features, h, w) or (B, num_features, d, h, w), whose
        average is the pooled feature."""
        return self.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _check_args(
    spatial_dims: int,
    conv_mode: str | None,
    stem: str,
    layers: Sequence[int],
    widths: Sequence[int],
    in_channels: int,
) -> ConvMode:
    if spatial_dims not in (2, 3):
        raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    mode = conv_mode or ("2d" if spatial_dims == 2 else "3d")
    if mode not in CONV_MODES:
        hint = did_you_mean(str(mode), list(CONV_MODES))
        raise ConfigError(f"conv_mode={mode!r} is not one of {list(CONV_MODES)}.{hint}")
    if (mode == "2d") != (spatial_dims == 2):
        raise ConfigError(f"conv_mode={mode!r} does not fit spatial_dims={spatial_dims}")
    if stem not in STEMS:
        raise ConfigError(f"stem={stem!r} is not one of {list(STEMS)}")
    if len(layers) != 4 or len(widths) != 4 or min(layers) < 1 or min(widths) < 1:
        raise ConfigError(
            f"layers and widths need 4 positive values each, got {list(layers)}, {list(widths)}"
        )
    if in_channels < 1:
        raise ConfigError(f"in_channels must be positive, got {in_channels}")
    return mode  # type: ignore[return-value]


@torch.no_grad()
def _inflate_(weight: torch.Tensor, stem: str) -> None:
    """ACSConv's i3d inflation of a fresh 2D initialisation: (O, I, k, h, w) <- stack of the
    (O, I, h, w) kernel k times along depth, divided by k."""
    depth = weight.shape[2]
    flat = torch.empty(weight.shape[:2] + weight.shape[3:], dtype=weight.dtype)
    if stem == "imagenet":
        nn.init.kaiming_normal_(flat, mode="fan_out", nonlinearity="relu")
    else:  # nn.Conv2d's default
        nn.init.kaiming_uniform_(flat, a=math.sqrt(5))
    weight.copy_(flat.unsqueeze(2).expand_as(weight) / depth)


@dataclass(frozen=True)
class ModelDefaults:
    """Builder ``arch`` (a key of ``ARCHITECTURES``), its constructor arguments, and the input the
    model expects: edge length, mean/std and ``ndim`` spatial dimensions (3 for volumes)."""

    kwargs: dict[str, Any] = field(hash=False)
    input_size: int
    mean: float
    std: float
    arch: str = "resnet"
    ndim: int = 2


_BLOCKS: dict[str, type[BasicBlock | Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


def _resnet(block: str = "basic", layers: Sequence[int] = (2, 2, 2, 2), **kwargs: Any) -> ResNet:
    if "widths" in kwargs:
        kwargs["widths"] = tuple(kwargs["widths"])
    return ResNet(_BLOCKS[block], layers, **kwargs)


def _vit(**kwargs: Any) -> VisionTransformer:
    model = VisionTransformer(**kwargs)
    # tells clinadapt's weights loader which state-dict keys are the classifier (timm's field)
    model.pretrained_cfg = {"classifier": "head"}
    return model


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "resnet": _resnet,
    "vit": _vit,
    "vit3d": VisionTransformer3d,
    "unet": UNet,
    "litemedsam": LiteMedSAMEncoder,
}


def _vit_args(
    size: int, patch: int, channels: int, width: int = 192, depth: int = 6, heads: int = 3
) -> dict[str, Any]:
    """ViT constructor arguments: by default ViT-Ti's width (192) and heads (3) at half its depth,
    small enough to train from scratch on MedMNIST."""
    return {
        "img_size": size,
        "patch_size": patch,
        "in_chans": channels,
        "embed_dim": width,
        "depth": depth,
        "num_heads": heads,
    }


_V2_3D = {"in_channels": 1, "spatial_dims": 3}
MODELS: dict[str, ModelDefaults] = {
    "resnet18_28": ModelDefaults({"in_channels": 3, "spatial_dims": 2}, 28, 0.5, 0.5),
    "resnet18_2_5d": ModelDefaults({**_V2_3D, "conv_mode": "2.5d"}, 28, 0.0, 1.0, ndim=3),
    "resnet18_3d": ModelDefaults(
        {**_V2_3D, "conv_mode": "3d", "inflate_init": True}, 28, 0.0, 1.0, ndim=3
    ),
    "test_resnet3d": ModelDefaults(
        {**_V2_3D, "conv_mode": "3d", "widths": (4, 8, 16, 32), "layers": (1, 1, 1, 1)},
        16,
        0.0,
        1.0,
        ndim=3,
    ),
    "vit_t_28": ModelDefaults(_vit_args(28, 4, 3), 28, 0.5, 0.5, arch="vit"),
    "vit3d_t_28": ModelDefaults(_vit_args(28, 7, 1), 28, 0.0, 1.0, arch="vit3d", ndim=3),
    "test_vit3d": ModelDefaults(
        _vit_args(16, 4, 1, width=32, depth=2, heads=2), 16, 0.0, 1.0, arch="vit3d", ndim=3
    ),
    "unet": ModelDefaults({"spatial_dims": 2, "in_channels": 3}, 224, 0.5, 0.5, arch="unet"),
    "unet3d": ModelDefaults(
        {**_V2_3D, "channels": (16, 32, 64, 128)}, 64, 0.0, 1.0, arch="unet", ndim=3
    ),
    "test_unet": ModelDefaults(
        {"spatial_dims": 2, "in_channels": 3, "channels": (4, 8, 16), "features": 8},
        32,
        0.5,
        0.5,
        arch="unet",
    ),
    "test_unet3d": ModelDefaults(
        {**_V2_3D, "channels": (4, 8, 16), "features": 8}, 16, 0.0, 1.0, arch="unet", ndim=3
    ),
    "litemedsam": ModelDefaults({}, 256, 0.0, 1.0, arch="litemedsam"),
}


def _defaults(name: str) -> ModelDefaults:
    if name not in MODELS:
        raise UnknownNameError(
            f"Unknown clinadapt architecture {name!r}.{did_you_mean(name, list(MODELS))}"
        )
    return MODELS[name]


def create_model(name: str, num_classes: int = 0, **kwargs: Any) -> nn.Module:
    """Architecture ``name`` with random weights; ``kwargs`` override its constructor arguments
    (e.g. ``in_channels`` from a weights folder's config.json)."""
    d = _defaults(name)
    return ARCHITECTURES[d.arch](**{**d.kwargs, **kwargs, "num_classes": num_classes})


def input_config(name: str, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Input size, channels and per-channel mean/std for architecture ``name`` built with
    ``kwargs`` (overrides such as ``in_channels``)."""
    d = _defaults(name)
    args = {**d.kwargs, **(kwargs or {})}
    channels = int(args.get("in_channels", args.get("in_chans", 3)))
    return {
        "input_size": d.input_size,
        "channels": channels,
        "mean": (d.mean,) * channels,
        "std": (d.std,) * channels,
        "interpolation": "nearest",
        "ndim": int(args.get("spatial_dims", d.ndim)),
    }
