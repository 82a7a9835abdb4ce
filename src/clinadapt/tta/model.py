"""What test-time adaptation sees of a trained classifier: ``features(x) -> (N, D)`` and a linear
``head``, whose composition gives the logits.

Methods that adapt the network (bn, tent, sar, eata) only need the whole forward; output-level
methods (t3a, lame) need the split: T3A replaces the head by prototypes of test features, LAME
builds its affinity on the features. Any classifier with a linear head fits: a fine-tuned
``AdaptedModel`` (``from_adapted``) or a frozen backbone with a linear probe fitted on its
(optionally standardised) features (``from_linear_probe``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from clinadapt.adapt.finetune import is_norm
from clinadapt.errors import ClinadaptError

if TYPE_CHECKING:
    from clinadapt.adapt.finetune import AdaptedModel


class Standardise(nn.Module):
    """``(x - mean) / scale``: the feature scaling a linear probe was fitted after."""

    def __init__(self, mean: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


class TTAModel(nn.Module):
    """A classifier as ``head(features(x))``; ``name`` is what error messages call it."""

    def __init__(self, features: nn.Module, head: nn.Linear, name: str | None = None) -> None:
        super().__init__()
        if not isinstance(head, nn.Linear):
            raise ClinadaptError(
                f"test-time adaptation needs a linear classification head, not a "
                f"{type(head).__name__}"
            )
        self.features = features
        self.head = head
        self.name = name or getattr(features, "name", None) or type(features).__name__

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    @classmethod
    def from_adapted(cls, model: AdaptedModel) -> TTAModel:
        """The backbone and linear head of a classification ``AdaptedModel`` (shared, not copied:
        ``TTAMethod.run`` adapts a copy)."""
        if model.task != "classification":
            raise ClinadaptError(
                f"test-time adaptation applies to classifiers; this model's task is {model.task!r}"
            )
        return cls(model.backbone, model.head, name=model.backbone.name)

    @classmethod
    def from_linear_probe(
        cls,
        features: nn.Module,
        coef: np.ndarray,
        intercept: np.ndarray,
        mean: np.ndarray | None = None,
        scale: np.ndarray | None = None,
        name: str | None = None,
    ) -> TTAModel:
        """A frozen feature extractor with a logistic-regression probe (scikit-learn's ``coef_``
        (C, D) and ``intercept_`` (C,), fitted on ``(features - mean) / scale``).

        A binary probe (``coef`` of one row, logit z for class 1) becomes the two-row head
        ``[-z/2, z/2]``, whose softmax is ``[1 - sigmoid(z), sigmoid(z)]``: the probe's
        probabilities, with class prototypes (the head's rows) that point apart, as T3A expects.
        """
        w = torch.as_tensor(np.asarray(coef, dtype=np.float32))
        b = torch.as_tensor(np.asarray(intercept, dtype=np.float32)).reshape(-1)
        if w.ndim != 2 or len(b) != len(w):
            raise ClinadaptError(
                f"a linear probe needs coef of shape (C, D) and intercept of shape (C,), got "
                f"{tuple(w.shape)} and {tuple(b.shape)}"
            )
        if len(w) == 1:
            w, b = torch.cat([-w / 2, w / 2]), torch.cat([-b / 2, b / 2])
        head = nn.Linear(w.shape[1], len(w))
        with torch.no_grad():
            head.weight.copy_(w)
            head.bias.copy_(b)
        if (mean is None) != (scale is None):
            raise ClinadaptError("give both mean and scale of the probe's standardisation, or none")
        if mean is not None:
            steps = [
                torch.as_tensor(np.asarray(v, dtype=np.float32)).reshape(-1) for v in (mean, scale)
            ]
            if any(len(v) != w.shape[1] for v in steps):
                raise ClinadaptError(
                    f"the probe's standardisation has {len(steps[0])} means and {len(steps[1])} "
                    f"scales for {w.shape[1]} features"
                )
            name = name or getattr(features, "name", None)
            features = nn.Sequential(features, Standardise(*steps))
        return cls(features, head, name=name)


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Batch-norm layers (torch's and subclasses such as timm's ``BatchNormAct2d``): the layers
    whose statistics come from a batch of images rather than from each image alone."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def initial_batch_norms(model: nn.Module) -> bool:
    """Whether every batch norm with running statistics still holds their initial values (mean 0,
    variance 1): weights converted with batch norm folded into the convolutions (TFLite exports
    such as our MobileNets) or a network never trained. Its features were never normalised by
    any statistics, so test-batch statistics change them rather than correct a shift."""
    norms = [m for m in batch_norms(model) if m.running_mean is not None]
    return bool(norms) and all(
        bool((m.running_mean == 0).all())
        and m.running_var is not None
        and torch.allclose(m.running_var, torch.ones_like(m.running_var), rtol=0, atol=1e-4)
        for m in norms
    )


def norm_affine_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The affine parameters (scale and shift) of every normalisation layer, by name."""
    return [
        (f"{name}.{pname}" if name else pname, p)
        for name, module in model.named_modules()
        if is_norm(module)
        for pname, p in module.named_parameters(recurse=False)
    ]
