"""Bottleneck adapters (Houlsby et al. 2019; AdaptFormer, Chen et al. 2022); importing registers
``adapter``."""

from clinadapt.adapt.adapter.config import AdapterConfig
from clinadapt.adapt.adapter.layers import Bottleneck, ConvBottleneck
from clinadapt.adapt.adapter.model import Adapter

__all__ = ["Adapter", "AdapterConfig", "Bottleneck", "ConvBottleneck"]
