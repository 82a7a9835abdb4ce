"""A Vision Transformer over volumes: Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words:
Transformers for Image Recognition at Scale" (ICLR), with cubic patches instead of square ones.

Volumes (CT, MRI) are natively 3D, so a 3D patch sees the anatomy across slices, which a 2D model
fed slice by slice does not. No published weights fit MedMNIST's small volumes; the model is
trained from scratch or pretrained in this package (masked autoencoding, SimCLR).

The blocks are timm's ``Block``, so layer names match timm's ViTs (``blocks.N.attn.qkv``,
``blocks.N.mlp.fc1``, ...), which LoRA's default targets and the adapter method look for. The
attributes mirror timm's ``VisionTransformer`` with one class token and no registers
(``patch_embed``, ``cls_token``, ``pos_embed`` including the class position,
``num_prefix_tokens``, ``blocks``, ``norm``, ``head``) so a masked autoencoder can drive the parts
itself. (VPT stays limited to timm's own ViTs.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from clinadapt.errors import ConfigError, DataError

__all__ = ["PatchEmbed3d", "VisionTransformer3d", "resample_pos_embed_3d"]

Size3 = tuple[int, int, int]


def _triple(value: int | Sequence[int], what: str) -> Size3:
    size = (value,) * 3 if isinstance(value, int) else tuple(int(v) for v in value)
    if len(size) != 3 or min(size) < 1:
        raise ConfigError(f"{what} must be one positive int or three, got {value!r}")
    return size  # type: ignore[return-value]


def _grid(size: Sequence[int], patch: Size3) -> Size3:
    """Patches per axis; sizes that the patch does not divide are refused rather than cropped."""
    if any(s % p for s, p in zip(size, patch, strict=True)):
        raise DataError(
            f"volume size {'x'.join(map(str, size))} is not divisible by the patch size "
            f"{'x'.join(map(str, patch))}; resize or crop the volumes to a multiple of the patch"
        )
    return tuple(s // p for s, p in zip(size, patch, strict=True))  # type: ignore[return-value]


class PatchEmbed3d(nn.Module):
    """Non-overlapping ``patch_size`` cubes -> (B, N, embed_dim) tokens, in (D, H, W) raster order.

    ``grid_size`` and ``num_patches`` describe ``img_size``, the size the position embeddings are
    built for; other sizes divisible by the patch are embedded too.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 28,
        patch_size: int | Sequence[int] = 7,
        in_chans: int = 1,
        embed_dim: int = 192,
    ) -> None:
        super().__init__()
        self.img_size = _triple(img_size, "img_size")
        self.patch_size = _triple(patch_size, "patch_size")
        try:
            self.grid_size = _grid(self.img_size, self.patch_size)
        except DataError as err:
            raise ConfigError(str(err)) from None
        self.num_patches = math.prod(self.grid_size)
        self.proj = nn.Conv3d(
            in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _grid(x.shape[-3:], self.patch_size)
        return self.proj(x).flatten(2).transpose(1, 2)


def resample_pos_embed_3d(
    pos_embed: torch.Tensor, new_size: Size3, old_size: Size3, num_prefix_tokens: int = 1
) -> torch.Tensor:
    """(1, prefix + prod(old_size), D) -> (1, prefix + prod(new_size), D): the patch positions
    resampled trilinearly over the grid, the class position kept (timm's ``resample_abs_pos_embed``
    in 3D)."""
    if tuple(new_size) == tuple(old_size):
        return pos_embed
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = patches.shape[-1]
    grid = patches.reshape(1, *old_size, dim).permute(0, 4, 1, 2, 3)
    grid = F.interpolate(grid.float(), size=tuple(new_size), mode="trilinear", align_corners=False)
    patches = grid.to(pos_embed.dtype).permute(0, 2, 3, 4, 1).reshape(1, -1, dim)
    return torch.cat([prefix, patches], dim=1)


class VisionTransformer3d(nn.Module):
    """ViT over (B, C, D, H, W) volumes with a class token; ``num_classes=0`` returns the normed
    class token (``num_features`` wide), as timm does.

    Position embeddings are learnt for ``img_size``; inputs of another size (crops), if divisible
    by the patch, use them resampled trilinearly. Initialisation follows timm (truncated normal,
    std 0.02, for position and class embeddings and Linear weights, zero biases; the patch
    convolution keeps PyTorch's default).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 28,
        patch_size: int | Sequence[int] = 7,
        in_chans: int = 1,
        num_classes: int = 0,
        embed_dim: int = 192,
        depth: int = 6,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ConfigError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.in_chans = in_chans
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.num_prefix_tokens = 1
        self.no_embed_class = False
        self.global_pool = "token"
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed3d(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth, as timm
        self.blocks = nn.Sequential(
            *(
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=rate)
                for rate in rates
            )
        )
        self.norm = LayerNorm(embed_dim)
        self.num_classes = 0
        self.head: nn.Module = nn.Identity()
        self.reset_classifier(num_classes)
        # tells clinadapt's weights loader which state-dict keys are the classifier (timm's field)
        self.pretrained_cfg = {"classifier": "head"}
        self._init_weights()

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A new linear head with ``num_classes`` outputs; 0 returns (B, num_features)."""
        if num_classes < 0:
            raise ConfigError(f"num_classes must be 0 or more, got {num_classes}")
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes else nn.Identity()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enable

    def pos_embed_for(self, grid: Size3) -> torch.Tensor:
        """Position embeddings (1, 1 + prod(grid), D) for a ``grid`` of patches."""
        return resample_pos_embed_3d(self.pos_embed, grid, self.patch_embed.grid_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> normed tokens (B, 1 + N, D), the class token first."""
        if x.ndim != 5 or x.shape[1] != self.in_chans:
            raise DataError(
                f"this 3D ViT takes (B, C, D, H, W) volumes with C={self.in_chans}, got shape "
                f"{tuple(x.shape)}; use clinadapt.data.transforms.VolumePreprocess"
            )
        grid = _grid(x.shape[-3:], self.patch_embed.patch_size)
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed_for(grid)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """The normed patch tokens as a map (B, D, d, h, w) over the patch grid (class token
        dropped)."""
        tokens = self.forward_features(x)[:, self.num_prefix_tokens :]
        grid = _grid(x.shape[-3:], self.patch_embed.patch_size)
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, *grid)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
