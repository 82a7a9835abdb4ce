"""The zero-shot classifier of a joint space: class embeddings averaged over prompts.

As in open_clip's ``build_zero_shot_classifier`` (Radford et al. 2021, prompt ensembling): each
prompt is embedded and normalised, a class's embeddings are averaged, and the mean is normalised
again. A classifier has heads: one over the classes for single-label tasks, one per label over
(absent, present) for multi-label tasks (``ClassText.prompts``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.nn import functional as F

from clinadapt.errors import DataError

if TYPE_CHECKING:
    from clinadapt.backbones.text_side import JointSpace


@dataclass(frozen=True)
class TextClassifier:
    """``weights`` (H, K, d): unit class embeddings per head; logits are ``logit_scale`` times
    cosine similarities."""

    weights: torch.Tensor
    logit_scale: float

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """(N, d) unit image embeddings -> (N, H, K) logits."""
        return self.logit_scale * torch.einsum("nd,hkd->nhk", z.float(), self.weights)


def zero_shot_classifier(space: JointSpace, heads: list[list[list[str]]]) -> TextClassifier:
    """``heads[h][k]`` are the prompts of option k of head h; all are encoded in one call."""
    flat = [p for options in heads for prompts in options for p in prompts]
    if not flat:
        raise DataError("no prompts to build a zero-shot classifier from")
    embedded = space.encode_text(flat)
    rows, start = [], 0
    for options in heads:
        row = []
        for prompts in options:
            row.append(F.normalize(embedded[start : start + len(prompts)].mean(dim=0), dim=-1))
            start += len(prompts)
        rows.append(torch.stack(row))
    return TextClassifier(torch.stack(rows), space.logit_scale)


def head_scores(logits: torch.Tensor, single_label: bool) -> np.ndarray:
    """(N, H, K) logits -> (N, C) scores in the dataset convention: softmax over the classes of
    the one head (single-label; C = 2 for binary), or per label the probability of 'present'."""
    p = torch.softmax(logits.double(), dim=-1)
    out = p[:, 0, :] if single_label else p[:, :, 1]
    return out.numpy()


def head_targets(labels: np.ndarray, single_label: bool, num_options: int) -> np.ndarray:
    """Compact labels ((N,) indices or (N, C) 0/1) -> (N, H) option index per head."""
    y = np.asarray(labels)
    if single_label:
        if y.max(initial=0) >= num_options:
            raise DataError(f"label {int(y.max())} has no class embedding ({num_options} classes)")
        return y.reshape(-1, 1).astype(np.int64)
    return y.astype(np.int64)


def describe_classifier(clf: TextClassifier) -> dict[str, Any]:
    heads, options, dim = clf.weights.shape
    return {"heads": heads, "options": options, "dim": dim, "logit_scale": clf.logit_scale}
