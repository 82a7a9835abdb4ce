"""Adaptive temperature (``clinadapt.eval.adaptive_temperature``) in the attention softmax of
timm ViTs: timm's own models (DINOv2, ViT-S/B) and clinadapt's ``vit_t_28``, ``vit3d_t_28`` and
``test_vit3d``, whose blocks are timm ``Block``s.

The patch is reversible and per model: inside ``adaptive_attention(model)`` every
``timm.layers.Attention`` module of ``model`` has an instance-level ``forward`` that computes
``softmax(adaptive_temperature(q k^T / sqrt(d) + mask))`` per query and head; on exit the
instance attribute is removed and the class's forward (fused or not) is back, so outputs are
bit-identical to before. timm's fused path (``F.scaled_dot_product_attention``) never exposes the
attention scores, so the patched forward always takes the explicit path, a copy of timm's
non-fused branch with the softmax replaced. Other attention classes (Swin's window attention,
open_clip's ``nn.MultiheadAttention``) are not patched.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from timm.layers import Attention
from torch import nn

from clinadapt.errors import ConfigError
from clinadapt.eval.adaptive_temperature import adaptive_temperature

__all__ = ["adaptive_attention", "attention_weights"]


def attention_weights(scores: torch.Tensor) -> torch.Tensor:
    """Attention probabilities of (B, heads, queries, keys) ``scores``, sharpened per query."""
    return adaptive_temperature(scores, dim=-1).softmax(dim=-1)


def _additive_mask(
    n: int, like: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool
) -> torch.Tensor | None:
    """``F.scaled_dot_product_attention``'s mask semantics as a bias added to the scores."""
    if is_causal:
        return like.new_full((n, n), float("-inf")).triu_(1)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        return torch.zeros_like(attn_mask, dtype=like.dtype).masked_fill_(~attn_mask, float("-inf"))
    return attn_mask


def _forward(
    self: Attention,
    x: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """timm's ``Attention.forward`` (non-fused branch) with the adaptive-temperature softmax."""
    b, n, c = x.shape
    gate = getattr(self, "gate", None)
    gate = gate(x).sigmoid() if gate is not None else None
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    scores = (q * self.scale) @ k.transpose(-2, -1)
    bias = _additive_mask(n, scores, attn_mask, is_causal)
    if bias is not None:
        scores = scores + bias
    x = self.attn_drop(attention_weights(scores)) @ v
    x = x.transpose(1, 2).reshape(b, n, getattr(self, "attn_dim", c))
    x = self.norm(x)
    if gate is not None:
        x = x * gate
    return self.proj_drop(self.proj(x))


@contextmanager
def adaptive_attention(model: nn.Module) -> Iterator[int]:
    """Within the block, ``model``'s timm attention uses the adaptive-temperature softmax;
    yields how many attention modules were patched. Raises ``ConfigError`` when ``model`` has
    none. The weights are untouched; the patch is undone on exit, also after an exception."""
    modules = [m for m in model.modules() if type(m) is Attention]
    if not modules:
        raise ConfigError(
            f"adaptive attention temperature patches timm's Attention modules (timm ViTs, "
            f"DINOv2, vit_t_28, vit3d_t_28), and {type(model).__name__} has none; Swin and "
            "open_clip towers use other attention classes"
        )
    saved = [m.__dict__.get("forward") for m in modules]
    for m in modules:
        m.forward = types.MethodType(_forward, m)
    try:
        yield len(modules)
    finally:
        for m, previous in zip(modules, saved, strict=True):
            if previous is None:
                del m.forward
            else:
                m.forward = previous
