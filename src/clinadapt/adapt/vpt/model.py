"""Visual Prompt Tuning: Jia et al. 2022, "Visual Prompt Tuning" (ECCV).

Learnable prompt tokens enter a frozen timm ``VisionTransformer`` after the patch embedding and
position embedding, between the prefix tokens (class and register tokens) and the patch tokens:
``[prefix, prompts, patches]``. VPT-shallow prepends them once; VPT-deep replaces them before
every block with that block's own prompts. Prompt tokens are removed after the final norm, so
timm's pooling (class token, average over patches, attention pool) sees exactly the tokens it
would see without prompts. Prompts are initialised uniformly with the paper's Xavier bound
``sqrt(6 / (3 * patch_h * patch_w + dim))``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from clinadapt.adapt.base import METHODS
from clinadapt.adapt.finetune import AdaptedModel, FineTuneMethod
from clinadapt.adapt.vpt.config import VPTConfig
from clinadapt.errors import ClinadaptError


class PromptedViT(nn.Module):
    """A timm ``VisionTransformer`` (``.vit``, frozen) run with prompt tokens (``.prompts``:
    (layers, num_tokens, dim), layers = 1 for VPT-shallow, the number of blocks for VPT-deep)."""

    def __init__(self, vit: nn.Module, num_tokens: int, deep: bool, dropout: float) -> None:
        super().__init__()
        self.vit = vit
        self.num_tokens = num_tokens
        self.deep = deep
        dim = vit.embed_dim
        layers = len(vit.blocks) if deep else 1
        patch = vit.patch_embed.patch_size
        patch_area = patch[0] * patch[1] if isinstance(patch, tuple | list) else patch * patch
        bound = math.sqrt(6.0 / float(3 * patch_area + dim))
        reference = vit.cls_token if vit.cls_token is not None else next(vit.parameters())
        prompts = torch.empty(layers, num_tokens, dim, device=reference.device)
        self.prompts = nn.Parameter(nn.init.uniform_(prompts, -bound, bound).to(reference.dtype))
        self.prompt_dropout = nn.Dropout(dropout)

    def _prompts(self, layer: int, batch: int) -> torch.Tensor:
        return self.prompt_dropout(self.prompts[layer].expand(batch, -1, -1))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the final norm, prompts removed: (B, prefix + patches, dim)."""
        vit, n = self.vit, self.num_tokens
        start = vit.num_prefix_tokens
        x = vit.patch_embed(x)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        batch = x.shape[0]
        x = torch.cat([x[:, :start], self._prompts(0, batch), x[:, start:]], dim=1)
        for i, block in enumerate(vit.blocks):
            if self.deep and i > 0:
                x = torch.cat([x[:, :start], self._prompts(i, batch), x[:, start + n :]], dim=1)
            x = block(x)
        x = vit.norm(x)
        return torch.cat([x[:, :start], x[:, start + n :]], dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.vit.forward_head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _is_timm_vit(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


class VPT(FineTuneMethod):
    """Prompt tokens (and the head) train; the ViT stays frozen. timm ViTs only."""

    config_cls = VPTConfig
    description = "visual prompt tuning (Jia et al. 2022): learnable tokens in a frozen timm ViT"

    def apply(self, model: AdaptedModel) -> AdaptedModel:
        self._require_fresh(model, "vpt")
        backbone = model.backbone
        if not _is_timm_vit(backbone.model):
            raise ClinadaptError(
                f"vpt needs a timm VisionTransformer, but backbone {backbone.name!r} is "
                f"{type(backbone.model).__name__}; use 'lora' or 'adapter' for it"
            )
        self._begin(model, "vpt")
        cfg = self.config
        backbone.model = PromptedViT(backbone.model, cfg.num_tokens, cfg.deep, cfg.dropout)
        model.refresh_frozen_norms()
        return model

    def merge(self, model: AdaptedModel) -> nn.Module:
        raise ClinadaptError(
            "vpt: prompt tokens lengthen the token sequence and cannot be folded into the ViT's "
            "weights; export without --merge (adapter checkpoint), or use lora for a mergeable "
            "model"
        )

    def selected(self) -> dict[str, Any]:
        return {"num_tokens": self.config.num_tokens, "deep": self.config.deep}


METHODS.register("vpt", VPT)
