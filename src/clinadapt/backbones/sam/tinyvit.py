"""TinyViT (Wu et al., ECCV 2022) in the form MobileSAM and LiteMedSAM use as SAM's image encoder.

Structure, read off the checkpoint's ``image_encoder.*`` keys and shapes (module names match them,
so the weights load strictly):

* ``patch_embed.seq``: two 1x1 convolution + batch-norm units (``c``, ``bn``) with a GELU
  between, ``in_chans -> embed_dims[0] / 2 -> embed_dims[0]``, at full resolution (LiteMedSAM's
  form for 256 px inputs; MobileSAM's 3x3 stride-2 pair for 1024 px is not this module).
* ``layers.0``: MBConv blocks (1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU), then
  patch merging to the next width.
* ``layers.1..3``: TinyViT blocks: windowed self-attention (pre-norm inside ``attn``, a learned
  bias per head and per relative offset ``|dy|, |dx|`` in the window), residual; a 3x3 depthwise
  ``local_conv`` on the map; an MLP (pre-norm inside ``mlp``), residual. Windows that do not tile
  the map are zero-padded on the bottom/right and the padded tokens take part in attention
  unmasked, as in the original, so the released weights see the inputs they were trained on.
* patch merging (``downsample``): 1x1 conv, depthwise 3x3 (stride 2, or 1 into the widths 320,
  448 and 576, so the last two stages keep one resolution), 1x1 conv, GELU between.
* ``neck``: SAM's 1x1 conv to 256 channels, channel LayerNorm, 3x3 conv, channel LayerNorm.

At 256 px the stages run at 256, 128, 64 and 64 px and the embedding is (B, 256, 64, 64): stride 4.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TinyViT"]

FULL_RESOLUTION_WIDTHS = (320, 448, 576)  # patch merging into these widths keeps the resolution


class ConvBN(nn.Sequential):
    """A bias-free convolution followed by batch norm (keys ``c.*`` and ``bn.*``)."""

    def __init__(
        self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__()
        self.c = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (SAM's neck; eps 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(
            x.movedim(1, -1), x.shape[1:2], self.weight, self.bias, self.eps
        ).movedim(-1, 1)


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(ConvBN(in_chans, dim // 2), nn.GELU(), ConvBN(dim // 2, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv1(x))
        y = self.act(self.conv2(y))
        return self.act(x + self.conv3(y))


class PatchMerging(nn.Module):
    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        stride = 1 if out_dim in FULL_RESOLUTION_WIDTHS else 2
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))


def _offset_index(window: int) -> torch.Tensor:
    """(N, N) index of each token pair's offset ``(|dy|, |dx|)`` among the window's distinct
    offsets, numbered in order of first appearance over the row-major pairs (the layout of the
    checkpoint's ``attention_biases`` columns)."""
    points = list(itertools.product(range(window), range(window)))
    offsets: dict[tuple[int, int], int] = {}
    idxs = []
    for p in points:
        for q in points:
            offset = (abs(p[0] - q[0]), abs(p[1] - q[1]))
            idxs.append(offsets.setdefault(offset, len(offsets)))
    return torch.tensor(idxs).view(len(points), len(points))


class Attention(nn.Module):
    """Multi-head self-attention over one window's tokens with learned relative-offset biases.

    ``qkv`` is laid out per head as ``[q, k, v]`` (each ``dim // heads`` wide)."""

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * self.head_dim * num_heads)
        self.proj = nn.Linear(self.head_dim * num_heads, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        self.register_buffer("bias_index", _offset_index(window), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.transpose(1, 2).split(self.head_dim, dim=-1)
        bias = self.attention_biases[:, self.bias_index]
        attn = (q @ k.transpose(-2, -1)) * self.scale + bias
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention, depthwise local convolution and MLP on a (B, C, H, W) map."""

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float) -> None:
        super().__init__()
        self.window = window
        self.attn = Attention(dim, num_heads, window)
        self.local_conv = ConvBN(dim, dim, 3, groups=dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def _windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention within non-overlapping windows of a (B, H, W, C) map."""
        b, h, w, c = x.shape
        ws = self.window
        pad_h, pad_w = (-h) % ws, (-w) % ws
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        nh, nw = (h + pad_h) // ws, (w + pad_w) // ws
        windows = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        out = self.attn(windows).view(b, nh, nw, ws, ws, c).transpose(2, 3)
        return out.reshape(b, nh * ws, nw * ws, c)[:, :h, :w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.permute(0, 2, 3, 1)
        tokens = tokens + self._windowed_attention(tokens)
        tokens = self.local_conv(tokens.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        tokens = tokens + self.mlp(tokens)
        return tokens.permute(0, 3, 1, 2)


class Stage(nn.Module):
    """``blocks`` then, between stages, ``downsample`` (patch merging to the next width)."""

    def __init__(self, blocks: Sequence[nn.Module], downsample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nn.Module):
    """(B, in_chans, H, W) images to a (B, out_chans, H/4, W/4) embedding (LiteMedSAM defaults;
    any size works, the stages follow the input's shape)."""

    def __init__(
        self,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        self.out_chans = out_chans
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        stages = []
        for i, (dim, depth) in enumerate(zip(embed_dims, depths, strict=True)):
            if i == 0:
                blocks: list[nn.Module] = [MBConv(dim, mbconv_expand_ratio) for _ in range(depth)]
            else:
                blocks = [
                    TinyViTBlock(dim, num_heads[i], window_sizes[i], mlp_ratio)
                    for _ in range(depth)
                ]
            last = i == len(embed_dims) - 1
            stages.append(Stage(blocks, None if last else PatchMerging(dim, embed_dims[i + 1])))
        self.layers = nn.ModuleList(stages)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, 1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for stage in self.layers:
            x = stage(x)
        return self.neck(x)
