"""Patches and random masks for masked image modelling, for images and volumes alike."""

from __future__ import annotations

import torch


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) or (B, C, D, H, W) -> (B, N, patch^k * C), patches in row-major grid order
    (the order of a ViT's patch tokens), each flattened spatially first, then by channel."""
    spatial = x.shape[2:]
    if len(spatial) not in (2, 3) or any(s % patch for s in spatial):
        raise ValueError(
            f"cannot cut {tuple(x.shape)} into patches of {patch}: expected (B, C, H, W) or "
            "(B, C, D, H, W) with every spatial size divisible by the patch"
        )
    b, c, k = x.shape[0], x.shape[1], len(spatial)
    grid = [s // patch for s in spatial]
    shape = [b, c]
    for g in grid:
        shape += [g, patch]
    y = x.reshape(shape)
    # (B, C, g1, p1, g2, p2[, g3, p3]) -> (B, g1, g2[, g3], p1, p2[, p3], C)
    order = [0, *range(2, 2 + 2 * k, 2), *range(3, 3 + 2 * k, 2), 1]
    return y.permute(order).reshape(b, -1, patch**k * c)


def unpatchify(
    patches: torch.Tensor, patch: int, channels: int, grid: tuple[int, ...]
) -> torch.Tensor:
    """The inverse of ``patchify`` for a patch grid ``grid`` ((gh, gw) or (gd, gh, gw))."""
    b, k = patches.shape[0], len(grid)
    y = patches.reshape(b, *grid, *[patch] * k, channels)
    order = [0, 1 + 2 * k]
    for i in range(k):
        order += [1 + i, 1 + k + i]
    return y.permute(order).reshape(b, channels, *[g * patch for g in grid])


def random_mask(
    batch: int, tokens: int, ratio: float, *, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample uniform random masking, as in MAE: ``(keep, mask)`` where ``keep`` (B, n_keep)
    holds the visible token indices in increasing order and ``mask`` (B, N) is 1 where hidden.

    The number kept is the same for every sample so the visible tokens form a dense batch;
    at least one token stays visible. Randomness comes from torch's global generator, which
    training checkpoints save and restore.
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    n_keep = max(1, round(tokens * (1 - ratio)))
    noise = torch.rand(batch, tokens, device=device)
    keep = noise.argsort(dim=1)[:, :n_keep].sort(dim=1).values
    mask = torch.ones(batch, tokens, device=device)
    mask.scatter_(1, keep, 0.0)
    return keep, mask
