"""LoRA: Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR).

A frozen weight ``W`` becomes ``W + (alpha / r) B A`` with rank-``r`` factors, ``B`` zero at
the start. Layers are injected by Hugging Face PEFT (``peft.LoraModel``) into the timm or
open_clip module, which PEFT wraps (``backbone.model`` becomes a ``LoraModel`` whose ``.model`` is
the original module). Targets, unless ``target_modules`` is given:

- transformers (timm ViT, DINOv2, Swin): every attention ``qkv``/``proj`` and MLP ``fc1``/``fc2``
  Linear in the blocks (patch embedding and patch merging excluded);
- open_clip ViT towers: each ``nn.MultiheadAttention`` (PEFT's LoRA for it adapts in_proj and
  out_proj together) and the MLP ``c_fc``/``c_proj`` Linears;
- CNNs: every Conv2d except the stem (the pixel-level first convolution) and grouped/depthwise
  convolutions (PEFT cannot merge those), plus MLP Linears where a block has them (ConvNeXt).

``merge`` uses PEFT's ``merge_and_unload`` and returns the plain module with the head installed.
"""

from __future__ import annotations

import copy
from types import ModuleType
from typing import Any

from torch import nn

from clinadapt._optional import require
from clinadapt.adapt.base import METHODS
from clinadapt.adapt.finetune import AdaptedModel, FineTuneMethod, attach_classifier
from clinadapt.adapt.lora.config import LoRAConfig
from clinadapt.errors import ClinadaptError

ATTENTION_LEAVES = frozenset(
    {"qkv", "q", "k", "v", "kv", "q_proj", "k_proj", "v_proj", "proj", "out_proj"}
)


def import_peft() -> ModuleType:
    """PEFT is needed only by ``lora``: import it when the method is applied."""
    return require("peft", extra=None, needed_by="the lora method")


def default_targets(model: nn.Module) -> list[str]:
    """Names (relative to ``model``) of the layers LoRA adapts by default; see the module doc."""
    modules = dict(model.named_modules())
    mha = [n for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)]

    def inside_mha(name: str) -> bool:
        return any(name.startswith(f"{prefix}.") for prefix in mha)

    linears = [
        n for n, m in modules.items() if isinstance(m, nn.Linear) and n and not inside_mha(n)
    ]
    attention = [
        n
        for n in linears
        if n.rpartition(".")[2] in ATTENTION_LEAVES and "attn" in n.rpartition(".")[0]
    ]
    mlp = [n for n in linears if "mlp" in n.split(".")[:-1] and n not in attention]
    if mha or attention:
        return sorted(mha + attention + mlp, key=list(modules).index)
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv") or ()
    stem = {first} if isinstance(first, str) else set(first)
    convs = [
        n
        for n, m in modules.items()
        if isinstance(m, nn.Conv2d) and m.groups == 1 and m.in_channels > 3 and n not in stem
    ]
    return sorted(convs + mlp, key=list(modules).index)


class LoRA(FineTuneMethod):
    """Low-rank updates on the chosen layers; the head trains; merges into a plain model."""

    config_cls = LoRAConfig
    description = "LoRA (Hu et al. 2022) via PEFT: low-rank updates of attention/MLP or conv layers"
    mergeable = True

    def __init__(self, config: LoRAConfig | None = None) -> None:
        super().__init__(config)
        self.targets: list[str] = []

    def apply(self, model: AdaptedModel) -> AdaptedModel:
        peft = import_peft()
        self._begin(model, "lora")
        backbone = model.backbone
        requested = self.config.target_modules or default_targets(backbone.model)
        if not requested:
            raise ClinadaptError(
                f"lora: found no attention, MLP or convolution layers to adapt in backbone "
                f"{backbone.name!r} ({type(backbone.model).__name__}); set target_modules"
            )
        peft_config = peft.LoraConfig(
            r=self.config.r,
            lora_alpha=self.config.alpha,
            lora_dropout=self.config.dropout,
            target_modules=list(requested),
            bias="none",
        )
        try:
            wrapped = peft.LoraModel(backbone.model, peft_config, "default")
        except (ValueError, TypeError) as err:
            raise ClinadaptError(
                f"lora: cannot adapt target_modules {requested} of backbone {backbone.name!r}: "
                f"{err}. Layers LoRA would choose by default: {default_targets(backbone.model)}"
            ) from None
        backbone.model = wrapped
        tuner_layer = peft.tuners.tuners_utils.BaseTunerLayer
        found = [n for n, m in wrapped.model.named_modules() if isinstance(m, tuner_layer)]
        self.targets = [n for n in found if not any(n.startswith(f"{o}.") for o in found)]
        model.refresh_frozen_norms()
        return model

    def merge(self, model: AdaptedModel) -> nn.Module:
        peft = import_peft()
        wrapped = model.backbone.model
        if not isinstance(wrapped, peft.LoraModel):
            raise ClinadaptError("lora: merge needs a model that the lora method was applied to")
        try:
            plain = copy.deepcopy(wrapped).merge_and_unload()
        except NotImplementedError as err:
            raise ClinadaptError(
                f"lora: PEFT cannot merge these layers ({err}); export without --merge"
            ) from None
        return attach_classifier(plain, model.head)

    def selected(self) -> dict[str, Any]:
        return {"target_modules": list(self.targets), "num_targets": len(self.targets)}


METHODS.register("lora", LoRA)
