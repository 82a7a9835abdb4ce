"""MAE (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners", CVPR): a ViT encodes
a random quarter of the patches, a small decoder rebuilds the hidden ones from it.

Works for timm Vision Transformers and our 3D ViT (``backbones/vit3d.py``), which share the
parts used here: ``patch_embed``, ``pos_embed``, ``cls_token``, ``blocks`` and ``norm``. The
decoder's position embeddings are learned rather than the paper's fixed sine-cosine ones, so
the same code serves 2D and 3D patch grids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from timm.models.vision_transformer import Block
from torch import nn

from clinadapt.errors import ConfigError
from clinadapt.ssl.base import SSL_METHODS, PretrainModel
from clinadapt.ssl.losses import masked_patch_mse
from clinadapt.ssl.masking import patchify, random_mask


@dataclass
class MAEConfig:
    mask_ratio: float = field(default=0.75, metadata={"help": "fraction of patches hidden"})
    decoder_dim: int = field(default=128, metadata={"help": "decoder width"})
    decoder_depth: int = field(default=2, metadata={"help": "decoder transformer blocks"})
    decoder_heads: int = field(default=4, metadata={"help": "decoder attention heads"})
    normalise_target: bool = field(
        default=True, metadata={"help": "reconstruct per-patch normalised pixels (the paper's)"}
    )

    def __post_init__(self) -> None:
        if not 0 < self.mask_ratio < 1:
            raise ConfigError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        for key in ("decoder_dim", "decoder_depth", "decoder_heads"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.decoder_dim % self.decoder_heads:
            raise ConfigError(
                f"decoder_dim ({self.decoder_dim}) must be divisible by decoder_heads "
                f"({self.decoder_heads})"
            )


def vision_transformer(encoder: nn.Module) -> nn.Module:
    """The ViT inside ``encoder`` (unwrapping PEFT's LoraModel), or a ConfigError saying why
    MAE cannot pretrain it."""
    vit = encoder.model if hasattr(encoder, "peft_config") else encoder
    needed = ("patch_embed", "pos_embed", "cls_token", "blocks", "norm")
    missing = [n for n in needed if getattr(vit, n, None) is None]
    if missing:
        raise ConfigError(
            f"mae needs a Vision Transformer with {', '.join(needed)} (timm ViTs, vit_t_28, "
            f"vit3d_t_28); {type(vit).__name__} lacks {', '.join(missing)}. Use simclr or dino "
            "for CNNs"
        )
    sizes = set(vit.patch_embed.patch_size)
    if len(sizes) != 1:
        raise ConfigError(f"mae needs square/cubic patches, got {vit.patch_embed.patch_size}")
    return vit


class MAE(PretrainModel):
    config_cls = MAEConfig
    description = "MAE (He et al. 2022): masked autoencoding, ViTs only (2D and 3D)"
    views = "mae"

    def __init__(self, encoder: nn.Module, feature_dim: int, config: MAEConfig) -> None:
        super().__init__(encoder, feature_dim, config)
        vit = vision_transformer(encoder)
        self.patch = int(vit.patch_embed.patch_size[0])
        self.grid = tuple(int(g) for g in vit.patch_embed.grid_size)
        self.channels = int(vit.patch_embed.proj.in_channels)
        tokens = math.prod(self.grid)
        d = config.decoder_dim
        self.decoder_embed = nn.Linear(vit.embed_dim, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.decoder_pos = nn.Parameter(torch.zeros(1, vit.num_prefix_tokens + tokens, d))
        self.decoder_blocks = nn.Sequential(
            *[
                Block(d, config.decoder_heads, mlp_ratio=4.0, qkv_bias=True)
                for _ in range(config.decoder_depth)
            ]
        )
        self.decoder_norm = nn.LayerNorm(d, eps=1e-6)
        self.decoder_pred = nn.Linear(d, self.patch ** len(self.grid) * self.channels)
        for p in (self.mask_token, self.decoder_pos):
            nn.init.trunc_normal_(p, std=0.02)

    def forward(self, views: list[torch.Tensor], epoch: int = 0) -> torch.Tensor:
        x = views[0]
        grid = tuple(s // self.patch for s in x.shape[2:])
        if grid != self.grid:
            raise ConfigError(
                f"mae: views of {tuple(x.shape[2:])} do not match the encoder's input "
                f"({tuple(g * self.patch for g in self.grid)}); leave the view size at 0"
            )
        keep, mask = random_mask(
            x.shape[0], math.prod(self.grid), self.config.mask_ratio, device=x.device
        )
        latent, prefix = self._encode(x, keep)
        prediction = self._decode(latent, prefix, keep)
        return masked_patch_mse(
            prediction, patchify(x, self.patch), mask, normalise_target=self.config.normalise_target
        )

    def _encode(self, x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, int]:
        vit = vision_transformer(self.encoder)
        tokens = vit.patch_embed(x)
        if tokens.ndim > 3:  # timm's dynamic-size patch embedding keeps the grid (NHWC)
            tokens = tokens.flatten(1, -2)
        n_prefix = vit.num_prefix_tokens
        pos = vit.pos_embed
        prefix_pos = None if getattr(vit, "no_embed_class", False) else pos[:, :n_prefix]
        tokens = tokens + (pos if prefix_pos is None else pos[:, n_prefix:])
        tokens = torch.gather(tokens, 1, keep[..., None].expand(-1, -1, tokens.shape[-1]))
        prefix = torch.cat(
            [t for t in (vit.cls_token, getattr(vit, "reg_token", None)) if t is not None], dim=1
        )
        if prefix_pos is not None:
            prefix = prefix + prefix_pos
        tokens = torch.cat([prefix.expand(len(tokens), -1, -1), tokens], dim=1)
        if hasattr(vit, "norm_pre"):
            tokens = vit.norm_pre(tokens)
        return vit.norm(vit.blocks(tokens)), n_prefix

    def _decode(self, latent: torch.Tensor, n_prefix: int, keep: torch.Tensor) -> torch.Tensor:
        y = self.decoder_embed(latent)
        b, d = y.shape[0], y.shape[-1]
        full = self.mask_token.to(y.dtype).expand(b, self.decoder_pos.shape[1] - n_prefix, d)
        full = torch.scatter(full, 1, keep[..., None].expand(-1, -1, d), y[:, n_prefix:])
        y = torch.cat([y[:, :n_prefix], full], dim=1) + self.decoder_pos
        y = self.decoder_pred(self.decoder_norm(self.decoder_blocks(y)))
        return y[:, n_prefix:]


SSL_METHODS.register("mae", MAE)
