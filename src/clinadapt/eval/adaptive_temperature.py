"""Adaptive temperature (Velickovic et al. 2024, "Softmax is not enough (for sharp
out-of-distribution)"): a softmax whose entropy is high is sharpened at inference time.

With ``H`` the Shannon entropy (nats) of ``softmax(logits)``, the logits are multiplied by
``beta = max(1, polyval(POLYNOMIAL, H))`` when ``H > 0.5`` and left alone otherwise, as in the
paper's reference code (which takes ``log(p + 1e-9)`` in the entropy; here the exact
``log_softmax``). ``beta`` never falls below 1, so entropy never rises.

Where the rule acts, measured on the polynomial (``numpy.polyval``, and ``numpy.roots`` of
``POLYNOMIAL - 1``): it exceeds 1 only for ``0.84858 < H < 5.94452``. On ``(0.5, ln 2]`` it rises
monotonically from 0.1503 to 0.6638 at ``H = ln 2``, so ``beta = 1`` there. A two-class softmax
has ``H <= ln 2 = 0.6931``, hence the rule is an exact no-op (bit-identical logits) for binary
classifiers, and for multi-label sigmoids, each a softmax over ``(0, z)``; more generally for any
softmax with ``H <= 0.84858``. Above ``H = 5.94452`` (near-uniform attention over more than
about 381 keys) the polynomial drops below 1 again and ``beta`` returns to 1. Since it is below 1
on all of ``[0, 0.84858]``, the ``H > 0.5`` gate never decides anything with these coefficients;
it is kept as the paper writes the rule.

``adaptive_probabilities`` is the option for a classifier's output; the attention softmax of timm
ViTs is patched by ``clinadapt.backbones.adaptive_attention``. Both live on torch tensors; this
module sits in ``eval`` (with calibration) so that any layer making probabilities can use it.
"""

from __future__ import annotations

import torch

from clinadapt.data.info import TaskType

__all__ = [
    "ENTROPY_THRESHOLD",
    "POLYNOMIAL",
    "adaptive_beta",
    "adaptive_probabilities",
    "adaptive_temperature",
    "softmax_entropy",
]

POLYNOMIAL = (-0.037, 0.481, -2.3, 4.917, -1.791)
"""Coefficients of ``beta(H)``, highest power first (``numpy.polyval`` order)."""
ENTROPY_THRESHOLD = 0.5
"""Softmaxes with entropy at or below this (nats) are never changed."""


def softmax_entropy(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Entropy in nats of ``softmax(logits)`` along ``dim`` (kept as a size-1 dimension);
    masked ``-inf`` entries contribute 0."""
    logp = torch.log_softmax(logits, dim=dim)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, 0.0).sum(dim=dim, keepdim=True)


def adaptive_beta(entropy: torch.Tensor) -> torch.Tensor:
    """The inverse temperature for softmaxes of ``entropy`` nats: ``max(1, poly(H))`` above
    ``ENTROPY_THRESHOLD``, exactly 1 elsewhere (and where the entropy is NaN)."""
    poly = torch.zeros_like(entropy)
    for c in POLYNOMIAL:  # Horner's rule
        poly = poly * entropy + c
    return torch.where(entropy > ENTROPY_THRESHOLD, poly.clamp_min(1.0), 1.0)


def adaptive_temperature(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``logits * beta(H)``, with ``H`` the entropy of each softmax along ``dim``; rows whose
    ``beta`` is 1 are returned bit for bit. The entropy is computed in at least float32 so that
    bf16/fp16 logits get the same ``beta``."""
    work = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    beta = adaptive_beta(softmax_entropy(work, dim))
    return logits * beta.to(logits.dtype)


def adaptive_probabilities(logits: torch.Tensor, task: TaskType | str) -> torch.Tensor:
    """A classifier's probabilities with adaptive temperature: the drop-in counterpart of
    ``ClassificationTask.scores`` (float32 softmax over classes; per-label sigmoid). Binary tasks
    and multi-label sigmoids have entropy at most ln 2, where ``beta = 1``, so for them this
    returns exactly ``scores``; only single-label tasks with three or more classes can change."""
    logits = logits.float()
    if not TaskType(task).single_label:
        return logits.sigmoid()
    return adaptive_temperature(logits, dim=1).softmax(dim=1)
