"""Bottleneck adapters.

Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP" (ICML), and AdaptFormer:
Chen et al. 2022, "AdaptFormer: Adapting Vision Transformers for Scalable Visual Recognition"
(NeurIPS). Each transformer block (timm ViT / Swin, open_clip) gets a bottleneck parallel to its
MLP (AdaptFormer, default) or after it (Houlsby); a CNN gets a residual 1x1-conv bottleneck after
each stage listed in timm's ``feature_info`` (the parameter-free stem entry skipped), in the
spirit of residual adapters (Rebuffi et al. 2017).

The adapters live in ``backbone.model.adapters`` (a ``ModuleDict``) and act through forward
hooks, so every original module keeps its name and the timm module tree still loads its weights.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from clinadapt.adapt.adapter.config import AdapterConfig
from clinadapt.adapt.adapter.layers import Bottleneck, ConvBottleneck
from clinadapt.adapt.base import METHODS
from clinadapt.adapt.finetune import AdaptedModel, FineTuneMethod, find_blocks
from clinadapt.errors import ClinadaptError

ATTRIBUTE = "adapters"


def _key(name: str) -> str:
    return name.replace(".", "_")


def _mlp_width(mlp: nn.Module) -> int:
    linear = next((m for m in mlp.modules() if isinstance(m, nn.Linear)), None)
    if linear is None:
        raise ClinadaptError(f"adapter: cannot tell the width of {type(mlp).__name__}")
    return linear.in_features


def cnn_stages(model: nn.Module) -> list[tuple[str, int]]:
    """(module name, output channels) of each stage in timm's ``feature_info``, without the
    parameter-free stem entry (e.g. ResNet's ``act1``)."""
    info = getattr(model, "feature_info", None)
    if not info:
        return []
    modules = dict(model.named_modules())
    return [
        (entry["module"], int(entry["num_chs"]))
        for entry in info
        if entry.get("module") in modules
        and any(True for _ in modules[entry["module"]].parameters())
    ]


class Adapter(FineTuneMethod):
    """Zero-initialised bottleneck adapters in every block or stage; the head trains."""

    config_cls = AdapterConfig
    description = "bottleneck adapters (Houlsby et al. 2019 / AdaptFormer): blocks or CNN stages"

    def __init__(self, config: AdapterConfig | None = None) -> None:
        super().__init__(config)
        self.sites: list[str] = []

    def apply(self, model: AdaptedModel) -> AdaptedModel:
        self._begin(model, "adapter")
        net = model.backbone.model
        if hasattr(net, ATTRIBUTE):
            raise ClinadaptError(f"adapter: {type(net).__name__} already has an {ATTRIBUTE!r}")
        cfg = self.config
        adapters = nn.ModuleDict()
        blocks = find_blocks(net)
        if blocks:
            for name, block in blocks:
                dim = _mlp_width(block.mlp)
                layer = Bottleneck(dim, min(cfg.bottleneck, dim), cfg.scale, cfg.dropout)
                hook = layer.parallel_hook if cfg.style == "parallel" else layer.sequential_hook
                block.mlp.register_forward_hook(hook)
                adapters[_key(f"{name}.mlp")] = layer
                self.sites.append(f"{name}.mlp")
        else:
            stages = cnn_stages(net)
            if not stages:
                raise ClinadaptError(
                    f"adapter: backbone {model.backbone.name!r} ({type(net).__name__}) has neither "
                    "transformer blocks nor timm feature_info stages; use 'lora' or 'bitfit'"
                )
            for name, channels in stages:
                layer = ConvBottleneck(
                    channels, min(cfg.bottleneck, channels), cfg.scale, cfg.dropout
                )
                net.get_submodule(name).register_forward_hook(layer.sequential_hook)
                adapters[_key(name)] = layer
                self.sites.append(name)
        reference = next(net.parameters())
        adapters.to(device=reference.device, dtype=reference.dtype)
        setattr(net, ATTRIBUTE, adapters)  # trainable (created with requires_grad)
        model.refresh_frozen_norms()
        return model

    def merge(self, model: AdaptedModel) -> nn.Module:
        raise ClinadaptError(
            "adapter: bottleneck adapters are non-linear branches that cannot be folded into the "
            "backbone's weights; export without --merge (adapter checkpoint), or use lora, "
            "bitfit or full for a mergeable model"
        )

    def selected(self) -> dict[str, Any]:
        return {"sites": list(self.sites), "num_adapters": len(self.sites)}


METHODS.register("adapter", Adapter)
