"""The reconstruction loss of MAE (He et al. 2022, "Masked Autoencoders Are Scalable Vision
Learners", CVPR): mean squared error on the masked patches only, optionally against patches
normalised by their own mean and variance (the paper's better-performing target)."""

from __future__ import annotations

import torch


def masked_patch_mse(
    prediction: torch.Tensor,
    patches: torch.Tensor,
    mask: torch.Tensor,
    *,
    normalise_target: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """``prediction`` and ``patches`` are (B, N, P); ``mask`` (B, N) is 1 where a patch was hidden.

    Visible patches carry no loss: the encoder saw them, so reconstructing them teaches nothing.
    """
    if prediction.shape != patches.shape or mask.shape != patches.shape[:2]:
        raise ValueError(
            f"shapes disagree: prediction {tuple(prediction.shape)}, patches "
            f"{tuple(patches.shape)}, mask {tuple(mask.shape)}"
        )
    target = patches.float()
    if normalise_target:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True, unbiased=True)
        target = (target - mean) / (var + eps).sqrt()
    per_patch = (prediction.float() - target).pow(2).mean(dim=-1)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
