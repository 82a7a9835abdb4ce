"""The interface of gradient-based methods: which parameters of backbone + new head train.

A ``FineTuneMethod`` (kind ``finetune``) turns an ``AdaptedModel`` (frozen backbone + new linear
head) into a model whose chosen parameters train: it may insert layers (LoRA, adapters, prompts)
and sets ``requires_grad``. The training loop only sees an ``nn.Module`` and its trainable
parameters; ``clinadapt.adapt.checkpoint`` saves and rebuilds adapter-only checkpoints.

Frozen batch-norm layers stay frozen: ``AdaptedModel.train()`` keeps every normalisation layer
with running statistics whose parameters do not train (``frozen_norms``) in eval mode, so its
running mean and variance never drift, whatever the training loop does with ``train()``.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from clinadapt.errors import ClinadaptError
from clinadapt.tasks import TASKS

if TYPE_CHECKING:  # clinadapt.backbones imports timm: keep `import clinadapt.adapt` light
    from clinadapt.backbones.base import Backbone

_NORM_TYPES = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
_NORM_SUFFIXES = ("norm", "norm1d", "norm2d", "norm3d", "normact", "normact2d", "norm2d_cl")


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: torch's norms and their subclasses, or a class named like one
    (timm's ``RmsNorm``, ``LayerNorm2d``, ``BatchNormAct2d`` ...)."""
    return isinstance(module, _NORM_TYPES) or type(module).__name__.lower().endswith(_NORM_SUFFIXES)


def has_running_stats(module: nn.Module) -> bool:
    """Batch-norm-like layers whose buffers change in train mode."""
    return isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats


class AdaptedModel(nn.Module):
    """A backbone with a new head of kind ``head`` (default: the task's first), built by its
    ``task`` (a name in ``clinadapt.tasks.TASKS``).

    A method decides what trains: it may insert layers into ``backbone.model`` (LoRA, adapters,
    prompts) and sets ``requires_grad``. The head always trains. ``trainable_state_dict`` is what
    an adapter-only checkpoint holds; the base weights are rebuilt from the backbone's name and
    weights option.

    ``base_parameters`` counts the backbone's parameters before any method inserted layers;
    ``trainable_parameters()`` counts what trains now (head and inserted layers included).
    ``frozen_norms`` names the running-statistics norm layers that ``train()`` keeps in eval mode.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        task: str = "classification",
        head: str | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ClinadaptError(f"num_classes must be at least 1, got {num_classes}")
        self.backbone = backbone
        self.task = task
        self.num_classes = num_classes
        self._task = TASKS.get(task)
        self.head_kind = head or self._task.head_kinds[0]
        self.head = self._task.head(backbone, num_classes, self.head_kind)
        self.base_parameters = sum(p.numel() for p in backbone.parameters())
        self.method_name: str | None = None
        self.frozen_norms: tuple[str, ...] = ()
        self.refresh_frozen_norms()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._task.forward(self.backbone, self.head, images)

    def train(self, mode: bool = True) -> AdaptedModel:
        """Train mode everywhere except the frozen running-statistics norms (see module doc)."""
        super().train(mode)
        if mode:
            for name in self.frozen_norms:
                self.get_submodule(name).eval()
        return self

    def refresh_frozen_norms(self) -> tuple[str, ...]:
        """Mark as frozen every running-statistics norm none of whose parameters train (layers
        without affine parameters count as frozen). Methods call this at the end of ``apply``."""
        self.frozen_norms = tuple(
            name
            for name, module in self.named_modules()
            if has_running_stats(module)
            and not any(p.requires_grad for p in module.parameters(recurse=False))
        )
        if self.training:
            for name in self.frozen_norms:
                self.get_submodule(name).eval()
        return self.frozen_norms

    def trainable_names(self) -> list[str]:
        return [name for name, p in self.named_parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable parameters plus the buffers of modules that train: modules owning a trainable
        parameter, and running-statistics norms that are not frozen (their statistics update)."""
        params = dict(self.named_parameters())
        names = {n for n, p in params.items() if p.requires_grad}
        owners = {n.rpartition(".")[0] for n in names}
        frozen = set(self.frozen_norms)
        owners |= {
            name
            for name, module in self.named_modules()
            if has_running_stats(module) and name not in frozen
        }
        return {
            k: v.detach().clone().contiguous()
            for k, v in self.state_dict().items()
            if k in names or (k not in params and k.rpartition(".")[0] in owners)
        }

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def trainable_percent(self) -> float:
        """Trainable parameters (head and inserted layers included) as % of the backbone's."""
        return 100.0 * self.trainable_parameters() / max(self.base_parameters, 1)

    def parameter_summary(self) -> dict[str, Any]:
        """What every run record states about the method's size."""
        return {
            "method": self.method_name,
            "trainable_parameters": self.trainable_parameters(),
            "base_parameters": self.base_parameters,
            "trainable_percent": self.trainable_percent(),
        }


class FineTuneMethod(ABC):
    """Turns a frozen backbone + head into a model whose chosen parameters train.

    Subclasses set ``config_cls`` and implement ``apply``; ``merge`` folds whatever the method
    added back into a plain backbone (timm model with the head as its classifier) where the
    method allows it, so that deployment needs no clinadapt code.
    """

    kind: ClassVar[str] = "finetune"
    config_cls: ClassVar[type]
    description: ClassVar[str] = ""
    mergeable: ClassVar[bool] = False

    def __init__(self, config: Any | None = None) -> None:
        self.config = config if config is not None else self.config_cls()

    @abstractmethod
    def apply(self, model: AdaptedModel) -> AdaptedModel:
        """Insert the method's layers and mark trainable parameters (once, before training)."""

    def merge(self, model: AdaptedModel) -> nn.Module:
        """A plain model (no clinadapt layers) computing the same logits as ``model``."""
        raise ClinadaptError(
            f"{type(self).__name__} adds layers that cannot be folded into the backbone; export "
            "without --merge to get the adapter checkpoint"
        )

    def selected(self) -> dict[str, Any]:
        """What ``apply`` chose (e.g. LoRA target modules), for the run record."""
        return {}

    def _begin(self, model: AdaptedModel, name: str) -> None:
        """Refuse a second method on the same model; freeze the backbone, train the head."""
        self._require_fresh(model, name)
        model.method_name = name
        model.backbone.requires_grad_(False)
        model.head.requires_grad_(True)

    @staticmethod
    def _require_fresh(model: AdaptedModel, name: str) -> None:
        if model.method_name is not None:
            raise ClinadaptError(
                f"this model was already adapted with {model.method_name!r}; build a fresh "
                f"AdaptedModel to apply {name!r}"
            )


def attach_classifier(features: nn.Module, head: nn.Linear) -> nn.Module:
    """``features`` (a classifier-free backbone, modified in place) with ``head`` as classifier.

    timm models get ``reset_classifier(num_classes)`` and the head's weights, so
    ``timm.create_model(arch, num_classes=C, **kwargs)`` loads the merged state dict; other models
    (open_clip towers) become ``nn.Sequential(features, head)``.
    """
    if not isinstance(head, nn.Linear):
        raise ClinadaptError(
            f"only a linear classification head merges into the backbone, not a "
            f"{type(head).__name__}; export without --merge to get the adapter checkpoint"
        )
    device, dtype = head.weight.device, head.weight.dtype
    if hasattr(features, "reset_classifier") and hasattr(features, "get_classifier"):
        features.reset_classifier(head.out_features)
        classifier = features.get_classifier()
        if isinstance(classifier, nn.Linear) and classifier.weight.shape == head.weight.shape:
            classifier.to(device=device, dtype=dtype)
            with torch.no_grad():
                classifier.weight.copy_(head.weight)
                classifier.bias.copy_(head.bias)
            return features.eval().requires_grad_(True)
        raise ClinadaptError(
            f"cannot install the head into {type(features).__name__}: its classifier is "
            f"{type(classifier).__name__}, not a Linear({head.in_features}, {head.out_features})"
        )
    merged = nn.Sequential(OrderedDict(features=features, head=copy.deepcopy(head)))
    return merged.eval().requires_grad_(True)


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Transformer blocks: modules with both an ``attn`` and an ``mlp`` child (timm ViT / Swin
    blocks, open_clip ``ResidualAttentionBlock``)."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(getattr(module, "attn", None), nn.Module)
        and isinstance(getattr(module, "mlp", None), nn.Module)
    ]
