"""Named backbones over timm / open_clip / local safetensors, behind one ``Backbone`` interface."""

from clinadapt.backbones.base import Backbone, PretrainedConfig
from clinadapt.backbones.factory import create_backbone
from clinadapt.backbones.registry import BACKBONES, BackboneSpec, get_spec, pretrained_config

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneSpec",
    "PretrainedConfig",
    "create_backbone",
    "get_spec",
    "pretrained_config",
]
