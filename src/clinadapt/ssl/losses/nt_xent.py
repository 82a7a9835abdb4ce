"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al. 2020, "A Simple
Framework for Contrastive Learning of Visual Representations", ICML).

Each of the 2B embeddings must pick out its partner view among the 2B - 1 others. Under
several processes the negatives are gathered from every process (with gradients) and each
process scores its own rows, so the effective batch, on which SimCLR's results depend, is the
global one while DDP's gradient averaging gives the global mean loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Mean NT-Xent over both directions; ``z_a[i]`` and ``z_b[i]`` are two views of item i."""
    if z_a.shape != z_b.shape or z_a.ndim != 2:
        raise ValueError(
            f"expected two (B, D) embeddings, got {tuple(z_a.shape)} and {tuple(z_b.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    z_a, z_b = F.normalize(z_a.float(), dim=1), F.normalize(z_b.float(), dim=1)
    world, rank = _distributed()
    b = len(z_a)
    all_a, all_b = (_gather(z_a), _gather(z_b)) if world > 1 else (z_a, z_b)
    n = len(all_a)
    logits = torch.cat([z_a, z_b]) @ torch.cat([all_a, all_b]).T / temperature
    own = torch.arange(b, device=logits.device) + rank * b
    self_columns = torch.cat([own, own + n])
    positive_columns = torch.cat([own + n, own])
    logits[torch.arange(2 * b, device=logits.device), self_columns] = float("-inf")
    return F.cross_entropy(logits, positive_columns)


def _distributed() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _gather(z: torch.Tensor) -> torch.Tensor:
    """All processes' embeddings in rank order; gradients flow back to each owner."""
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(z))
